"""Add the online rows of some losses to a finished exact-benchmark run, without re-running the rest.

    python benchmarks/exact_add_rows.py --losses ppo --out benchmarks/results/exact

Reads ``OUT/results.json`` and ``OUT/illustration.json``, trains every online method of the given registry
losses (all K and reuse of the recorded settings, on the recorded online seeds) through
:func:`exoalign.exact.benchmark.add_online_rows`, which refuses when the rebuilt π_sft differs from the recorded
one, and rewrites results.json, results.md and the PNGs. Each online run depends only on its method and seed,
so the rows are those a full ``exoalign bench exact`` of the same code would write.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from exoalign.exact.benchmark import add_online_rows, write_outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", nargs="+", required=True, help="registry losses of the online rows, e.g. ppo")
    p.add_argument("--out", default="benchmarks/results/exact", help="directory of the finished run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    toy = json.loads((out / "illustration.json").read_text(encoding="utf-8"))
    torch.set_num_threads(1)  # as exoalign bench exact: the models are tiny
    add_online_rows(results, args.losses, progress=not args.no_progress)
    paths = write_outputs(results, toy, out)
    print(f"added {results['config']['added'][-1]['methods']} in {results['config']['added'][-1]['wall_s']} s; "
          f"wrote {', '.join(str(x) for x in paths)}")


if __name__ == "__main__":
    main()
