"""``exoalign train --config f.yaml [section.key=value …] [--resume]``.

Also runs under a distributed launcher unchanged, e.g.
``accelerate launch --num_processes 8 -m exoalign.cli train --config f.yaml`` or
``torchrun --standalone --nproc_per_node 2 -m exoalign.cli train --config f.yaml train.cpu=true``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from ..config import config_parser, load_config
from ..logs import setup_logging
from .config import TrainConfig
from .engine import TrainingError


def run_stage(prog: str, cls: type, run: Callable[[Any], Any], argv: list[str], description: str) -> int:
    """The shared ``main``: parse ``--config``/overrides/``--resume``, build the config, run, report the result."""
    parser = config_parser(prog, cls, description)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in output_dir")
    ns = parser.parse_args(argv)
    overrides = list(ns.overrides) + (["train.resume=true"] if ns.resume else [])
    cfg = load_config(cls, ns.config, overrides)
    setup_logging()
    try:
        final = run(cfg)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("exoalign").info("saved %s", final)
    return 0


def main(argv: list[str]) -> int:
    from .loop import train

    return run_stage(
        "exoalign train", TrainConfig, train, argv,
        "Align a causal LM with EXO / DPO / … on preference pairs or reward-scored groups of K completions.",
    )
