"""exoalign: align causal language models by EXO (efficient exact optimization), with the DPO family beside it.

EXO (Ji et al., ICML 2024, https://arxiv.org/abs/2402.00856) minimises the reverse KL between the policy's
and the reward's distributions over K completions of a prompt; DPO minimises the forward KL. See
``exoalign.losses`` for the math.
"""

__version__ = "0.1.0"
