"""Paged MLA decode over batches of unequal lengths: uniform splits per sequence against the
length-balanced runs of `mla_schedule`, for the Triton and the Gluon kernels, in one run on one
Hopper GPU beside the HBM copy rate.

Batches (BF16 cache): one 32K-token sequence among 127 of 1K; 64 lengths log-uniform in
[256, 32K] (seeded); 128 × 4K (equal lengths: what balancing must not cost). Rows: h_q 64 s_q 1
(memory-bound) and h_q 128 s_q 2 (compute-bound). Bytes count the KV actually read. "balanced"
builds its schedule inside the timed call; "balanced_shared" takes it ready-made, as a decode step
that builds one schedule for all its layers does. Every variant is checked against the torch
reference first. One line per result:

  LENGTHS batch=<name> s_q=.. h_q=.. name=<variant> us=.. TBps=.. of_copy=..

Usage: python bench/kernels/bench_mla_lengths.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from functools import partial

import torch

from bench.kernels.bench_mla_gluon import bench, copy_rate
from fireflyer.kernels import mla
from fireflyer.kernels.fp8 import calc_diff
from fireflyer.kernels.mla_gluon import CONFIGS, mla_decode_gluon
from fireflyer.kernels.mla_gluon import balanced_parts as gluon_balanced_parts
from fireflyer.kernels.mla_schedule import balanced_schedule
from fireflyer.kernels.mla_triton import balanced_parts, mla_decode_triton, mla_decode_triton_balanced

SCALE = 192**-0.5


def batches() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(0)
    spread = torch.exp(torch.empty(64).uniform_(math.log(256), math.log(32768), generator=g))
    return {
        "one_long": [32768] + [1024] * 127,
        "log_uniform": [int(n) for n in spread],
        "equal_4k": [4096] * 128,
    }


Decode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def variants(q: torch.Tensor, lens: torch.Tensor) -> dict[str, Decode]:
    gluon_parts = gluon_balanced_parts(q)
    found: dict[str, Decode] = {
        "triton_uniform": mla_decode_triton,
        "triton_balanced": mla_decode_triton_balanced,
        "gluon_uniform": mla_decode_gluon,
    }
    shared_triton = balanced_schedule(lens, balanced_parts(q), mla.PAGE)
    found["triton_balanced_shared"] = partial(mla_decode_triton, schedule=shared_triton)
    for name in ("n64s2", "n32s4"):
        cfg = CONFIGS[name]
        found[f"gluon_{name}_balanced"] = lambda *a, cfg=cfg: mla_decode_gluon(
            *a, config=cfg, schedule=balanced_schedule(lens, gluon_parts, cfg["BLOCK_N"])
        )
        shared = balanced_schedule(lens, gluon_parts, cfg["BLOCK_N"])
        found[f"gluon_{name}_balanced_shared"] = partial(mla_decode_gluon, config=cfg, schedule=shared)
    return found


def run() -> list[dict]:
    hbm = copy_rate()
    print(f"HBM copy rate {hbm / 1e12:.2f} TB/s", flush=True)
    results: list[dict] = [{"kernel": "copy", "TBps": hbm / 1e12}]
    for batch, lengths in batches().items():
        b = len(lengths)
        pages = math.ceil(max(lengths) / mla.PAGE)
        kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(b * pages, device="cuda").to(torch.int32).view(b, pages)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        for s_q, h_q in [(1, 64), (2, 128)]:
            q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            bytes_ = sum(lengths) * mla.D_QK * 2 + q.numel() * 2 + b * s_q * h_q * mla.D_V * 2
            ref, _ = mla.mla_decode_reference(q, kv, table, lens, SCALE)
            for name, fn in variants(q, lens).items():
                try:
                    out, _ = fn(q, kv, table, lens, SCALE)
                    if calc_diff(out, ref) > 5e-6:
                        print(f"LENGTHS batch={batch} name={name} FAIL calc_diff {calc_diff(out, ref):.2e}")
                        continue
                    seconds = bench(partial(fn, q, kv, table, lens, SCALE))
                except Exception as exc:  # one broken variant must not hide the others
                    print(f"LENGTHS batch={batch} name={name} FAIL {type(exc).__name__}: {exc}", flush=True)
                    continue
                row = {
                    "batch": batch,
                    "s_q": s_q,
                    "h_q": h_q,
                    "name": name,
                    "us": seconds * 1e6,
                    "TBps": bytes_ / seconds / 1e12,
                    "of_copy": bytes_ / seconds / hbm,
                }
                results.append(row)
                print(
                    f"LENGTHS batch={batch:11s} s_q={s_q} h_q={h_q:3d} name={name:30s} us={row['us']:8.1f} "
                    f"TBps={row['TBps']:5.2f} of_copy={row['of_copy']:.2f}",
                    flush=True,
                )
            del q
        del kv
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = run()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
