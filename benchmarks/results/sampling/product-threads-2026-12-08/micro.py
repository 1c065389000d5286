"""Small decode operators on one thread against two (``OMP_WAIT_POLICY=PASSIVE``): a bf16 ``silu`` of
``[ROWS, 1 536]`` and one layer's decode attention (``exoalign.attention._decode_attention``, 9 query / 3
key-value heads of 64, 62 keys, 50 of them allowed), medians of 5 × 200 calls, in µs.

    python micro.py
"""

import time

import torch
from common import bench

from exoalign.attention import _decode_attention


def main():
    L = 62
    for rows in (12, 32, 256):
        x = torch.randn(rows, 1536).bfloat16()
        q = torch.randn(rows, 9, 1, 64).bfloat16()
        k = torch.randn(rows, 3, L, 64).bfloat16()
        v = torch.randn(rows, 3, L, 64).bfloat16()
        mask = torch.ones(rows, 1, 1, L, dtype=torch.bool)
        mask[..., 50:] = False
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                silu = bench(lambda x=x: torch.nn.functional.silu(x))
                attn = bench(lambda q=q, k=k, v=v, mask=mask: _decode_attention(None, q, k, v, mask, 0.125))
            out.append(f"{threads} thread(s): silu {silu:.1f}, attention {attn:.1f}")
        print(f"{rows} rows: " + "; ".join(out), flush=True)
    torch.set_num_threads(2)
    t = time.perf_counter()
    for _ in range(10000):
        torch.set_num_threads(1)
        torch.set_num_threads(2)
    print(f"torch.set_num_threads: {(time.perf_counter() - t) / 20000 * 1e6:.2f} µs a call")


if __name__ == "__main__":
    main()
