"""Worker of tests/test_train_fsdp.py: 3 AdamW steps of exoalign's EXO loss, sharded by FSDP2 under torchrun
(each of 2 processes takes one of the 2 groups) or in one process (both groups); writes the losses as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from exoalign.models import build_model, tiny_config
from exoalign.packing import collate_groups
from exoalign.train.config import LossConfig
from exoalign.train.step import compute_loss

VOCAB = 61


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = build_model(tiny_config(VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=0), seed=0)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 3)]
    comps = [[torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in pair] for pair in ((4, 6), (5, 2))]
    rows = [rank] if world > 1 else [0, 1]
    batch = collate_groups([prompts[i] for i in rows], [comps[i] for i in rows], pad_id=1)
    batch["ref_logps"] = torch.tensor([[-20.0, -25.0], [-18.0, -14.0]])[rows]
    sharded = False
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        sharded = type(model.lm_head.weight).__name__ == "DTensor"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_cfg = LossConfig(name="exo", target="pref", beta_pi=0.1, eps=1e-3)
    losses = []
    for _ in range(3):
        loss, _ = compute_loss(model, batch, loss_cfg)  # mean over this process's groups
        loss.backward()  # FSDP2 averages the gradients over the processes: the mean over all groups
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"world": world, "sharded": sharded, "losses": losses}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: gloo's threads under FSDP2 on CPU sometimes abort a process there ("terminate
    # called without an active exception"), after all the work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
