"""Sweep the FP8-cache MLA decode's head block, warps and pipeline depth against
the BF16 cache's kernel on the same shapes (b = 128, s_q = 1).

Usage: python bench/kernels/tune_mla_fp8.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import fp8, mla
from fireflyer.kernels.mla_fp8 import TOKEN_BYTES, mla_decode_fp8_reference, quantize_latent
from fireflyer.kernels.mla_fp8_triton import mla_decode_fp8_triton
from fireflyer.kernels.mla_triton import mla_decode_triton

SCALE = 192**-0.5
SHAPES = [(16, 4096), (16, 16384), (64, 16384), (128, 16384)]  # (h_q, s_k)


def bench(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e-3


def configs() -> list[dict[str, int]]:
    """Head block × warps × pipeline depth (a head block wider than the heads only pads)."""
    shapes = [(64, 8, 2), (64, 8, 3), (64, 4, 2), (32, 4, 2), (16, 4, 2)]
    return [{"BLOCK_H": bh, "num_warps": w, "num_stages": st} for bh, w, st in shapes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for h_q, s_k in SHAPES:
        b, pages = 128, s_k // mla.PAGE
        q = torch.randn(b, 1, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        cache = quantize_latent(kv)
        table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
        t_bf16 = bench(partial(mla_decode_triton, q, kv, table, lens, SCALE))
        want, want_lse = mla_decode_fp8_reference(q, cache, table, lens, SCALE)
        for cfg in configs():
            try:
                out, lse = mla_decode_fp8_triton(q, cache, table, lens, SCALE, config=cfg)
                t = bench(partial(mla_decode_fp8_triton, q, cache, table, lens, SCALE, config=cfg))
            except Exception as exc:  # a config that does not compile or fit: skip it
                print(f"h_q={h_q} s_k={s_k} {cfg}: {type(exc).__name__}", flush=True)
                continue
            row = {"h_q": h_q, "s_k": s_k, **cfg, "fp8_us": t * 1e6, "bf16_us": t_bf16 * 1e6}
            row["ratio"] = t / t_bf16
            row["TBps"] = b * s_k * TOKEN_BYTES / t / 1e12
            row["diff"] = fp8.calc_diff(out, want)  # against the torch reference
            row["lse_err"] = (lse - want_lse).abs().max().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, kv, cache
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    for h_q, s_k in SHAPES:
        shape = sorted((r for r in rows if (r["h_q"], r["s_k"]) == (h_q, s_k)), key=lambda r: r["fp8_us"])
        for r in shape:
            print(
                f"h_q={h_q:3d} s_k={s_k:5d} BH={r['BLOCK_H']:2d} w={r['num_warps']} st={r['num_stages']}: "
                f"fp8 {r['fp8_us']:7.1f} us {r['TBps']:.2f} TB/s | "
                f"bf16 {r['bf16_us']:7.1f} us | fp8/bf16 {r['ratio']:.2f} "
                f"diff {r['diff']:.1e} lse {r['lse_err']:.1e}"
            )


if __name__ == "__main__":
    main()
