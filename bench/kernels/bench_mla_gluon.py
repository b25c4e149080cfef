"""Paged MLA decode: the Gluon kernel (each config) beside the Triton kernel, FlashMLA where it
can run here (`official`) and the HBM copy rate, measured in one run on one Hopper GPU.

Shapes: b = 128, BF16 cache, s_k ∈ {4096, 8192, 16384}; memory-bound rows (s_q 1, h_q 16/32/64)
and compute-bound ones (h_q 128, s_q 1 and 2). Bytes count the cache read plus the queries and
outputs; FLOPs are 2·b·s_q·h_q·s_k·(576 + 512). Every variant is first checked against the torch
reference on a small batch; a failing one is reported and not timed. One line per result:

  MLA name=<variant> s_q=.. h_q=.. s_k=.. us=.. TBps=.. of_copy=.. TFLOPS=..

Usage: python bench/kernels/bench_mla_gluon.py [--quick] [--configs triton,n64s2,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import traceback
from collections.abc import Callable
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import mla, official
from fireflyer.kernels.fp8 import calc_diff
from fireflyer.kernels.mla_gluon import CONFIGS, mla_decode_gluon
from fireflyer.kernels.mla_official import decode_with, mla_decode_official, new_schedule
from fireflyer.kernels.mla_triton import mla_decode_triton

SCALE = 192**-0.5
Decode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def bench(fn: Callable[[], object], reps: int = 50) -> float:
    """Median seconds (the inputs here are ≥ 150 MB, well past the 60 MB L2)."""
    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")) * 1e-3


def copy_rate() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2**31, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    seconds = bench(partial(dst.copy_, src))
    del src, dst
    return 2 * 2**32 / seconds


def variants(only: set[str] | None = None) -> dict[str, Decode]:
    """The Triton kernel and every Gluon config (`only`: those names, e.g. {"triton", "n64s2"})."""
    found: dict[str, Decode] = {"triton": mla_decode_triton}
    for name, cfg in CONFIGS.items():
        found[f"gluon_{name}"] = partial(mla_decode_gluon, config=cfg)
    why = official.unavailable("flash_mla", torch.device("cuda", 0))
    if why is None:
        # FlashMLA (docs/kernels.md, "The official libraries"): as `backend="official"` runs it,
        # making its split schedule in each call, and with one schedule per batch, as a decode
        # step would share it across its layers (the kernel's own rate).
        found["official"] = mla_decode_official
        found["official_shared"] = flashmla_sharing_schedules()
    else:
        print(f"FlashMLA not measured: {why}", flush=True)
    if only is None:
        return found
    return {name: fn for name, fn in found.items() if name.removeprefix("gluon_") in only}


def flashmla_sharing_schedules() -> Decode:
    """FlashMLA with one split schedule per lengths tensor, kept for the run (the benchmark calls
    each batch with the same tensors)."""
    import flash_mla

    kept: dict[int, tuple[torch.Tensor, object]] = {}

    def decode(q, kv, table, lens, scale):  # type: ignore[no-untyped-def]
        if id(lens) not in kept:  # the tensor is kept too, so that its id is not reused
            kept[id(lens)] = (lens, new_schedule(flash_mla, lens, q.shape[1] * q.shape[2]))
        return decode_with(flash_mla, q, kv, table, lens, scale, schedule=kept[id(lens)][1])

    return decode


def correct(fn: Decode) -> str | None:
    """None when `fn` matches the torch reference on a small mixed batch, else what differs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for s_q, h_q, lens in [(1, 64, [700, 1, 4095]), (2, 128, [63, 2000, 1])]:
        pages = math.ceil(max(lens) / mla.PAGE)
        q = torch.randn(len(lens), s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
        kv = torch.randn(len(lens) * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(len(lens) * pages, device="cuda").to(torch.int32).view(len(lens), pages)
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        out, lse = fn(q, kv, table, seqlens, SCALE)
        ref, ref_lse = mla.mla_decode_reference(q, kv, table, seqlens, SCALE)
        diff = calc_diff(out, ref)
        lse_err = float((lse - ref_lse).abs().nan_to_num(0.0).max())
        if diff > 5e-6 or lse_err > 1e-2:
            return f"s_q={s_q} h_q={h_q}: calc_diff {diff:.2e}, lse error {lse_err:.2e}"
    return None


def run(quick: bool, only: set[str] | None = None) -> list[dict]:
    hbm = copy_rate()
    print(f"HBM copy rate {hbm / 1e12:.2f} TB/s", flush=True)
    results: list[dict] = [{"kernel": "copy", "TBps": hbm / 1e12}]
    usable: dict[str, Decode] = {}
    for name, fn in variants(only).items():
        try:
            problem = correct(fn)
        except Exception as exc:  # one broken variant must not hide the others
            problem = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=2)
        print(f"CHECK name={name} {'ok' if problem is None else 'FAIL ' + problem}", flush=True)
        if problem is None:
            usable[name] = fn
    rows = [(1, 16), (1, 32), (1, 64), (1, 128), (2, 128)]
    lengths = [4096] if quick else [4096, 8192, 16384]
    b = 128
    for s_k in lengths:
        for s_q, h_q in rows:
            pages = s_k // mla.PAGE
            q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(b * pages, device="cuda").to(torch.int32).view(b, pages)
            lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
            bytes_ = b * s_k * mla.D_QK * 2 + q.numel() * 2 + b * s_q * h_q * mla.D_V * 2
            flops = 2 * b * s_q * h_q * s_k * (mla.D_QK + mla.D_V)
            for name, fn in usable.items():
                try:
                    seconds = bench(partial(fn, q, kv, table, lens, SCALE))
                except Exception as exc:
                    print(f"MLA name={name} s_q={s_q} h_q={h_q} s_k={s_k} FAIL {type(exc).__name__}: {exc}")
                    continue
                row = {
                    "kernel": "mla",
                    "name": name,
                    "s_q": s_q,
                    "h_q": h_q,
                    "s_k": s_k,
                    "us": seconds * 1e6,
                    "TBps": bytes_ / seconds / 1e12,
                    "of_copy": bytes_ / seconds / hbm,
                    "TFLOPS": flops / seconds / 1e12,
                }
                results.append(row)
                print(
                    f"MLA name={name:12s} s_q={s_q} h_q={h_q:3d} s_k={s_k:5d} us={row['us']:8.1f} "
                    f"TBps={row['TBps']:5.2f} of_copy={row['of_copy']:.2f} TFLOPS={row['TFLOPS']:6.1f}",
                    flush=True,
                )
            del q, kv
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="s_k 4096 only")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--configs", help="comma-separated variants to run (triton and config names)")
    args = parser.parse_args()
    results = run(args.quick, set(args.configs.split(",")) if args.configs else None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
