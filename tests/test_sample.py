"""``exoalign sample``: seeded, batch-independent, resumable after an interruption or a SIGKILL, bad input → exit 2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from exoalign.cli import main as cli
from exoalign.config import stage_args
from exoalign.data import load_rows
from exoalign.errors import ConfigError
from exoalign.sampling import SeededSampler, completion_seed
from exoalign.stages import sample as sample_mod
from exoalign.stages.sample import SampleConfig


def _prompts(path, corpus, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = corpus[i % 8].split()
            f.write(json.dumps({"prompt": " ".join(words[: 2 + i % 4]) + f" {i}"}) + "\n")
    return path


def _sample(model_dir, prompts, out, *extra):
    args = [f"model={model_dir}", f"prompts={prompts}", f"output={out}", "k=3", "max_new_tokens=10",
            "temperature=0.9", "device=cpu", *extra]
    return cli(["sample", *args])


def test_seeded_sampler_draws_from_the_softmax():
    """Gumbel-max with per-row streams: 6000 rows over logits [2, 1, 0, -inf] must follow softmax([2, 1, 0])."""
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).repeat(6000, 1)
    out = SeededSampler([completion_seed(0, i, 0) for i in range(6000)], torch.device("cpu"))(None, logits)
    picked = out.argmax(-1)
    assert torch.all(out.max(-1).values == 0)  # exactly one finite (0) score per row
    freq = torch.bincount(picked, minlength=4).double() / 6000
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), -1).double()
    se = torch.sqrt(p * (1 - p) / 6000)
    assert freq[3] == 0  # a filtered (-inf) token is never drawn
    assert torch.all((freq[:3] - p).abs() < 4 * se), (freq, p)


def test_completion_seed_is_stable_and_distinct():
    assert completion_seed(0, 5, 1) == completion_seed(0, 5, 1)
    seeds = {completion_seed(s, i, j, st) for s in (0, 1) for i in range(20) for j in range(3) for st in ("", "b")}
    assert len(seeds) == 2 * 20 * 3 * 2


def test_sample_is_reproducible_and_independent_of_batch_size(tmp_path, tiny_model_dir, corpus):
    prompts = _prompts(tmp_path / "p.jsonl", corpus, 7)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert _sample(tiny_model_dir, prompts, a, "batch_size=4") == 0
    assert _sample(tiny_model_dir, prompts, b, "batch_size=3") == 0
    assert _sample(tiny_model_dir, prompts, c, "batch_size=4", "seed=1") == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    rows = load_rows(a, "group")  # valid group rows: 3 non-blank completions each, no rewards yet
    assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    assert all(len(r["completions"]) == 3 and r["rewards"] is None for r in rows)


def test_sample_stage_keeps_freed_memory_on_cpu(tmp_path, tiny_model_dir, corpus, monkeypatch):
    """The sample stage asks for glibc's kept-memory settings on CPU (exoalign.hardware), once it has a sampler."""
    calls = []
    monkeypatch.setattr(sample_mod, "keep_freed_memory", lambda **kw: calls.append(1) or True)
    prompts = _prompts(tmp_path / "p.jsonl", corpus, 3)
    assert _sample(tiny_model_dir, prompts, tmp_path / "a.jsonl") == 0
    assert calls == [1]


def test_interrupted_sample_resumes_without_duplicates(tmp_path, tiny_model_dir, corpus, monkeypatch):
    prompts = _prompts(tmp_path / "p.jsonl", corpus, 9)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert _sample(tiny_model_dir, prompts, ref, "batch_size=2") == 0

    real_append, calls = sample_mod.append_rows, []

    def append_then_die(path, rows):
        calls.append(len(rows))
        real_append(path, rows)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill after the second batch was written

    monkeypatch.setattr(sample_mod, "append_rows", append_then_die)
    assert _sample(tiny_model_dir, prompts, out, "batch_size=2") == 130
    monkeypatch.setattr(sample_mod, "append_rows", real_append)
    assert len(out.read_text().splitlines()) == 4
    with open(out, "ab") as f:  # a torn half line, as a kill in the middle of a write leaves
        f.write(b'{"prompt": "the movie", "completions": ["tor')
    # Resumed with another batch size: the rows must still be exactly the uninterrupted ones.
    assert _sample(tiny_model_dir, prompts, out, "batch_size=5") == 0
    assert out.read_bytes() == ref.read_bytes()
    # A second rerun has nothing left to do and leaves the file alone.
    assert _sample(tiny_model_dir, prompts, out, "batch_size=5") == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_sigkilled_sample_resumes(tmp_path, tiny_model_dir, corpus):
    """A real SIGKILL of the CLI process mid-run, then a resume: same rows as an uninterrupted run."""
    n = 30
    prompts = _prompts(tmp_path / "p.jsonl", corpus, n)
    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    args = [f"model={tiny_model_dir}", f"prompts={prompts}", f"output={out}", "k=2", "max_new_tokens=12",
            "device=cpu", "batch_size=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "exoalign", "sample", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < n, written
    assert _sample_args(args, "batch_size=16") == 0
    assert _sample_args([a.replace(str(out), str(ref)) for a in args], "batch_size=16") == 0
    assert out.read_bytes() == ref.read_bytes()
    assert len(load_rows(out, "group")) == n


def _sample_args(args, *extra):
    return cli(["sample", *args, *extra])


def test_changed_settings_are_refused_unless_overwrite(tmp_path, tiny_model_dir, corpus, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", corpus, 3)
    out = tmp_path / "o.jsonl"
    assert _sample(tiny_model_dir, prompts, out) == 0
    before = out.read_bytes()
    assert _sample(tiny_model_dir, prompts, out, "temperature=0.5") == 2
    assert "temperature" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _sample(tiny_model_dir, prompts, out, "temperature=0.5", "overwrite=true") == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize(
    "row_text, extra, needle",
    [
        ('{"prompt": ""}\n', [], "prompt"),  # empty prompt
        ('{"promt": "hi"}\n', [], "promt"),  # misspelt field
        ('{"prompt": "hi"\n', [], "malformed JSON"),
        ("", [], "empty"),
        ('{"prompt": "hi"}\n', ["k=1"], "k"),  # a group needs K >= 2
        ('{"prompt": "hi"}\n', ["temperature=0"], "temperature"),
        ('{"prompt": "hi"}\n', ["top_p=1.5"], "top_p"),
        ('{"prompt": "hi"}\n', ["tempreature=0.7"], "did you mean 'temperature'"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, capsys, row_text, extra, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(row_text, encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert _sample(tiny_model_dir, prompts, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists() and not (tmp_path / "o.jsonl.meta.json").exists()


def test_missing_files_exit_2(tmp_path, tiny_model_dir, capsys):
    assert _sample(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "o.jsonl") == 2
    assert "nope.jsonl" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert _sample(tmp_path / "no-model", prompts, tmp_path / "o.jsonl") == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_flag_style_arguments_are_config_keys():
    cfg = stage_args("t", SampleConfig, ["--model", "m", "--top-k=5", "--overwrite", "temperature=0.7"])
    assert (cfg.model, cfg.top_k, cfg.overwrite, cfg.temperature) == ("m", 5, True, 0.7)
    assert math.isclose(SampleConfig().temperature, 1.0)
    with pytest.raises(ConfigError, match="did you mean"):
        stage_args("t", SampleConfig, ["--temprature", "0.7"])


def test_vllm_backend_requests_and_outputs(monkeypatch, tiny_tokenizer):
    """vLLM is not installed here: a stand-in module records the requests the sampler makes and returns outputs
    shaped like vLLM's, to check per-prompt seeds and the EOS bookkeeping of the output conversion."""
    from types import ModuleType, SimpleNamespace

    from exoalign.sampling import SamplingSettings, VLLMSampler, resolve_backend

    assert resolve_backend("auto") == "hf"
    with pytest.raises(ConfigError, match="vllm"):
        resolve_backend("vllm")
    eos, calls = tiny_tokenizer.eos_token_id, {}
    fake = ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["engine"] = kw

        def generate(self, prompts, params, use_tqdm=False):
            calls.setdefault("params", []).extend(params)
            outs = [SimpleNamespace(token_ids=[60, 61], finish_reason="length"),
                    SimpleNamespace(token_ids=[62, eos], finish_reason="stop"),
                    SimpleNamespace(token_ids=[63], finish_reason="stop")]
            return [SimpleNamespace(outputs=outs[: p.kw["n"]]) for p in params]

    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    settings = SamplingSettings(temperature=0.7, max_new_tokens=9, seed=3, gpu_memory_utilization=0.5)
    sampler = VLLMSampler("some/model", tiny_tokenizer, settings, dtype="bf16")
    assert calls["engine"]["dtype"] == "bfloat16" and calls["engine"]["gpu_memory_utilization"] == 0.5
    groups = sampler.generate([[1, 2], [3]], [4, 9], 3)
    sampler.generate([[3]], [9], 3)  # the same prompt in another batch gets the same request
    p = calls["params"]
    assert p[0].kw["n"] == 3 and p[0].kw["top_k"] == -1 and p[0].kw["max_tokens"] == 9 and p[0].kw["temperature"] == 0.7
    assert p[1].kw == p[2].kw and p[0].kw["seed"] != p[1].kw["seed"]
    first = groups[0]
    assert (first[0].ids, first[0].finished) == ([60, 61], False)
    assert (first[1].ids, first[1].finished) == ([62, eos], True)
    assert (first[2].ids, first[2].finished) == ([63, eos], True)  # the stop event is added when vLLM left it out
    assert first[1].text == tiny_tokenizer.decode([62])
