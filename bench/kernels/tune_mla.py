"""Sweep the Triton MLA decode's block shape, warps, pipeline depth and split count.

Usage: python bench/kernels/tune_mla.py
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import mla
from fireflyer.kernels.mla_triton import mla_decode_triton

SCALE = 192**-0.5


def main() -> None:
    for s_q, s_k in ((1, 4096), (2, 4096)):
        b, h_q = 128, 128
        pages = s_k // mla.PAGE
        q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
        bytes_ = b * s_k * mla.D_QK * 2
        flops = 2 * b * s_q * h_q * s_k * (mla.D_QK + mla.D_V)
        results = []
        for bh, warps, stages, splits in itertools.product((32, 64), (4, 8), (1, 2, 3), (1, 2, 4)):
            cfg = {"BLOCK_H": bh, "num_warps": warps, "num_stages": stages}
            try:
                run = partial(mla_decode_triton, q, kv, table, lens, SCALE, splits, cfg)
                ms = triton.testing.do_bench(run, warmup=5, rep=30)
            except Exception as exc:  # out of resources: skip the config
                print(f"s_q={s_q} {cfg} splits={splits}: {type(exc).__name__}", flush=True)
                continue
            results.append((ms, cfg, splits))
            print(
                f"s_q={s_q} s_k={s_k} {cfg} splits={splits}: {ms * 1e3:7.1f} us "
                f"{bytes_ / ms / 1e9:5.2f} TB/s {flops / ms / 1e9:6.1f} TFLOPS",
                flush=True,
            )
        best = min(results, key=lambda r: r[0])
        print(
            f"BEST s_q={s_q}: {best[1]} splits={best[2]} {best[0] * 1e3:.1f} us "
            f"{bytes_ / best[0] / 1e9:.2f} TB/s {flops / best[0] / 1e9:.1f} TFLOPS",
            flush=True,
        )


if __name__ == "__main__":
    main()
