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


def _eval_json(path, run, results, baseline=None, **settings):
    path.write_text(json.dumps({"schema": "exoalign.eval/1", "run": run, "complete": True, "confidence": 0.95,
                                "settings": settings, "baseline": baseline, "results": results}), encoding="utf-8")
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
    """exoalign eval with checkpoints=[runs/sft/final, runs/exo] writes one JSON: π_sft is listed once, as the
    step-0 point, not as a run of its own; the exo run gets its own rows."""
    results = [dict(_result("sft/final", None, 0.0, 0.0, 0.5, 0.5), run="sft", checkpoint="runs/sft/final"),
               dict(_result("exo/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7), run="exo"),
               dict(_result("exo/final", None, 2.0, 1.8, 2.0, 0.8), run="exo")]
    path = _eval_json(tmp_path / "imdb.json", "imdb", results, sft_model="runs/sft/final")
    assert cli(["plot", "frontier", str(path), "-o", str(tmp_path / "f.png")]) == 0
    rows = (tmp_path / "f.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0:3] for r in rows] == [["| π_sft", "sft/final", "0"], ["| imdb", "exo/checkpoint-10", "10"],
                                                   ["| imdb", "exo/final", "–"]]


def _runs(paths, labels=None):
    from exoalign.eval.plots import collect

    return collect([str(p) for p in paths], labels)[0]


def test_sft_is_the_step_0_point_of_every_run(tmp_path):
    """π_sft evaluated once (its own JSON) starts the line of every run that measured KL against it."""
    sft = _eval_json(tmp_path / "sft.json", "sft", [dict(_result("sft/final", None, 0.0, 0.0, 0.25, 0.5),
                                                         checkpoint="runs/sft/final")], sft_model="runs/sft/final")
    exo = _eval_json(tmp_path / "exo.json", "exo", [_result("exo/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7)],
                     sft_model="runs/sft/./final")
    dpo = _eval_json(tmp_path / "dpo.json", "dpo", [_result("dpo/checkpoint-10", 10, 2.0, 1.9, 1.0, 0.6)],
                     sft_model="runs/sft/final")
    runs = _runs([sft, exo, dpo])
    assert [label for label, _ in runs] == ["exo", "dpo"]  # no run called sft
    for _, data in runs:
        first = data["results"][0]
        assert first["sft"] and first["step"] == 0 and first["reward"]["mean"] == 0.25 and first["kl"] == 0.0
        assert len(data["results"]) == 2
    png = tmp_path / "f.png"
    assert cli(["plot", "frontier", str(sft), str(exo), str(dpo), "-o", str(png)]) == 0
    rows = (tmp_path / "f.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| π_sft", "| exo", "| dpo"]


def test_sft_point_from_the_baseline_when_not_evaluated(tmp_path):
    """Without a π_sft result, the eval's baseline (π_sft's own samples) gives the step-0 point, at KL 0."""
    path = _eval_json(tmp_path / "exo.json", "exo", [_result("exo/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7)],
                      sft_model="runs/sft/final",
                      baseline={"model": "runs/sft/final", "reward": {"mean": 0.125, "ci_low": 0.0, "ci_high": 0.25},
                                "rewards": [[0.125]]})
    (label, data), = _runs([path])
    first = data["results"][0]
    assert label == "exo" and first["sft"] and (first["kl"], first["kl_k3"], first["reward"]["mean"]) == (0.0, 0.0, 0.125)
    # A baseline that is another model is not π_sft: no step-0 point is invented.
    other = _eval_json(tmp_path / "o.json", "o", [_result("o/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7)],
                       sft_model="runs/sft/final", baseline={"model": "runs/other", "reward": {"mean": 0.5}})
    (_, data), = _runs([other])
    assert [r["name"] for r in data["results"]] == ["o/checkpoint-10"]


def test_final_equal_to_last_checkpoint_is_drawn_once(tmp_path):
    results = [_result("exo/checkpoint-100", 100, 2.0, 1.9, 1.25, 0.7),
               _result("exo/checkpoint-200", 200, 4.5, 4.2, 2.0, 0.75),
               dict(_result("exo/final", 200, 4.5, 4.2, 2.0, 0.75), checkpoint="/runs/exo/final")]
    path = _eval_json(tmp_path / "exo.json", "exo", results)
    (_, data), = _runs([path])
    assert [r["name"] for r in data["results"]] == ["exo/checkpoint-100", "exo/checkpoint-200"]
    assert data["results"][1]["final"] is True
    assert cli(["plot", "frontier", str(path), "-o", str(tmp_path / "f.png")]) == 0
    rows = (tmp_path / "f.md").read_text().splitlines()[2:]
    assert len(rows) == 2 and "| exo/checkpoint-200 (= final) | 200 |" in rows[1]
    # A final that went further than the last checkpoint is a point of its own.
    results[2] = dict(_result("exo/final", 250, 5.0, 4.6, 2.1, 0.8), checkpoint="/runs/exo/final")
    (_, data), = _runs([_eval_json(tmp_path / "exo2.json", "exo", results)])
    assert [r["name"] for r in data["results"]][-1] == "exo/final" and not data["results"][1].get("final")


def test_axes_have_units_and_name_the_judge(tmp_path, monkeypatch):
    """x: KL in nats with its estimator; y: the reward named by the oracle or reward model that gave it."""
    import matplotlib.axes

    seen = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, s, *a, **k: seen.setdefault("x", s))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, s, *a, **k: seen.setdefault("y", s))
    path = _eval_json(tmp_path / "exo.json", "exo", [_result("exo/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7)],
                      oracle="examples/my_reward.py:score")
    assert cli(["plot", "frontier", str(path), "-o", str(tmp_path / "f.png"), "--kl", "kl_k3"]) == 0
    assert "nats" in seen["x"] and "k3" in seen["x"] and "π_sft" in seen["x"]
    assert "oracle my_reward.py:score" in seen["y"] and "95% CI" in seen["y"]
    seen.clear()
    path = _eval_json(tmp_path / "rm.json", "rm", [_result("rm/checkpoint-10", 10, 1.0, 0.9, 1.5, 0.7)],
                      reward_model="runs/rm/final")
    assert cli(["plot", "frontier", str(path), "-o", str(tmp_path / "g.png")]) == 0
    assert "k1" in seen["x"] and "nats" in seen["x"] and "reward model rm/final" in seen["y"]
