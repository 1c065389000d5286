"""TL;DR summarisation data of the EXO paper (Ji et al. 2024, §5.2) as exoalign rows.

    python configs/tldr/prepare.py                                   # both datasets from the hub → data/tldr/
    python configs/tldr/prepare.py --sft-source DIR --pref-source DIR  # local <split>.jsonl copies

Sources (as in the authors' code): the filtered Reddit TL;DR posts with their reference summaries
(``UCL-DARK/openai-tldr-filtered``: subreddit, title, post, summary) for SFT, and OpenAI's human comparisons
(``openai/summarize_from_feedback``, config ``comparisons``: info, summaries, choice) for preferences. The
prompt is ``SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:`` and a summary is its
continuation, with one leading space. Written to ``--out``:

* ``sft.jsonl``          ``{"prompt", "completion"}`` — filtered train split, for ``exoalign sft``;
* ``prompts_test.jsonl`` ``{"prompt"}`` — filtered test split, seeded order, for ``exoalign eval``;
* ``pairs_train.jsonl``, ``pairs_test.jsonl`` ``{"prompt", "chosen", "rejected"}`` — comparisons train /
  validation, for ``exoalign rm train``, the pref runs, and (deduplicated) the prompts ``exoalign sample`` uses.
  Comparisons without a Reddit post (the CNN/DM articles of the validation split) are left out.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def read_split(source: str, split: str, config: str | None = None) -> list[dict]:
    """Rows of ``split``: ``<source>/<split>.jsonl`` when ``source`` is a directory, else the hub dataset."""
    from exoalign.data import read_source

    local = Path(source)
    if local.is_dir():
        return read_source(local / f"{split}.jsonl")[0]
    import datasets

    return datasets.load_dataset(source, config, split=split).to_list()


def prompt_of(post: dict) -> str:
    return f"SUBREDDIT: r/{post['subreddit']}\nTITLE: {post['title']}\nPOST: {post['post']}\nTL;DR:"


def main(argv: list[str] | None = None) -> int:
    from exoalign.data import write_rows

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft-source", default="UCL-DARK/openai-tldr-filtered", help="hub dataset or directory")
    p.add_argument("--pref-source", default="openai/summarize_from_feedback", help="hub dataset or directory")
    p.add_argument("--out", default="data/tldr", help="output directory")
    p.add_argument("--limit", type=int, default=None, help="keep only this many rows per split (quick runs)")
    p.add_argument("--seed", type=int, default=42, help="seed of the test-prompt order")
    args = p.parse_args(argv)
    out, lim = Path(args.out), (lambda rows: rows[: args.limit] if args.limit else rows)

    train = [r for r in read_split(args.sft_source, "train") if r.get("post") and str(r.get("summary", "")).strip()]
    write_rows(out / "sft.jsonl", [{"prompt": prompt_of(r), "completion": " " + r["summary"].strip()} for r in lim(train)])
    test = [r for r in read_split(args.sft_source, "test") if r.get("post")]
    random.Random(args.seed).shuffle(test)
    write_rows(out / "prompts_test.jsonl", [{"prompt": prompt_of(r)} for r in lim(test)])

    for split, name in (("train", "pairs_train"), ("validation", "pairs_test")):
        pairs = []
        for row in read_split(args.pref_source, split, "comparisons"):
            info, texts = row["info"], [s["text"].strip() for s in row["summaries"]]
            if not info.get("post") or not all(texts) or texts[0] == texts[1]:
                continue
            choice = int(row["choice"])
            pairs.append({"prompt": prompt_of(info), "chosen": " " + texts[choice], "rejected": " " + texts[1 - choice]})
        write_rows(out / f"{name}.jsonl", lim(pairs))
        print(f"{split}: {len(lim(pairs))} comparisons → {out / name}.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
