"""π_sft's prompt caches of the demo's eval prompts: left-padded (each row computes the chat template's start and
its padding, the KL pass's layout before 2026-12-07) against the sampler's prefill (`prompt_prefill`: the shared
start once). ``python prefix_probe.py``"""

from __future__ import annotations

import torch
from probe_setup import setup, timed

from exoalign.logprobs import position_ids_from_mask
from exoalign.sampling import _shared_prefix_layout, prompt_prefill


def left_padded(model: torch.nn.Module, prompt_ids: list[list[int]], pad_id: int) -> None:
    from transformers import DynamicCache

    B, P = len(prompt_ids), max(map(len, prompt_ids))
    ids, mask = torch.full((B, P), pad_id), torch.zeros((B, P), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
    pos = position_ids_from_mask(mask)
    model.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                        cache=DynamicCache(config=model.config), use_cache=True)


def main() -> None:
    model, ids, pad = setup()
    lay, _, shared = _shared_prefix_layout(ids, pad)
    print(f"{len(ids)} prompts, {sum(map(len, ids))} tokens, {lengths(ids)}, shared start {shared}, layout {tuple(lay.shape)}")
    with torch.no_grad():
        for _ in range(3):
            (a,), (b,) = timed(lambda: left_padded(model, ids, pad), 1), timed(lambda: prompt_prefill(model, ids, pad), 1)
            print(f"left-padded {a:.3f} s  sampler's prefill {b:.3f} s")


def lengths(ids: list[list[int]]) -> str:
    return f"lengths {min(map(len, ids))}-{max(map(len, ids))}"


if __name__ == "__main__":
    main()
