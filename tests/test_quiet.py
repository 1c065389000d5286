"""Our commands' output carries our lines, not transformers'/accelerate's noise (exoalign/quiet.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exoalign import quiet

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Loading weights", "Writing model shards", "Removed shared tensor",
         "We strongly recommend passing in an `attention_mask`")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_filters_drop_only_the_silenced_messages():
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    assert sum(isinstance(f, quiet._Drop) for f in logging.getLogger("accelerate.utils.other").filters) == 1
    # a handler on each logger itself: other tests may have changed transformers' verbosity or propagation
    names = ("transformers.modeling_utils", "accelerate.utils.other")
    logs = [logging.getLogger(n) for n in names]
    saved = [(log.level, log.disabled) for log in logs]
    sink = _Collect()
    try:
        for log in logs:
            log.setLevel(logging.WARNING)
            log.disabled = False
            log.addHandler(sink)
        logs[0].warning("We strongly recommend passing in an `attention_mask` ...")
        logs[1].warning("[RANK 0] Removed shared tensor {'lm_head.weight'} while saving.")
        logs[0].warning("Some weights of the model were not initialized")
        logs[1].warning("another accelerate warning")
    finally:
        for log, (level, disabled) in zip(logs, saved):
            log.removeHandler(sink)
            log.setLevel(level)
            log.disabled = disabled
    assert sink.messages == ["Some weights of the model were not initialized", "another accelerate warning"]


def _train(tmp_path: Path, entry: str, name: str) -> str:
    """stderr of a 2-step smoke run that loads, saves checkpoints (tied embeddings) and scores a reference."""
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"train.output_dir={tmp_path / name}",
            f"train.ref_cache_dir={tmp_path / name / 'cache'}", "train.max_steps=2", "train.save_every=1",
            "data.max_length=40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", entry, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.slow
def test_a_command_stderr_lacks_their_noise_and_keeps_ours(tmp_path):
    err = _train(tmp_path, "import sys; from exoalign.cli import main; sys.exit(main(['train', *sys.argv[1:]]))", "q")
    for noise in NOISE:
        assert noise not in err, noise
    for ours in ("data: ", "reference log-probs (train): computed and cached", "train q", "summary: 2 optimizer steps",
                 "saved "):
        assert ours in err, ours
    # The same run without exoalign.cli (the library's own entry, nothing installed) shows them: the check
    # above is not vacuous.
    raw = _train(tmp_path, "import sys; from exoalign.train.cli import main; sys.exit(main(sys.argv[1:]))", "raw")
    assert all(noise in raw for noise in NOISE), [n for n in NOISE if n not in raw]
