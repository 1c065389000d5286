"""Feasibility probe, not library code: the bf16 sampling copy's decode steps under ``torch.compile``, with the
packed products behind a custom op (``probe::packed_linear``: the packed oneDNN weight, which dynamo cannot take
as a graph input, is looked up by an integer key inside the op; its fake returns the product's shape).

    python probe.py eager|compiled ROWS_PER_CALL CALLS NEW_TOKENS THREADS

``compiled`` wraps the copy's top-level ``forward`` in ``torch.compile(dynamic=True)`` (the decode steps; the
prefill runs the decoder alone and stays eager) and times the first call, which compiles; then both modes time
3 runs of CALLS calls of ROWS_PER_CALL prompts × K = 4.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "product-threads-2026-12-08"))
from common import bf16_sampler  # noqa: E402

import exoalign.sampling as S  # noqa: E402

MODE = sys.argv[1]
ROWS, CALLS, NEW, THREADS = (int(a) for a in sys.argv[2:6])
PACKED: dict[int, torch.Tensor] = {}


@torch.library.custom_op("probe::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, PACKED[key], None, "none", [], "")


@packed_linear.register_fake
def _(x, weight, key):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


eager_call = S._PackedForward.__call__


def call(self, x):
    if torch.compiler.is_compiling():
        return torch.ops.probe.packed_linear(x, self.module.weight, self.key)
    return eager_call(self, x)


def main():
    S._PackedForward.__call__ = call
    sampler, prompts = bf16_sampler(ROWS, CALLS, NEW, THREADS)
    sm = sampler.sampling_model
    for i, m in enumerate(sm.modules()):
        f = m.__dict__.get("forward")
        if isinstance(f, S._PackedForward):
            assert f.module.bias is None
            f.key = i
            PACKED[i] = f.packed
    if MODE == "compiled":
        t = time.perf_counter()
        sm.forward = torch.compile(sm.forward, dynamic=True)
        with torch.inference_mode():
            sampler.generate(prompts[:ROWS], list(range(ROWS)), 4)
        print("first compiled call", round(time.perf_counter() - t, 1), "s", flush=True)
    with torch.inference_mode():
        for r in range(3):
            t = time.perf_counter()
            n = 0
            for j in range(CALLS):
                idx = list(range(ROWS * j, ROWS * j + ROWS))
                n += sum(len(c.ids) for g in sampler.generate([prompts[i] for i in idx], idx, 4) for c in g)
            print(MODE, "run", r, round(time.perf_counter() - t, 3), "s", n, "tokens", flush=True)


if __name__ == "__main__":
    main()
