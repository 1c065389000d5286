"""``exoalign plot frontier``: one PNG and a Markdown table from several eval JSONs; bad input → exit 2."""

from __future__ import annotations

import json

import pytest

from exoalign.cli import main as cli


def _result(name, step, kl, k3, reward, wr):
    return {"checkpoint": f"/runs/{name}", "name": name, "step": step, "n_prompts": 64, "samples_per_prompt": 1,
            "reward": {"mean": reward, "ci_low": reward - 0.1, "ci_high": reward + 0.1},
            "kl": kl, "kl_se": 0.01, "kl_k3": k3, "kl_k3_se": 0.01,
            "win_rate": {"mean": wr, "ci_low": wr - 0.05, "ci_high": wr + 0.05, "wins": 1, "ties": 0, "losses": 1},
            "length": 10.0, "finished": 1.0}


def _eval_json(path, run, results):
    path.write_text(json.dumps({"schema": "exoalign.eval/1", "run": run, "complete": True, "confidence": 0.95,
                                "settings": {}, "baseline": None, "results": results}), encoding="utf-8")
    return path


@pytest.fixture()
def evals(tmp_path):
    exo = _eval_json(tmp_path / "exo.json", "exo", [
        _result("exo/final", None, 8.0, 7.5, 2.5, 0.81),
        _result("exo/checkpoint-100", 100, 2.0, 1.9, 1.25, 0.7),
        _result("exo/checkpoint-200", 200, 4.5, 4.2, 2.0, 0.75),
    ])
    dpo = _eval_json(tmp_path / "dpo.json", "dpo", [_result("dpo/checkpoint-100", 100, 3.0, 2.75, 1.0, 0.6)])
    return tmp_path, exo, dpo


def test_frontier_writes_png_and_table(evals):
    tmp, exo, dpo = evals
    png = tmp / "out" / "frontier.png"
    assert cli(["plot", "frontier", str(exo), str(dpo), "--output", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    lines = (tmp / "out" / "frontier.md").read_text().splitlines()
    assert len(lines) == 2 + 4
    # Rows of a run in step order (final last), numbers as given.
    assert lines[2].startswith("| exo | exo/checkpoint-100 | 100 | 2.000 | 1.900 | 1.250 | [1.150, 1.350] | 0.700 |")
    assert lines[3].startswith("| exo | exo/checkpoint-200 | 200 | 4.500 |")
    assert lines[4].startswith("| exo | exo/final | – | 8.000 | 7.500 | 2.500 |")
    assert lines[5].startswith("| dpo | dpo/checkpoint-100 | 100 | 3.000 | 2.750 | 1.000 |")
    assert not list((tmp / "out").glob("*.tmp*"))


def test_frontier_options(evals):
    tmp, exo, dpo = evals
    png, md = tmp / "k3.png", tmp / "table.md"
    assert cli(["plot", "frontier", str(exo), str(dpo), "-o", str(png), "--table", str(md), "--kl", "kl_k3",
                "--labels", "EXO (ours),DPO", "--title", "IMDB"]) == 0
    assert png.stat().st_size > 5000
    text = md.read_text()
    assert "| EXO (ours) | exo/final |" in text and "| DPO | dpo/checkpoint-100 |" in text


@pytest.mark.parametrize(
    "make, extra, needle",
    [
        (lambda t: t / "missing.json", [], "no such eval JSON"),
        (lambda t: (t / "bad.json").write_text("{not json") and t / "bad.json", [], "not JSON"),
        (lambda t: (t / "other.json").write_text('{"a": 1}') and t / "other.json", [], "not an eval JSON"),
        (lambda t: _eval_json(t / "empty.json", "e", []), [], "no evaluated checkpoints"),
        (lambda t: _eval_json(t / "nokl.json", "e", [{"name": "x", "reward": {"mean": 1}, "kl_k3": 1}]), [], "results[0].kl"),
        (lambda t: _eval_json(t / "ok.json", "e", [_result("a", 1, 1.0, 1.0, 1.0, 0.5)]), ["--output", "f.pdf"], ".png"),
        (lambda t: _eval_json(t / "ok.json", "e", [_result("a", 1, 1.0, 1.0, 1.0, 0.5)]), ["--labels", "a,b"], "labels"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, monkeypatch, make, extra, needle):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path)
    assert cli(["plot", "frontier", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.md"))


def test_one_json_holding_several_runs_is_split_by_run(tmp_path):
    """exoalign eval with checkpoints=[runs/sft/final, runs/exo] writes one JSON; each run gets its own line."""
    results = [dict(_result("sft/final", None, 0.0, 0.0, 0.5, 0.5), run="sft"),
               dict(_result("exo/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7), run="exo"),
               dict(_result("exo/final", None, 2.0, 1.8, 2.0, 0.8), run="exo")]
    path = _eval_json(tmp_path / "imdb.json", "imdb", results)
    assert cli(["plot", "frontier", str(path), "-o", str(tmp_path / "f.png")]) == 0
    rows = (tmp_path / "f.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0:2] for r in rows] == [["| sft", "sft/final"], ["| exo", "exo/checkpoint-10"],
                                                   ["| exo", "exo/final"]]
