"""``exoalign bench exact [--quick] [--seed N] [--beta B] [--out DIR]``: the exact-optimum benchmark.

Any field of :class:`~exoalign.exact.benchmark.ExactConfig` can also be set as a trailing ``key=value``
(e.g. ``steps=2000 ks=[2,4,8,16]``); ``--help`` lists them. Bad values exit with code 2 and one line.
"""

from __future__ import annotations

import argparse

from ..config import config_parser, load_config
from ..errors import ConfigError

DEFAULT_OUT = "benchmarks/results/exact"


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2 through exoalign.cli) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message, field=self.prog, fix=f"see `{self.prog} --help`")


def _exact_parser() -> argparse.ArgumentParser:
    from .benchmark import ExactConfig

    base = config_parser("exoalign bench exact", ExactConfig, "Exact-optimum benchmark: EXO vs DPO against the "
                         "exact optimal policy on an enumerable sequence task.")
    p = _Parser(prog=base.prog, description=base.description, epilog=base.epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings that finish in under a minute")
    p.add_argument("--seed", type=int, default=None, help="base seed (default 0)")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient β (default 0.5)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config fields listed below")
    return p


def exact_main(argv: list[str]) -> int:
    """Run the exact-optimum benchmark and write results.json, results.md and the PNGs into ``--out``."""
    import torch

    from .benchmark import QUICK, ExactConfig, run_benchmark, write_outputs

    args = _exact_parser().parse_args(argv)
    overrides = [f"{k}={v}" for k, v in QUICK.items()] if args.quick else []
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.beta is not None:
        overrides.append(f"beta={args.beta}")
    cfg = load_config(ExactConfig, None, overrides + list(args.overrides))
    # the models are tiny: one thread avoids the cost of synchronising threads on every small op
    torch.set_num_threads(1)
    results, toy = run_benchmark(cfg, progress=not args.no_progress)
    results["config"]["quick"] = bool(args.quick)
    paths = write_outputs(results, toy, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
