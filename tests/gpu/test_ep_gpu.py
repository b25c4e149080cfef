"""EP dispatch/combine on GPUs with NCCL: the CPU checks again, and CUDA-graph capture of the
low-latency mode. Needs at least two GPUs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fireflyer.kernels.ep import Dispatcher
from tests.unit import test_ep as checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices"),
]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _worlds() -> list[int]:
    count = torch.cuda.device_count()
    return sorted({2, min(4, count), min(8, count)}) if count >= 2 else [2]


@pytest.mark.parametrize("world", _worlds())
def test_dispatch_and_combine_with_nccl(world: int) -> None:
    checks._spawn(world, checks._all_checks, backend="nccl")


def _graph_capture(rank: int, world: int) -> None:
    experts, phy2log = checks._placement(world)
    device = checks.DEVICE
    dispatcher = Dispatcher(
        dist.group.WORLD, checks.HIDDEN, checks.TOKENS, experts, phy2log, mode="low_latency", device=device
    )
    x, topk_idx, weights = checks._routing(rank, experts)
    static_x, static_idx, static_w = x.clone(), topk_idx.clone(), weights.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph, as CUDA graphs require
            received, handle = dispatcher.dispatch(static_x, static_idx, static_w)
            dispatcher.combine(received.x, handle)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        received, handle = dispatcher.dispatch(static_x, static_idx, static_w)
        static_out = dispatcher.combine(received.x, handle)
    # New routing and tokens, replayed through the captured graph.
    x2, idx2, w2 = checks._routing(rank + 17, experts)
    static_x.copy_(x2)
    static_idx.copy_(idx2)
    static_w.copy_(w2)
    graph.replay()
    torch.cuda.synchronize()
    expected = x2.float() * w2.sum(1, keepdim=True)
    torch.testing.assert_close(static_out.float(), expected, rtol=2e-2, atol=2e-2)


def test_low_latency_mode_is_cuda_graph_capturable() -> None:
    checks._spawn(2, _graph_capture, backend="nccl")
