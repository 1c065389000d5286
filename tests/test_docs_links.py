"""README.md, docs/ and the package READMEs refer only to repository files that exist.

Three kinds of reference are checked:

* Markdown links ``[text](target)`` (not web links or in-page anchors), relative to the document;
* paths that start with a top-level directory of the repository (``exoalign/…``, ``docs/…``, ``configs/…``,
  ``examples/…``, …), in backticks or plain text, relative to the repository root — braces expand
  (``configs/{imdb,tldr}/run.sh``), ``*`` globs, ``<placeholder>`` parts make a pattern;
* names of Markdown files (``DESIGN.md``), which must be found next to the document, at the root or in docs/ —
  except the files commands write (``frontier.md``, ``report.md``), which the text names as outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "exoalign").rglob("README.md")])
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in
             {"runs", "data", "results"} and not p.name.endswith(".egg-info")) + [".ci"]
OUTPUTS = {"frontier.md", "report.md", "results.md", "table.md"}
"""Markdown files that exoalign commands write (named in the docs as outputs, not as repository files)."""

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_TOPS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(r"(?<![\w./<>{}-])((?:" + _TOPS + r")/[\w./{},*<>-]*)")
MD_NAME = re.compile(r"(?<![\w/.<-])([\w-]+\.md)\b")


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[: m.start()] + alt + pattern[m.end():])]


def _exists(pattern: str, base: Path) -> bool:
    for p in _expand(pattern):
        p = re.sub(r"<[^<>]*>", "*", p)
        if "*" in p:
            if not any(base.glob(p)):
                return False
        elif not (base / p).exists():
            return False
    return True


def references(doc: Path) -> list[tuple[int, str, Path]]:
    """``(line, reference, base directory)`` for every reference to a repository file in ``doc``."""
    out = []
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            out.append((n, target.split("#")[0], doc.parent))
        text = LINK.sub(lambda m: " ", line)
        for path in PATH.findall(text):
            path = re.sub(r"[.,:;)]+$", "", path.split(":")[0])
            if path.rstrip("/") not in TOP:
                out.append((n, path, ROOT))
        for name in MD_NAME.findall(text):
            if name not in OUTPUTS:
                out.append((n, name, doc.parent))
    return out


def _found(ref: str, base: Path) -> bool:
    if _exists(ref, base):
        return True
    return "/" not in ref and ref.endswith(".md") and (_exists(ref, ROOT) or _exists(ref, ROOT / "docs"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_referenced_repository_file_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{n}: {ref}" for n, ref, base in references(doc) if not _found(ref, base)]
    assert not missing, "references to files the repository does not have:\n" + "\n".join(missing)


def test_the_checker_finds_missing_files(tmp_path):
    """A made-up document with one good and three bad references: exactly the bad ones are reported."""
    doc = tmp_path / "x.md"
    doc.write_text("See [losses](docs/losses.md), `exoalign/losses/core.py` and `configs/{imdb,tldr}/run.sh`.\n"
                   "Also (see DESIGN.md), [gone](nothing.md) and `exoalign/nowhere.py:fn`; outputs: `frontier.md`.\n",
                   encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "losses.md").write_text("")
    refs = references(doc)
    bad = [ref for n, ref, base in refs if not _found(ref, base if base != tmp_path else tmp_path)]
    assert sorted(bad) == ["DESIGN.md", "exoalign/nowhere.py", "nothing.md"]
    assert ("docs/losses.md" in [r for _, r, _ in refs]) and "frontier.md" not in [r for _, r, _ in refs]


def test_eval_batch_size_help_names_evals_own_keys():
    """eval has no `k`: its batch_size help speaks of samples_per_prompt (sample's keeps its k)."""
    from exoalign.config import field_help
    from exoalign.eval.evaluate import EvalConfig
    from exoalign.stages.sample import SampleConfig

    text = field_help(EvalConfig)["batch_size"]
    assert "samples_per_prompt" in text and not re.search(r"\bk\b", text)
    assert re.search(r"\bk\b", field_help(SampleConfig)["batch_size"])
