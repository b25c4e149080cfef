"""Drive the Gluon kernels where they miss their targets, for Nsight Compute: each case is warmed
up (compiled) outside the NVTX range "profile", then run once inside it, so that
`ncu --nvtx --nvtx-include "profile/"` records exactly one launch of each (profile_gluon_on_device.sh).

Cases: MLA decode compute-bound (b = 128, s_q 2, h_q 128, s_k 8192; the default config and the
64-token seesaw `w64s2`) and memory-bound at the
short context where it is furthest from the copy rate (s_q 1, h_q 32, s_k 4096) and at h_q 64
(s_k 8192); FlashMLA on the same compute-bound and h_q 64 cases when it is installed (its split
schedule made beforehand, as a decode step shares it across layers); the dense FP8
GEMM at M = 4096 on the V3 shape where it trails cuBLAS most (N 7168, K 18432, the MLP's down
projection), beside cuBLAS block-wise `_scaled_mm` on the same operands.

Usage: python bench/kernels/profile_gluon.py [--case NAME ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from fireflyer.kernels import fp8, mla
from fireflyer.kernels.fp8_gluon import gemm_fp8_gluon
from fireflyer.kernels.mla_gluon import CONFIGS, mla_decode_gluon

SCALE = 192**-0.5


def mla_operands(s_q: int, h_q: int, s_k: int, b: int) -> tuple[torch.Tensor, ...]:
    """Queries, a paged BF16 cache, its block table and the lengths: b sequences of s_k tokens."""
    pages = s_k // mla.PAGE
    q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(b * pages, device="cuda").to(torch.int32).view(b, pages)
    lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
    return q, kv, table, lens


def mla_case(s_q: int, h_q: int, s_k: int, b: int = 128, config: str | None = None) -> Callable[[], object]:
    q, kv, table, lens = mla_operands(s_q, h_q, s_k, b)
    cfg = CONFIGS[config] if config else None
    return lambda: mla_decode_gluon(q, kv, table, lens, SCALE, config=cfg)


def flashmla_case(s_q: int, h_q: int, s_k: int, b: int = 128) -> Callable[[], object]:
    import flash_mla

    from fireflyer.kernels.mla_official import decode_with, new_schedule

    q, kv, table, lens = mla_operands(s_q, h_q, s_k, b)
    schedule = new_schedule(flash_mla, lens, s_q * h_q)
    return lambda: decode_with(flash_mla, q, kv, table, lens, SCALE, schedule)


def gemm_operands(m: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    a, a_scale = fp8.quantize_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b, b_scale = fp8.quantize_per_block(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    return a, a_scale, b, b_scale


CASES: dict[str, Callable[[], Callable[[], object]]] = {
    "mla_compute": lambda: mla_case(2, 128, 8192),
    "mla_compute_w64s2": lambda: mla_case(2, 128, 8192, config="w64s2"),
    "mla_memory_4k": lambda: mla_case(1, 32, 4096),
    "mla_memory_64": lambda: mla_case(1, 64, 8192),
    "mla_compute_flashmla": lambda: flashmla_case(2, 128, 8192),
    "mla_memory_64_flashmla": lambda: flashmla_case(1, 64, 8192),
    "gemm_gluon_4096": lambda: (lambda ops: lambda: gemm_fp8_gluon(*ops))(gemm_operands(4096, 7168, 18432)),
    "gemm_cublas_4096": lambda: (lambda ops: lambda: fp8.gemm_fp8_cublas(*ops))(
        gemm_operands(4096, 7168, 18432)
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    args = parser.parse_args()
    for name in args.case or list(CASES):
        run = CASES[name]()
        for _ in range(3):  # compile and warm up outside the profiled range
            run()
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range("profile"):
            run()
        torch.cuda.synchronize()
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main()
