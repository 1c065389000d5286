"""The eval's π_sft work done once per process: the KL pass on kept prompt KV caches equals a full forward pass,
and a warm cache gives exactly the numbers of a cold one (the kept caches are the same computation)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from numerics import assert_close_scaled, rel_tol
from test_eval import JUDGE

from exoalign.cli import main as cli
from exoalign.eval import evaluate as eval_mod
from exoalign.eval.evaluate import completion_logps
from exoalign.eval.reference import PrefixCachedLogps
from exoalign.models import build_model, tiny_config
from exoalign.sampling import Completion

PROMPTS = [[5, 6, 7, 8], [9], [10, 11]]  # [9]: a one-token prompt has no prefix to keep
LENGTHS = [[3, 5], [1, 4], [6, 2]]  # completion lengths, k = 2 per prompt


def _model(model_type: str) -> torch.nn.Module:
    kw = {} if model_type == "gpt2" else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256)
    return build_model(tiny_config(300, model_type=model_type, **kw), seed=0).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prefix_cached_logps_equal_a_full_forward(model_type):
    """Summed log-probs from (prompt KV cache + completion pass) equal ``completion_logps``'s full forward pass;
    the second call reuses the cache and gives bitwise the same numbers."""
    model = _model(model_type)
    g = torch.Generator().manual_seed(0)
    ids = [[torch.randint(1, 300, (n,), generator=g).tolist() for n in ns] for ns in LENGTHS]
    groups = [[Completion(ids=c, text="", finished=False) for c in grp] for grp in ids]
    full = completion_logps(model, PROMPTS, groups, temperature=0.8, batch_size=16, pad_id=0)  # (3, 2)
    ref = PrefixCachedLogps(model, 0, 0.8)
    cold, warm = ref(PROMPTS, ids), ref(PROMPTS, ids)
    assert (ref.misses, ref.hits) == (1, 1) and ref.kept_bytes > 0
    assert np.array_equal(cold, warm)
    # Same fp32 sums in another association (cached K/V, shorter rows): per-token rounding ~ eps·√(H + V)
    # relative to |log p| ≈ log V, summed over ≤ 6 tokens; tolerance against the largest |sum|.
    assert_close_scaled(torch.from_numpy(cold), torch.from_numpy(full), rel_tol(torch.float32, 64 + 300 + 6))
    none = PrefixCachedLogps(model, 0, 0.8, budget_mb=0)  # nothing kept: same numbers, recomputed every time
    assert np.array_equal(none(PROMPTS, ids), cold) and none.kept_bytes == 0 and not none._kept


@pytest.fixture()
def setup(tmp_path, tiny_model_dir, tiny_tokenizer, corpus, monkeypatch):
    (tmp_path / "judge.py").write_text(JUDGE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(c.split()[:3]) + f" {i}"}) + "\n"
                               for i, c in enumerate(corpus[:10])), encoding="utf-8")
    others = []
    for seed in (7, 8):
        other = tmp_path / f"other{seed}"
        build_model(tiny_config(len(tiny_tokenizer)), seed=seed, tokenizer=tiny_tokenizer).save_pretrained(other)
        tiny_tokenizer.save_pretrained(other)
        others.append(other)
    return tmp_path, prompts, tiny_model_dir, others


def _eval(sft, prompts, out, checkpoints, *extra):
    return cli(["eval", f"checkpoints=[{','.join(map(str, checkpoints))}]", f"sft_model={sft}",
                f"prompts={prompts}", "oracle=judge:noise", f"output={out}", "max_new_tokens=6", "batch_size=4",
                "temperature=0.8", "device=cpu", "samples_per_prompt=2", *extra])


def test_eval_cache_gives_the_numbers_of_recomputing(setup):
    """Two eval calls in one process share π_sft's prompt caches (π_sft's own sampling takes its prefill from them)
    and own samples; a third, after the process cache is dropped, recomputes everything: all three give identical
    results, and every checkpoint has timings."""
    tmp, prompts, sft, (a, b) = setup
    eval_mod._SFT_KEPT.clear()
    assert _eval(sft, prompts, tmp / "first.json", [sft, a]) == 0
    (kept,) = eval_mod._SFT_KEPT.values()
    (ref,) = kept.ref.values()
    # 10 prompts in batches of 4, computed once, for the baseline's samples; π_sft's samples and a's KL pass reuse
    assert ref.misses == 3 and ref.hits == 6
    assert _eval(sft, prompts, tmp / "warm.json", [sft, a, b]) == 0
    assert ref.misses == 3 and ref.hits == 12  # checkpoints a and b of the second call: every batch kept
    eval_mod._SFT_KEPT.clear()
    assert _eval(sft, prompts, tmp / "cold.json", [sft, a, b]) == 0
    first, warm, cold = (json.loads((tmp / f"{n}.json").read_text()) for n in ("first", "warm", "cold"))
    assert warm["results"] == cold["results"] and warm["baseline"] == cold["baseline"]
    assert warm["results"][:2] == first["results"] and warm["results"][0]["kl"] == 0
    assert warm["results"][1]["kl"] > 0 and warm["results"][2]["kl"] > 0
    sft_name = warm["results"][0]["name"]
    assert warm["timings"][sft_name]["cached"] and warm["timings"]["baseline"]["cached"]
    assert not cold["timings"][sft_name].get("cached")
    for t in (cold["timings"][r["name"]] for r in cold["results"]):
        assert 0 < t["generation_s"] <= t["total_s"] and t["kl_s"] >= 0 and t["score_s"] >= 0
    for name in ("first", "warm", "cold"):
        samples = tmp / f"{name}.samples"
        assert (samples / f"{eval_mod._safe(warm['results'][1]['name'])}.jsonl").is_file()


def test_eval_in_bf16_measures_the_bf16_models(setup):
    """sample_dtype=bfloat16: the checkpoints sample from bf16 weights, log π_θ is the sampler's (bf16) and
    π_sft's pass runs on π_sft's bf16 copy (made once), so π_θ = π_sft gives exactly 0 and π_θ ≠ π_sft more."""
    tmp, prompts, sft, (a, _) = setup
    eval_mod._SFT_KEPT.clear()
    out = tmp / "bf16.json"
    assert _eval(sft, prompts, out, [sft, a], "sample_dtype=bfloat16", "win_rate=false") == 0
    data = json.loads(out.read_text())
    assert data["settings"]["sample_dtype"] == "bfloat16"
    r_sft, r_a = data["results"]
    assert r_sft["kl"] == 0 and r_a["kl"] > 0 and r_a["kl_k3"] > 0
    (kept,) = eval_mod._SFT_KEPT.values()
    assert set(kept.copies) == {"bfloat16"} and next(kept.copies["bfloat16"].parameters()).dtype == torch.bfloat16
    (ref,) = kept.ref.values()
    assert ref.model is kept.copies["bfloat16"] and ref.misses == 3
    fp32 = tmp / "fp32.json"
    assert _eval(sft, prompts, fp32, [sft, a], "win_rate=false") == 0
    assert json.loads(fp32.read_text())["results"][1]["kl"] != r_a["kl"]  # other samples: the fp32 models'


def test_a_copy_of_sft_measured_in_bf16_has_kl_zero(setup, monkeypatch):
    """bf16 evaluation of a copy of π_sft (another path, so it is sampled and scored as a checkpoint): π_θ's
    log-probs come from the KL pass's computation, the one π_sft's take, so the KL is exactly 0. The sampler's
    own log-probs (its decode rounds differently) would make it positive: the bias :meth:`_Session.policy_pass`
    removes. In fp32 the sampler's numbers are used and agree with the pass to rounding."""
    tmp, prompts, sft, _ = setup
    copy = tmp / "sft_copy"
    shutil.copytree(sft, copy)
    results = {}
    for name, extra, patched in (("bf16", ["sample_dtype=bfloat16"], False), ("bf16_sampler", ["sample_dtype=bfloat16"], True),
                                 ("fp32", [], False)):
        eval_mod._SFT_KEPT.clear()
        with monkeypatch.context() as m:
            if patched:  # the pre-change path: log π_θ from the sampler's decode
                m.setattr(eval_mod._Session, "policy_pass", lambda self, policy: False)
            assert _eval(sft, prompts, tmp / f"{name}.json", [copy], "win_rate=false", *extra) == 0
        results[name] = json.loads((tmp / f"{name}.json").read_text())["results"][0]
    assert results["bf16"]["kl"] == 0 and results["bf16"]["kl_k3"] == 0
    assert results["bf16_sampler"]["kl"] != 0  # the decode's rounding against the pass's
    assert results["bf16"]["reward"] == results["bf16_sampler"]["reward"]  # the same samples
    # fp32: ~1e-7 per token between the decode and the pass, over ≤ 6 tokens; the tolerance is far above that
    assert abs(results["fp32"]["kl"]) < 1e-4
