"""``exoalign bench``: the command that dispatches to the benchmarks (the exact one lives in :mod:`exoalign.exact`)."""
