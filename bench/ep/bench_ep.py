"""EP dispatch/combine against the torch + NCCL pipeline and raw all_to_all_single, same run.

Usage: python bench/ep/bench_ep.py [--gpus N] [--mode normal|low_latency|both]
Normal: 4096 tokens per rank, hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine.
Low-latency: 128 tokens per rank, same model dims. Per rank: time (µs) and received bytes ÷ time.
The pipeline sends one row per (token, expert) (layout → index_select into per-rank order →
all_to_all_single → regroup by local expert; reverse with weighted sum); ours sends one row per
(token, rank). Raw: all_to_all_single of our dispatch bytes, pre-packed. Ours is measured over
both transports: portable (NCCL all_to_all_single) and nvlink (Triton kernels writing into the
peers' buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fireflyer.kernels.ep import Dispatcher
from fireflyer.kernels.fp8 import quantize_per_token_group

HIDDEN = 7168
EXPERTS = 256
TOP_K = 8
CONFIGS = {"normal": 4096, "low_latency": 128}
TRANSPORTS = ("portable", "nvlink")


def _time(fn: Any, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # µs


def _routing(tokens: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, device=device, generator=generator).to(torch.bfloat16)
    scores = torch.rand(tokens, EXPERTS, device=device, generator=generator)
    topk = scores.topk(TOP_K, dim=1)
    weights = torch.softmax(topk.values, dim=1)
    return x, topk.indices, weights


class Pipeline:
    """The straightforward torch + NCCL peer: one row per (token, expert)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.local = EXPERTS // world

    def dispatch(self, q: torch.Tensor, s: torch.Tensor, idx: torch.Tensor) -> tuple[Any, ...]:
        flat = idx.reshape(-1)
        order = torch.argsort(flat // self.local, stable=True)
        token = torch.div(order, TOP_K, rounding_mode="floor")
        send_counts_t = torch.bincount(flat // self.local, minlength=self.world)
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t)
        send, recv = send_counts_t.tolist(), recv_counts_t.tolist()
        rows = sum(recv)
        out_q = torch.empty(rows, HIDDEN, dtype=torch.uint8, device=q.device)
        dist.all_to_all_single(out_q, q.view(torch.uint8)[token], recv, send)
        out_s = torch.empty(rows, s.shape[1], dtype=s.dtype, device=q.device)
        dist.all_to_all_single(out_s, s[token], recv, send)
        out_e = torch.empty(rows, dtype=flat.dtype, device=q.device)
        dist.all_to_all_single(out_e, flat[order] % self.local, recv, send)
        regroup = torch.argsort(out_e, stable=True)
        return out_q[regroup], out_s[regroup], (order, token, send, recv, regroup)

    def combine(
        self, y: torch.Tensor, weights: torch.Tensor, state: tuple[Any, ...], tokens: int
    ) -> torch.Tensor:
        order, token, send, recv, regroup = state
        back_rows = torch.empty_like(y)
        back_rows[regroup] = y
        back = torch.empty(len(token), HIDDEN, dtype=y.dtype, device=y.device)
        dist.all_to_all_single(back, back_rows, send, recv)
        w = weights.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros(tokens, HIDDEN, dtype=torch.float32, device=y.device)
        out.index_add_(0, token, back.float() * w)
        return out.to(torch.bfloat16)


def _measure(mode: str, rank: int, world: int, device: torch.device) -> dict[str, float]:
    tokens = CONFIGS[mode]
    x, idx, weights = _routing(tokens, rank, device)
    q, s = quantize_per_token_group(x)
    result: dict[str, float] = {}
    for transport in TRANSPORTS:
        ours = Dispatcher(
            dist.group.WORLD,  # type: ignore[arg-type]
            HIDDEN,
            tokens,
            EXPERTS,
            mode=mode,  # type: ignore[arg-type]
            transport=transport,
            device=device,
        )
        received, handle = ours.dispatch((q, s), idx, weights)
        y = torch.zeros(received.x.shape[0], HIDDEN, dtype=torch.bfloat16, device=device)
        sent = ours.layout(idx).tokens_per_rank
        arrived = torch.empty_like(sent)
        dist.all_to_all_single(arrived, sent)
        sent_rows, recv_rows = int(sent.sum()), int(arrived.sum())
        t_dispatch = _time(lambda ours=ours: ours.dispatch((q, s), idx, weights))
        t_combine = _time(lambda ours=ours, handle=handle, y=y: ours.combine(y, handle))
        dispatch_bytes = recv_rows * (HIDDEN + 4 * (HIDDEN // 128))
        combine_bytes = sent_rows * HIDDEN * 2
        result |= {
            f"{transport}_dispatch_us": t_dispatch,
            f"{transport}_combine_us": t_combine,
            f"{transport}_dispatch_GBps": dispatch_bytes / t_dispatch / 1e3,
            f"{transport}_combine_GBps": combine_bytes / t_combine / 1e3,
        }
        if mode == "low_latency":
            graphed = _graphed(ours, q, s, idx, weights, y)
            result |= {f"{transport}_{k}": v for k, v in graphed.items()}
        del ours, received, handle, y
        torch.cuda.empty_cache()
    pipe = Pipeline(world)
    pq, _, state = pipe.dispatch(q, s, idx)
    py = torch.zeros(pq.shape[0], HIDDEN, dtype=torch.bfloat16, device=device)
    t_pipe_dispatch = _time(lambda: pipe.dispatch(q, s, idx))
    t_pipe_combine = _time(lambda: pipe.combine(py, weights, state, tokens))
    # The raw collective moving our dispatch rows, already packed (equal splits).
    per_peer = max(1, recv_rows // world)
    raw_in = torch.empty(per_peer * world, HIDDEN + 4 * (HIDDEN // 128), dtype=torch.uint8, device=device)
    raw_out = torch.empty_like(raw_in)
    t_raw = _time(lambda: dist.all_to_all_single(raw_out, raw_in))
    raw_c_in = torch.empty(per_peer * world, HIDDEN, dtype=torch.bfloat16, device=device)
    raw_c_out = torch.empty_like(raw_c_in)
    t_raw_c = _time(lambda: dist.all_to_all_single(raw_c_out, raw_c_in))
    return result | {
        "received_rows": recv_rows,
        "pipeline_rows": pq.shape[0],
        "pipeline_dispatch_us": t_pipe_dispatch,
        "pipeline_combine_us": t_pipe_combine,
        "raw_dispatch_us": t_raw,
        "raw_combine_us": t_raw_c,
        "raw_dispatch_GBps": dispatch_bytes / t_raw / 1e3,
        "raw_combine_GBps": combine_bytes / t_raw_c / 1e3,
        **{
            f"{t}_{op}_vs_pipeline": {"dispatch": t_pipe_dispatch, "combine": t_pipe_combine}[op]
            / result[f"{t}_{op}_us"]
            for t in TRANSPORTS
            for op in ("dispatch", "combine")
        },
    }


def _graphed(
    ours: Dispatcher,
    q: torch.Tensor,
    s: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, float]:
    """Low-latency dispatch and combine captured in CUDA graphs, replayed: how decode runs them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _, handle = ours.dispatch((q, s), idx, weights)
            ours.combine(y, handle)
    torch.cuda.current_stream().wait_stream(stream)
    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph):
        _, handle = ours.dispatch((q, s), idx, weights)
    with torch.cuda.graph(combine_graph):
        ours.combine(y, handle)
    return {
        "graph_dispatch_us": _time(dispatch_graph.replay),
        "graph_combine_us": _time(combine_graph.replay),
    }


def init_rank(rank: int, world: int, port: int) -> torch.device:
    """One process per GPU, NCCL, NVLink multicast off."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
    )
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return device


def _run(rank: int, world: int, port: int, modes: list[str], out: Any) -> None:
    device = init_rank(rank, world, port)
    results = {mode: _measure(mode, rank, world, device) for mode in modes}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--mode", choices=["normal", "low_latency", "both"], default="both")
    args = parser.parse_args()
    if args.gpus < 2:
        print("needs two or more GPUs", file=sys.stderr)
        return 1
    modes = ["normal", "low_latency"] if args.mode == "both" else [args.mode]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.spawn(_run, args=(args.gpus, port, modes, queue), nprocs=args.gpus, join=True)
    per_rank = queue.get()
    summary = {}
    for mode in modes:
        rows = [r[mode] for r in per_rank]
        summary[mode] = {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in rows[0]}
        print(f"EP{args.gpus} {mode}: " + ", ".join(f"{k}={v}" for k, v in summary[mode].items()))
    print(json.dumps({"gpus": args.gpus, "device": torch.cuda.get_device_name(0), "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
