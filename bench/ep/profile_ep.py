"""Where EP dispatch/combine time goes: torch.profiler on rank 0, top operators by CUDA and CPU time.

Usage: python bench/ep/profile_ep.py [--mode normal|low_latency] [--transport nvlink|portable]
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from bench.ep.bench_ep import CONFIGS, EXPERTS, HIDDEN, _routing, init_rank
from fireflyer.kernels.ep import Dispatcher
from fireflyer.kernels.fp8 import quantize_per_token_group


def _run(rank: int, world: int, port: int, mode: str, transport: str) -> None:
    device = init_rank(rank, world, port)
    tokens = CONFIGS[mode]
    x, idx, weights = _routing(tokens, rank, device)
    q, s = quantize_per_token_group(x)
    ep = Dispatcher(
        dist.group.WORLD,  # type: ignore[arg-type]
        HIDDEN,
        tokens,
        EXPERTS,
        mode=mode,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        device=device,
    )
    for _ in range(3):
        received, handle = ep.dispatch((q, s), idx, weights)
        ep.combine(received.x.view(torch.uint8).to(torch.bfloat16), handle)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            received, handle = ep.dispatch((q, s), idx, weights)
        torch.cuda.synchronize()
    if rank == 0:
        table: Any = prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=16))
        print(table.table(sort_by="cpu_time_total", row_limit=16))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["normal", "low_latency"], default="normal")
    parser.add_argument("--transport", choices=["nvlink", "portable"], default="nvlink")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_run, args=(2, port, args.mode, args.transport), nprocs=2, join=True)


if __name__ == "__main__":
    main()
