"""Three estimators of KL(π_θ ‖ π_sft) on the same bf16 samples of π_θ (37 demo eval prompts × K, 24 tokens), for
π_θ = π_sft's bf16 copy with its weight matrices perturbed by ``scale`` × each matrix's SD (0: a copy, true KL 0):

* sampler: log π_θ from the sampler's decode, log π_sft from the KL pass on kept prompt caches (eval before 9c554a8)
* tail: both from the KL pass (PrefixCachedLogps), one computation for both models (eval since 9c554a8)
* fp32: both from full fp32 forwards of the two models' bf16 weights (the reference)

``K=8 PYTHONPATH=. python kl_est.py 0 0.01 0.015``"""

from __future__ import annotations

import copy
import os
import sys

import torch
from probe_setup import setup

from exoalign.eval.evaluate import completion_logps
from exoalign.eval.reference import PrefixCachedLogps
from exoalign.models import load_tokenizer
from exoalign.sampling import HFSampler, SamplingSettings, pack_linears
from exoalign.zoo import resolve_model_path


def est(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).flatten()
    return f"{d.mean().item():+.4f} (se {d.std().item() / len(d) ** 0.5:.4f})"


def main() -> None:
    sft, ids, pad = setup()
    tok = load_tokenizer(resolve_model_path("smollm2"), padding_side="left")
    s = SamplingSettings(temperature=1.0, max_new_tokens=24, min_new_tokens=1, seed=1000, sample_dtype="bfloat16")
    k = int(os.environ.get("K", 4))
    for scale in (float(x) for x in sys.argv[1:]):
        pol = copy.deepcopy(sft)
        if scale:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in pol.named_parameters():
                    if p.dim() == 2 and "embed" not in n:
                        p.add_((torch.randn(p.shape, generator=g) * p.float().std() * scale).to(p.dtype))
            pack_linears(pol)
        groups = HFSampler(pol, tok, s, stream="policy").generate(ids, list(range(len(ids))), k)
        comps = [[c.ids for c in g] for g in groups]
        lp_dec = torch.tensor([[sum(c.logps) for c in g] for g in groups], dtype=torch.float64)
        lp_sft = torch.from_numpy(PrefixCachedLogps(sft, pad, 1.0)(ids, comps))
        lp_pol = torch.from_numpy(PrefixCachedLogps(pol, pad, 1.0)(ids, comps))
        pol32, sft32 = copy.deepcopy(pol).float(), copy.deepcopy(sft).float()
        for m in (pol32, sft32):
            m.config._attn_implementation = "sdpa"
        lp_pol32 = torch.from_numpy(completion_logps(pol32, ids, groups, temperature=1.0, batch_size=64, pad_id=pad))
        lp_sft32 = torch.from_numpy(completion_logps(sft32, ids, groups, temperature=1.0, batch_size=64, pad_id=pad))
        fp = lp_pol32 - lp_sft32
        print(f"scale {scale}: fp32 {est(lp_pol32, lp_sft32)}  sampler {est(lp_dec, lp_sft)}  tail {est(lp_pol, lp_sft)}"
              f"  | paired vs fp32: sampler {est(lp_dec - lp_sft, fp)}  tail {est(lp_pol - lp_sft, fp)}")
        print(f"   vs fp32 per sequence: sampler-θ sd {(lp_dec - lp_pol32).std().item():.3f} mean "
              f"{(lp_dec - lp_pol32).mean().item():+.4f}; tail-θ sd {(lp_pol - lp_pol32).std().item():.3f} mean "
              f"{(lp_pol - lp_pol32).mean().item():+.4f}; tail-sft sd {(lp_sft - lp_sft32).std().item():.3f} mean "
              f"{(lp_sft - lp_sft32).mean().item():+.4f}")


if __name__ == "__main__":
    main()
