"""The demo: EXO vs DPO on controlled sentiment generation (``exoalign demo``)."""
