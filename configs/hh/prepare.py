"""Anthropic-HH helpful-base data of the EXO paper (Ji et al. 2024, §5.2) as exoalign rows.

    python configs/hh/prepare.py                     # Anthropic/hh-rlhf (data_dir helpful-base) → data/hh/
    python configs/hh/prepare.py --source DIR        # local DIR/train.jsonl, DIR/test.jsonl {"chosen", "rejected"}

Each row of the dataset holds two whole dialogues, ``\\n\\nHuman: … \\n\\nAssistant: …``, that agree up to the
final assistant reply. The prompt is the shared dialogue up to and including the last ``Assistant:`` they have in
common (the split ``exoalign train data.preset=hh-rlhf`` makes on the raw rows); the two final replies are chosen
and rejected. Rows whose replies are empty, equal, or run on into another human turn are left out. Written to ``--out``:

* ``pairs_train.jsonl``, ``pairs_test.jsonl`` ``{"prompt", "chosen", "rejected"}`` — for ``exoalign rm train``,
  the pref runs and (deduplicated) the prompts ``exoalign sample`` uses;
* ``sft.jsonl`` ``{"prompt", "completion"}`` — the chosen replies of the train split (the authors' SFT data);
* ``prompts_test.jsonl`` ``{"prompt"}`` — the test prompts in a seeded order, for ``exoalign eval``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def read_split(source: str, split: str, data_dir: str | None = None) -> list[dict]:
    """Rows of ``split``: ``<source>/<split>.jsonl`` when ``source`` is a directory, else the hub dataset."""
    from exoalign.data import read_source

    local = Path(source)
    if local.is_dir():
        return read_source(local / f"{split}.jsonl")[0]
    import datasets

    return datasets.load_dataset(source, data_dir=data_dir, split=split).to_list()


def split_dialogues(chosen: str, rejected: str) -> dict[str, str] | None:
    """``{"prompt", "chosen", "rejected"}`` from two dialogues that differ only in the last reply, else None.

    The split is ``data.preset=hh-rlhf``'s (``exoalign.data.presets.split_hh``); rows whose replies are empty,
    equal or run on into another human turn are then left out, as in the paper's data."""
    from exoalign.data.presets import HUMAN, split_hh

    split = split_hh(chosen, rejected)
    if split is None:
        return None
    prompt, a, b = split
    if not a.strip() or not b.strip() or a.strip() == b.strip() or HUMAN in a or HUMAN in b:
        return None
    return {"prompt": prompt, "chosen": a, "rejected": b}


def main(argv: list[str] | None = None) -> int:
    from exoalign.data import write_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="Anthropic/hh-rlhf", help="hub dataset or directory of <split>.jsonl")
    p.add_argument("--data-dir", default="helpful-base", help="subset of the hub dataset (the paper: helpful-base)")
    p.add_argument("--out", default="data/hh", help="output directory")
    p.add_argument("--limit", type=int, default=None, help="keep only this many rows per split (quick runs)")
    p.add_argument("--seed", type=int, default=42, help="seed of the test-prompt order")
    args = p.parse_args(argv)
    out = Path(args.out)
    for split in ("train", "test"):
        pairs = [x for r in read_split(args.source, split, args.data_dir)
                 if (x := split_dialogues(r["chosen"], r["rejected"])) is not None]
        pairs = pairs[: args.limit] if args.limit else pairs
        write_rows(out / f"pairs_{split}.jsonl", pairs)
        if split == "train":
            write_rows(out / "sft.jsonl", [{"prompt": x["prompt"], "completion": x["chosen"]} for x in pairs])
        else:
            prompts = list(dict.fromkeys(x["prompt"] for x in pairs))
            random.Random(args.seed).shuffle(prompts)
            write_rows(out / "prompts_test.jsonl", [{"prompt": x} for x in prompts])
        print(f"{split}: {len(pairs)} pairs → {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
