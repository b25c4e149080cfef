"""What the compiler made of our Triton kernels: tensor-core instructions, registers, spills.

Usage: python bench/kernels/inspect_kernels.py
"""

from __future__ import annotations

import re

import torch

from fireflyer.kernels import fp8, mla
from fireflyer.kernels.fp8_triton import _gemm_kernel
from fireflyer.kernels.mla_triton import _mla_partial, mla_decode_triton


def report(name: str, compiled) -> None:  # type: ignore[no-untyped-def]
    ptx = compiled.asm.get("ptx", "")
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+?)\.", ptx)))
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    print(
        f"{name}: registers {compiled.n_regs}, spills {compiled.n_spills}, "
        f"shared {compiled.metadata.shared} B, "
        f"wgmma {shapes or 'none'} {wgmma}, mma.sync {'mma.sync' in ptx}",
        flush=True,
    )


def compiled_of(jit) -> list:  # type: ignore[no-untyped-def]
    """Compiled variants of a JIT function (the cache layout changed across Triton versions)."""
    fn = getattr(jit, "fn", jit)
    caches = getattr(fn, "device_caches", None)
    if caches:
        return [k for entry in caches.values() for k in entry[0].values()]
    return list(getattr(fn, "cache", {0: {}})[0].values())


def main() -> None:
    a = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    aq, as_ = fp8.quantize_per_token_group(a)
    bq, bs = fp8.quantize_per_block(b)
    fp8.gemm_fp8(aq, as_, bq, bs, backend="triton")
    for compiled in compiled_of(_gemm_kernel)[:1]:
        report("fp8 gemm", compiled)
    print(f"fp8 gemm best config (M=N=4096-ish): {_gemm_kernel.best_config}")
    q = torch.randn(8, 1, 128, mla.D_QK, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(8 * 64, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(8 * 64, device="cuda", dtype=torch.int32).view(8, 64)
    lens = torch.full((8,), 4096, dtype=torch.int32, device="cuda")
    mla_decode_triton(q, kv, table, lens, 0.07)
    for compiled in compiled_of(_mla_partial):
        report("mla partial", compiled)


if __name__ == "__main__":
    main()
