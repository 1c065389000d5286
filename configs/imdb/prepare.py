"""IMDB data of the EXO paper's controlled-sentiment experiment (Ji et al. 2024, §5.1) as exoalign rows.

    python configs/imdb/prepare.py                       # stanfordnlp/imdb from the hub → data/imdb/
    python configs/imdb/prepare.py --source DIR          # DIR/train.jsonl, DIR/test.jsonl rows {"text", "label"}

Every review (its "<br />" tags turned back into line breaks) is cut after its first ``--prefix-tokens`` (10)
tokens of the policy's tokeniser (GPT-2): those tokens, decoded, are the prompt; the rest is the SFT
completion. Written to ``--out``:

* ``sft.jsonl``            ``{"prompt", "completion"}`` — train split, for ``exoalign sft``;
* ``prompts_train.jsonl``  ``{"prompt"}`` — train split, sampled K=2 times by ``exoalign sample`` (alignment data);
* ``prompts_test.jsonl``   ``{"prompt"}`` — test split in a seeded random order (the hub split is sorted by
  label, so a prefix of it would be all negative), for ``exoalign eval``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def read_split(source: str, split: str) -> list[dict]:
    """Rows of ``split``: ``<source>/<split>.jsonl`` when ``source`` is a directory, else the hub dataset."""
    from exoalign.data import read_source

    local = Path(source)
    if local.is_dir():
        return read_source(local / f"{split}.jsonl")[0]
    import datasets

    return datasets.load_dataset(source, split=split).to_list()


def cut(tokenizer, text: str, n: int) -> tuple[str, str]:
    """``(first n tokens, the rest)`` of ``text``, each decoded back to a string."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])


def main(argv: list[str] | None = None) -> int:
    from exoalign.data import write_rows
    from exoalign.models import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="stanfordnlp/imdb", help="hub dataset, or a directory of <split>.jsonl")
    p.add_argument("--tokenizer", default="gpt2-large", help="tokeniser whose tokens the prompt length counts")
    p.add_argument("--out", default="data/imdb", help="output directory")
    p.add_argument("--prefix-tokens", type=int, default=10, help="prompt length in tokens (the paper: 10)")
    p.add_argument("--limit", type=int, default=None, help="keep only this many reviews per split (quick runs)")
    p.add_argument("--seed", type=int, default=42, help="seed of the test-split shuffle")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    for split in ("train", "test"):
        rows = read_split(args.source, split)
        if split == "test":
            random.Random(args.seed).shuffle(rows)
        rows = rows[: args.limit] if args.limit else rows
        pairs = []
        for row in rows:
            prompt, rest = cut(tokenizer, row["text"].replace("<br />", "\n").rstrip(), args.prefix_tokens)
            if prompt.strip() and rest.strip():  # reviews of <= 10 tokens have nothing to complete
                pairs.append((prompt, rest))
        if split == "train":
            write_rows(out / "sft.jsonl", [{"prompt": a, "completion": b} for a, b in pairs])
        write_rows(out / f"prompts_{split}.jsonl", [{"prompt": a} for a, _ in pairs])
        print(f"{split}: {len(pairs)} reviews → {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
