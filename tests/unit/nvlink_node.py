"""The NVLink transport's kernels on CPU: a node's ranks simulated in one process under Triton's
interpreter (`TRITON_INTERPRET=1`, set before triton is imported — so this runs as its own
process; see test_ep_nvlink_interpreted.py).

Each rank's "symmetric" buffers are CPU tensors, and a peer's copy is reached, as on GPUs, by an
offset from the rank's own; the interpreter follows raw addresses, so writes land in the peer's
tensor. Ranks are stepped phase by phase (prepare → send → receive, send back → reduce), which
is where the barriers stand on GPUs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fireflyer.kernels.ep_nvlink import ALIGN_BYTES, NvlinkTransport
from fireflyer.kernels.fp8 import dequantize_per_token_group, quantize_per_token_group

HIDDEN = 256
EXPERTS = 10
TOP_K = 4


class _NoBarrier:
    def barrier(self, channel: int = 0) -> None:  # phases are stepped by the caller
        pass


class _Buffer:
    def __init__(self, tensor: torch.Tensor, peers: list[torch.Tensor]) -> None:
        self.tensor = tensor
        deltas = [peer.data_ptr() - tensor.data_ptr() for peer in peers]
        assert all(delta % ALIGN_BYTES == 0 for delta in deltas)
        self.peer_offsets = torch.tensor([delta // ALIGN_BYTES for delta in deltas], dtype=torch.int64)
        self.unit = ALIGN_BYTES // tensor.element_size()
        self.handle = _NoBarrier()


class SimulatedNode:
    """Symmetric allocations for `world` ranks: the i-th request of every rank is one buffer."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.buffers: list[list[torch.Tensor]] = []
        self.requests = [0] * world

    def _aligned(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        spare = ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
        raw = torch.zeros(numel + spare, dtype=dtype)
        start = (-raw.data_ptr() % ALIGN_BYTES) // raw.element_size()
        return raw[start : start + numel]

    def allocator(self, rank: int) -> Any:
        def allocate(numel: int, dtype: torch.dtype) -> _Buffer:
            index = self.requests[rank]
            self.requests[rank] += 1
            if index == len(self.buffers):
                self.buffers.append([self._aligned(numel, dtype) for _ in range(self.world)])
            tensors = self.buffers[index]
            return _Buffer(tensors[rank], tensors)

        return allocate


def _placement(world: int) -> list[int]:
    slots = [*range(EXPERTS), 0, 1]  # experts 0 and 1 have two replicas
    slots += list(range(2, 2 + (-len(slots)) % world))
    return slots


def _slot_of_expert(phy2log: list[int], rank: int) -> torch.Tensor:
    replicas = {e: [s for s, x in enumerate(phy2log) if x == e] for e in range(EXPERTS)}
    return torch.tensor([replicas[e][rank % len(replicas[e])] for e in range(EXPERTS)])


def run(world: int, tokens: list[int], capacity: int, fp8: bool, low_latency: bool) -> None:
    phy2log = _placement(world)
    local = len(phy2log) // world
    node = SimulatedNode(world)
    cpu = torch.device("cpu")
    ranks = [
        NvlinkTransport(None, world, r, capacity, HIDDEN, local, cpu, symmetric=node.allocator(r))
        for r in range(world)
    ]
    choice = [_slot_of_expert(phy2log, r) for r in range(world)]
    generator = torch.Generator().manual_seed(world * 100 + len(tokens))
    for round_tokens in tokens:  # several rounds: buffers are reused, sizes change
        inputs = []
        for _ in range(world):
            idx = torch.stack(
                [torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(round_tokens)]
            )
            idx[::5, -1] = -1
            x = torch.randn(round_tokens, HIDDEN, generator=generator).to(torch.bfloat16)
            w = torch.rand(round_tokens, TOP_K, generator=generator) * (idx >= 0)
            inputs.append((idx, x, w))
        outgoing = []
        for r, transport in enumerate(ranks):
            idx, x, w = inputs[r]
            if fp8:
                q, s = quantize_per_token_group(x)
                outgoing.append(transport.prepare(q.view(torch.uint8), s, idx, w, choice[r]))
            else:
                outgoing.append(transport.prepare(x, None, idx, w, choice[r]))
        for transport, out in zip(ranks, outgoing, strict=True):
            transport.send(out)
        results = [t.receive(o, low_latency) for t, o in zip(ranks, outgoing, strict=True)]
        for me, (received, _) in enumerate(results):
            _check_received(me, local, inputs, choice, received, fp8, low_latency)
        expert_out = []
        for received, _ in results:
            if fp8:
                assert received.scales is not None
                values = received.x.view(torch.float8_e4m3fn)
                expert_out.append(dequantize_per_token_group(values, received.scales).to(torch.bfloat16))
            else:
                expert_out.append(received.x)
        for transport, out, (_, handle) in zip(ranks, expert_out, results, strict=True):
            transport.send_back(out, handle, masked=False)
        for r, (transport, (_, handle)) in enumerate(zip(ranks, results, strict=True)):
            combined = transport.reduce(handle)
            idx, x, w = inputs[r]
            expected = x.float() * w.sum(1, keepdim=True)
            if fp8:  # E4M3 keeps 3 mantissa bits
                error = (combined.float() - expected).abs().max() / expected.abs().max()
                assert error < 0.07, f"rank {r}: combine is off by {error:.3f}"
            else:
                torch.testing.assert_close(combined.float(), expected, rtol=2e-2, atol=2e-2)
        if low_latency and not fp8:  # the masked layout combines to the same result
            grouped = [t.reduce(h) for t, (_, h) in zip(ranks, results, strict=True)]
            for transport, (received, handle) in zip(ranks, results, strict=True):
                assert received.masked_x is not None
                transport.send_back(received.masked_x, handle, masked=True)
            for transport, (_, handle), before in zip(ranks, results, grouped, strict=True):
                assert torch.equal(transport.reduce(handle), before)


def _check_received(
    me: int,
    local: int,
    inputs: list[Any],
    choice: list[torch.Tensor],
    received: Any,
    fp8: bool,
    low_latency: bool,
) -> None:
    """Grouped by local expert; within one, by source rank then token — as a single process
    computes it."""
    rows: list[torch.Tensor] = []
    counts = [0] * local
    for expert in range(local):
        slot = me * local + expert
        for source, (idx, x, _) in enumerate(inputs):
            for token in range(idx.shape[0]):
                picked = [int(choice[source][e]) for e in idx[token].tolist() if e >= 0]
                if slot in picked:
                    rows.append(x[token])
                    counts[expert] += 1
    assert received.tokens_per_expert.tolist() == counts, (received.tokens_per_expert, counts)
    n = sum(counts)
    if not n:
        return
    expected = torch.stack(rows)
    if fp8:
        q, s = quantize_per_token_group(expected)
        assert torch.equal(received.x[:n].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(received.scales[:n], s)
    else:
        assert torch.equal(received.x[:n], expected)
    if low_latency:
        start = 0
        for expert, count in enumerate(counts):
            block = received.x[start : start + count]
            assert torch.equal(received.masked_x[expert, :count].view(torch.uint8), block.view(torch.uint8))
            start += count


def main() -> int:
    # Small shapes: the interpreter runs every program in Python. 150 tokens span two routing
    # chunks; a later, larger round makes normal mode resize its output.
    run(2, [150, 40], capacity=160, fp8=False, low_latency=False)
    run(3, [30, 70], capacity=80, fp8=False, low_latency=False)
    run(2, [40], capacity=48, fp8=True, low_latency=False)
    run(2, [24, 24], capacity=32, fp8=False, low_latency=True)
    run(3, [16], capacity=16, fp8=True, low_latency=True)
    print("nvlink kernels: every simulated rank received and combined what it should")
    return 0


if __name__ == "__main__":
    sys.exit(main())
