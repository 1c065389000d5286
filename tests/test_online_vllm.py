"""Online sampling with a colocated vLLM engine (``online.backend=vllm``), checked on the CPU against a stand-in
``vllm`` module with vLLM's interface (``LLM.generate``, ``SamplingParams``, ``load_weights`` through the model
executor): the policy's weights are pushed in at each round start, the round samples what the engine draws, and
``log μ`` is recomputed by the training model on exactly those ids. The ``cuda`` test runs the path on a GPU
(``benchmarks/gpu_check.sh``): with vllm installed it samples with vLLM, without it ``auto`` falls back to HF
and the test says so."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exoalign.config import load_config
from exoalign.errors import ConfigError
from exoalign.models import load_causal_lm, load_tokenizer
from exoalign.online import rounds as online
from exoalign.online.colocated import online_backend, policy_weights
from exoalign.online.rounds import policy_table
from exoalign.sampling import HFSampler, SamplingSettings
from exoalign.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
ORACLE = '''
def f(prompts, completions):
    return [10.0 * c.count("e") / (1 + len(c)) for c in completions]
'''


# ------------------------------------------------------------------------------------------ the stand-in
@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None


class _EngineModel:
    """What ``model_runner.model`` is in vLLM: takes ``(HF name, tensor)`` pairs in ``load_weights``."""

    def __init__(self, hf: torch.nn.Module) -> None:
        self.hf, self.snapshots = hf, []

    def load_weights(self, weights):
        own = self.hf.state_dict()
        got = {}
        for name, tensor in weights:
            assert name in own, f"vLLM would not know {name}"
            own[name].copy_(tensor)
            got[name] = tensor.detach().clone()
        assert set(got) == set(own)  # every weight pushed
        self.snapshots.append(got)
        return set(got)


class LLM:
    """Samples with the HF model inside (its own copy, loaded from ``model``, as vLLM loads its own)."""

    instances: list[LLM] = []

    def __init__(self, model, tokenizer, dtype, seed, gpu_memory_utilization, trust_remote_code, **kw):
        self.kwargs = {"dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization, **kw}
        self.tok = load_tokenizer(tokenizer)
        runner = types.SimpleNamespace(model=_EngineModel(load_causal_lm(model).eval()))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.params, self.drawn = [], []
        LLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=False):
        hf = self.llm_engine.model_executor.driver_worker.model_runner.model.hf
        out = []
        for prompt, p in zip(prompts, params):
            self.params.append(p)
            s = SamplingSettings(temperature=p.temperature, max_new_tokens=p.max_tokens, seed=p.seed)
            group = HFSampler(hf, self.tok, s, stream="stand-in").generate([prompt["prompt_token_ids"]], [0], p.n)[0]
            self.drawn.append([c.ids for c in group])
            # vLLM lists the tokens without the stop token and says why it stopped
            outputs = [types.SimpleNamespace(token_ids=c.ids[:-1] if c.finished else c.ids,
                                             finish_reason="stop" if c.finished else "length") for c in group]
            out.append(types.SimpleNamespace(outputs=outputs))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    LLM.instances.clear()
    return module


def _cfg(tmp_path: Path, *extra: str) -> TrainConfig:
    (tmp_path / "oracle.py").write_text(ORACLE, encoding="utf-8")
    base = [f"train.output_dir={tmp_path / 'run'}", f"train.ref_cache_dir={tmp_path / 'cache'}", "train.log_every=1",
            "train.warmup_steps=0", "train.lr=1e-3", "data.eval_fraction=0", "loss.beta_pi=1.0", "online.rounds=2",
            "online.k=4", "online.prompts_per_round=8", "online.steps_per_round=2", "online.max_new_tokens=12",
            "online.temperature=0.9", "loss.temperature=0.9", f"online.oracle={tmp_path / 'oracle.py'}:f"]
    return load_config(TrainConfig, SMOKE, base + list(extra))


# ------------------------------------------------------------------------------------------------ tests
def test_backend_choice():
    cpu = torch.device("cpu")
    assert online_backend("auto", cpu) == "hf" and online_backend("hf", cpu) == "hf"
    with pytest.raises(ConfigError) as e:
        online_backend("vllm", cpu)
    assert e.value.field == "online.backend"
    if importlib.util.find_spec("vllm") is None:
        assert online_backend("auto", torch.device("cuda")) == "hf"


def test_weights_are_pushed_at_each_round_start_and_logps_recomputed(tmp_path, fake_vllm, monkeypatch):
    """2 rounds × 2 steps: the engine gets π_0 (= the init weights) before round 0 and the weights of
    the policy after round 0 before round 1, every parameter by its HF name; each round's ids are
    exactly what the engine drew (EOS appended where it stopped), drawn with SamplingParams at the online
    temperature and no top-k/top-p; the round's log μ equals the training model's log-probs of those ids at
    that temperature (recomputed here from those weights, same code, same batches: bit-identical)."""
    monkeypatch.setattr(online, "online_backend", lambda backend, device: "vllm")
    at_start, real = [], online.Rounds.sample

    def sample(self, r):  # the policy's weights as each round starts sampling
        at_start.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real(self, r)

    monkeypatch.setattr(online.Rounds, "sample", sample)
    final = online.train_online(_cfg(tmp_path, "online.backend=vllm"))
    run = final.parent
    (llm,) = LLM.instances
    engine = llm.llm_engine.model_executor.driver_worker.model_runner.model
    assert len(engine.snapshots) == len(at_start) == 2
    init = load_causal_lm(str(run / "init")).state_dict()
    assert all(torch.equal(at_start[0][k], init[k]) for k in init)  # round 0 samples π_0 = π_sft
    assert not all(torch.equal(at_start[1][k], init[k]) for k in init)  # round 1: the policy after round 0
    for snap, want in zip(engine.snapshots, at_start):
        assert all(torch.equal(snap[k], want[k]) for k in want)
    assert all(p.temperature == 0.9 and p.top_k == -1 and p.top_p == 1.0 and p.n == 4 for p in llm.params)
    record = json.loads((run / "online" / "round-00001.json").read_text())
    assert record["completion_ids"] == llm.drawn[8:]
    model = load_causal_lm(str(run / "init"))
    model.load_state_dict(at_start[1])
    feats = [{"index": n, "prompt_ids": p, "completion_ids": c, "rewards": None}
             for n, (p, c) in enumerate(zip(record["prompt_ids"], record["completion_ids"]))]
    tok = load_tokenizer(str(run / "init"))
    mu = policy_table(model, feats, tok.pad_token_id, batch_size=8, temperature=0.9)  # (N, K)
    assert mu.tolist() == record["sampler_logps"]
    assert load_file(str(final / "model.safetensors")).keys()


def test_policy_weights_of_a_lora_policy_are_the_merged_base_names(tiny_model):
    """With LoRA the engine gets the base model's names (no lora_ tensors, no base_layer) holding W + BA."""
    from peft import LoraConfig, get_peft_model

    names = set(tiny_model.state_dict())
    peft = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.merge_adapter()
    try:
        pushed = dict(policy_weights(peft))
        merged = {k: v.clone() for k, v in pushed.items()}
    finally:
        peft.unmerge_adapter()
    assert set(pushed) == names
    base = peft.get_base_model()
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        want = peft(x).logits
        with peft.disable_adapter():
            plain = base(x).logits
        m = type(base)(base.config)
        m.load_state_dict(merged)
        got = m.eval()(x).logits
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 W + BA vs W x + B(A x): reassociation only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_online_round_on_cuda_with_the_auto_backend(tmp_path, capsys):
    """On a GPU, online.backend=auto samples with vLLM when it is installed, else with HF; either way the round's
    log μ is the training model's, recomputed on the sampled ids."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    with capsys.disabled():
        print(f"\nonline vLLM path: {'vllm installed: sampling with vLLM' if has_vllm else 'vllm unavailable: HF path'}")
    cfg = _cfg(tmp_path, "train.cpu=false", "online.rounds=1", "online.gpu_memory_utilization=0.3")
    final = online.train_online(cfg)
    record = json.loads((final.parent / "online" / "round-00000.json").read_text())
    assert len(record["completion_ids"]) == 8 and all(len(g) == 4 for g in record["completion_ids"])
    tok = load_tokenizer(str(final.parent / "init"))
    model = load_causal_lm(str(final.parent / "init")).cuda()
    feats = [{"index": n, "prompt_ids": p, "completion_ids": c, "rewards": None}
             for n, (p, c) in enumerate(zip(record["prompt_ids"], record["completion_ids"]))]
    mu = policy_table(model, feats, tok.pad_token_id, batch_size=8, temperature=0.9)
    # Same weights (π_0 = init), same code; cuDNN/cuBLAS may pick other kernels between calls: sums of ≤ 12
    # fp32 log-probs of magnitude ≤ 70 differ by a few ulps (7.6e-6 each).
    torch.testing.assert_close(mu, torch.tensor(record["sampler_logps"]), rtol=0, atol=1e-4)
