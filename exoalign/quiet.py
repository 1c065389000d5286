"""Keep our commands' output to what informs the user: silence third-party lines that carry nothing for them.

Installed by ``exoalign <command>`` (``exoalign.cli``) before a command that loads models runs; library use
is left alone. What goes, and why:

* transformers' own progress bars ("Loading weights", "Writing model shards"): a bar per model load and save,
  a dozen per command, each over in well under a second for the models a CPU trains. Hub download bars are
  huggingface_hub's and stay.
* accelerate's "Removed shared tensor {...} while saving": tied input/output embeddings are saved once, which is
  what ``from_pretrained`` expects; the reload is tested.
* transformers' "We strongly recommend passing in an `attention_mask`": raised when a pad id (here also EOS)
  appears at the edge of a batch; every forward pass of exoalign passes its own mask or positions.

Everything exoalign logs, our progress bars, and any other warning of transformers or accelerate stay.
"""

from __future__ import annotations

import logging
from typing import Any

SILENCED: dict[str, tuple[str, ...]] = {
    "transformers.modeling_utils": ("We strongly recommend passing in an `attention_mask`",),
    "accelerate.utils.other": ("Removed shared tensor",),
}
"""Logger name → text that marks a message dropped from it (accelerate prefixes its messages with the rank)."""


class _Drop(logging.Filter):
    """Drops records whose message contains one of ``marks``."""

    def __init__(self, marks: tuple[str, ...]) -> None:
        super().__init__()
        self.marks = marks

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(m in message for m in self.marks)


def _no_bar(factory: Any, args: tuple, kwargs: dict) -> Any:
    """transformers' tqdm hook: every bar it makes is created disabled."""
    return factory(*args, **{**kwargs, "disable": True})


def install() -> None:
    """Add the message filters (idempotent) and switch transformers' own progress bars off."""
    for name, marks in SILENCED.items():
        log = logging.getLogger(name)  # the same object the library gets later: works before it is imported
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop(marks))
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:  # transformers >= 5: only its own bars, not the hub's download bars
        set_hook(_no_bar)
    else:
        hf_logging.disable_progress_bar()
