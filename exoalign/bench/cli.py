"""``exoalign bench <name>``: dispatch to the benchmarks (``exact``: :mod:`exoalign.exact`)."""

from __future__ import annotations

import sys

from ..errors import ConfigError


def _exact(argv: list[str]) -> int:
    from ..exact.cli import exact_main

    return exact_main(argv)


BENCHMARKS = {"exact": _exact}


def main(argv: list[str]) -> int:
    """Dispatch ``exoalign bench <name> …``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: exoalign bench {" + ",".join(BENCHMARKS) + "} [options]\n\n"
              "  exact   EXO vs DPO against the exact optimum of an enumerable task")
        return 0
    if argv[0] not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {argv[0]!r}", field="bench", fix=f"use one of {', '.join(BENCHMARKS)}")
    try:
        return BENCHMARKS[argv[0]](argv[1:])
    except SystemExit as e:  # --help
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
