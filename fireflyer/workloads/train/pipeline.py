"""Pipeline-parallel execution of a training step: this rank's chunks of the model, the point-to-
point links to its neighbours, and the schedule's operation list run exactly as generated.

Links: one two-rank process group per (activation or gradient, direction, neighbouring pair), so
every group carries tensors one way, in micro-batch order (a schedule runs each direction's
micro-batches in order). Receivers post `irecv` one operation ahead and wait only when the
operation needs the tensor; senders `isend` after the operation. Matching is then first in, first
out on every link whatever the backend (NCCL ignores tags and matches in order), and the ranks
can only wait on each other in a cycle if the schedule's dependencies do, which the simulator in
`schedules` rules out.

Per step: `step` runs the forward and backward passes (gradients accumulate on the chunks'
weights); `reduce_gradients` sums them over the replica group (the data-parallel replicas of the
same stages, and for DualPipe also the mirrored rank holding the second copy) and divides by the
replica count; `clip` scales them to the global norm; `update_bias` moves the routers' biases from
the loads summed over the same group. Every rank records when each operation started and ended.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.train import balance, optim, parallel, schedules
from fireflyer.workloads.train.config import TrainError
from fireflyer.workloads.train.layout import Layout, split_layers
from fireflyer.workloads.train.parallel import Rank
from fireflyer.workloads.train.schedules import FORWARD, Op, Pass
from fireflyer.workloads.train.stages import StageChunk, build_chunks, lm_loss

ACTIVATION, GRADIENT = "activation", "gradient"


@dataclass(frozen=True)
class OpRecord:
    """One executed operation: `start`/`end` of its compute (time.perf_counter, seconds) and
    `wait`, the time it sat blocked on its inputs before starting."""

    index: int
    op: str
    start: float
    end: float
    wait: float


def _new_group(members: tuple[int, ...], rank: int) -> dist.ProcessGroup | None:
    """A process group of `members` (every rank must call this); None where `rank` is not one."""
    group = dist.new_group(list(members))
    return group if rank in members and isinstance(group, dist.ProcessGroup) else None


def _kind(p: Pass) -> str:
    """What a pass receives (and sends): activations forward, gradients backward."""
    return ACTIVATION if p.kind == FORWARD else GRADIENT


class Pipeline:
    def __init__(
        self,
        layout: Layout,
        rank: Rank,
        model: DeepseekV3,
        micro_batches: int,
        alpha: float,
        dtype: torch.dtype,
    ) -> None:
        self.layout = layout
        self.rank = rank
        self.position = layout.position(rank.rank)
        self.replica = layout.replica(rank.rank)
        self.schedule = schedules.build(layout.schedule, layout.pipeline, micro_batches)
        ranges = split_layers(model.config.num_hidden_layers, layout.pipeline)
        self.chunks: list[StageChunk] = build_chunks(model, layout.stages(self.position), ranges)
        # Reductions over the replica group go stage by stage, so mirrored ranks (which hold
        # their chunks in the opposite order) line their buffers up.
        self.by_stage = sorted(self.chunks, key=lambda c: c.stage)
        self.hidden = model.config.hidden_size
        self.alpha = alpha
        self.dtype = dtype
        self.timeline: list[OpRecord] = []
        self._links: dict[tuple[str, int, int], dist.ProcessGroup] = {}
        self._group: dist.ProcessGroup | None = None
        self._make_groups()

    # --- groups --------------------------------------------------------------------------------

    def _peer(self, p: Pass, sending: bool) -> int | None:
        """Global rank of the neighbour that `p` receives from (or sends to)."""
        find = schedules.downstream if sending else schedules.upstream
        position = find(self.schedule, self.position, p)
        return None if position is None else self.layout.rank_at(self.replica, position)

    def _make_groups(self) -> None:
        """Every rank creates every group in one order (new_group is collective over the world)
        and keeps those it belongs to. Then each link carries one probe, link by link in that
        order: a backend that sets up a pair's communicator at its first message (NCCL) blocks
        both ranks until both are there, and a common order means no two ranks wait on each other."""
        layout, directions = self.layout, self.schedule.directions
        mine = self.rank.rank
        for members in layout.replica_groups():
            if len(members) > 1:
                group = _new_group(members, mine)
                if group is not None:
                    self._group = group
        links = []
        for replica in range(layout.data):
            for direction in range(directions):
                for kind in (ACTIVATION, GRADIENT):
                    for position in range(layout.pipeline - 1):
                        pair = (layout.rank_at(replica, position), layout.rank_at(replica, position + 1))
                        # Activations of direction 0 and gradients of direction 1 flow up the ranks.
                        up = (kind == ACTIVATION) == (direction == 0)
                        source, target = pair if up else pair[::-1]
                        links.append((kind, direction, source, target, _new_group(pair, mine)))
        for kind, direction, source, target, group in links:
            if group is not None:
                self._links[(kind, direction, source if mine == target else target)] = group
                probe = torch.zeros(1, device=self.rank.device)
                if mine == source:
                    dist.send(probe, target, group=group)
                else:
                    dist.recv(probe, source, group=group)

    def _link(self, p: Pass, peer: int) -> dist.ProcessGroup:
        return self._links[(_kind(p), p.direction, peer)]

    # --- one step ------------------------------------------------------------------------------

    def start_counting(self) -> None:
        for chunk in self.chunks:
            balance.start_counting(chunk)

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """Run this rank's operations for the step's micro-batches `batch` [M, B, T + 1] (every
        rank of the pipeline holds the same batch); → [cross-entropy sum, balance-loss sum] of the
        passes run here, FP64. Gradients accumulate on the chunks' weights."""
        ops = self.schedule.ranks[self.position]
        run = _StepRun(self, batch)
        posted: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        records = []
        shape = (batch.shape[1], batch.shape[2] - 1, self.hidden)  # [B, T, hidden] on every link
        if ops:
            self._post(ops[0], posted, shape)
        for index, op in enumerate(ops):
            waiting = time.perf_counter()
            received = {}
            for p in op.passes:
                key = (_kind(p), p.direction, p.micro)
                if key in posted:
                    work, tensor = posted.pop(key)
                    work.wait()
                    received[(p.direction, p.micro)] = tensor
            self._synchronize()
            start = time.perf_counter()
            if index + 1 < len(ops):  # the next operation's inputs travel during this one
                self._post(ops[index + 1], posted, shape)
            outputs = [(p, run.run(p, received.get((p.direction, p.micro)))) for p in op.passes]
            self._synchronize()
            end = time.perf_counter()
            for p, output in outputs:
                peer = self._peer(p, sending=True)
                if output is not None and peer is not None:
                    output = output.contiguous()  # kept alive until the send completes
                    sent = dist.isend(output, peer, group=self._link(p, peer))
                    assert sent is not None
                    sends.append((sent, output))
            sends = [s for s in sends if not s[0].is_completed()]
            records.append(OpRecord(index, str(op), start, end, start - waiting))
        for work, _ in sends:
            work.wait()
        assert not posted and run.done(), "the schedule left passes unmatched"
        self.timeline = records
        return run.sums

    def _post(
        self,
        op: Op,
        posted: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]],
        shape: tuple[int, ...],
    ) -> None:
        for p in op.passes:
            peer = self._peer(p, sending=False)
            if peer is None:
                continue
            buffer = torch.empty(shape, dtype=torch.float32, device=self.rank.device)
            work = dist.irecv(buffer, peer, group=self._link(p, peer))
            assert work is not None
            posted[(_kind(p), p.direction, p.micro)] = (work, buffer)

    def _synchronize(self) -> None:
        """On a GPU the recorded times must be the device's: wait for the queued work."""
        if self.rank.device.type == "cuda":
            torch.cuda.synchronize(self.rank.device)

    # --- after the passes ----------------------------------------------------------------------

    def parameters_by_stage(self) -> Iterator[nn.Parameter]:
        for chunk in self.by_stage:
            yield from (p for p in chunk.parameters() if p.requires_grad)

    def reduce_gradients(self) -> None:
        """Sum over the replica group, ÷ the data-parallel replicas: the mean gradient of the
        step's global batch, on every copy of every stage. Weights without a gradient (an expert
        no token chose) take part with zeros, as in the one-stage trainer."""
        params = list(self.parameters_by_stage())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if self._group is not None:
            parallel.reduce_buckets(grads, self._group, self.layout.data)

    def clip(self, max_norm: float) -> float:
        """Scale every gradient to a global L2 norm of at most `max_norm` (0: no clipping); → the
        norm before. Each stage counts once: its first-direction copy, once per replica."""
        counted = self.chunks[0].parameters()
        squares = [torch.linalg.vector_norm(p.grad).double() ** 2 for p in counted if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
        total = total.to(self.rank.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        norm = (total / self.layout.data).sqrt().float()
        if max_norm > 0:
            factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.parameters_by_stage():
                if p.grad is not None:
                    p.grad.mul_(factor)
        return float(norm)

    def update_bias(self, speed: float) -> None:
        """The auxiliary-loss-free bias step of every MoE layer held here, from its loads summed
        over every copy and replica of its stage: the same step as one rank holding it all."""
        group = self._group

        def reduce(t: torch.Tensor) -> None:
            if group is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

        for chunk in self.by_stage:
            balance.update_bias(chunk, speed, reduce)


class _StepRun:
    """The activations, losses and inputs one step keeps between a pass's forward and backward."""

    def __init__(self, pipeline: Pipeline, batch: torch.Tensor) -> None:
        self.pipeline = pipeline
        self.batch = batch
        self.micro_batches = batch.shape[0]
        self.sums = torch.zeros(2, dtype=torch.float64, device=batch.device)
        self.outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}

    def done(self) -> bool:
        return not self.outputs and not self.inputs

    def run(self, p: Pass, received: torch.Tensor | None) -> torch.Tensor | None:
        """Run pass `p`; → the tensor to send on (activation or input gradient), or None."""
        chunk = self.pipeline.chunks[p.direction]
        key = (p.direction, p.micro)
        if p.kind == FORWARD:
            return self._forward(chunk, key, self.batch[self.pipeline.schedule.global_micro(p)], received)
        if p.phase != schedules.BACKWARD:
            raise TrainError(f"pass {p}: weight-gradient passes are not executed (W is not split out)")
        return self._backward(chunk, key, received)

    def _forward(
        self, chunk: StageChunk, key: tuple[int, int], window: torch.Tensor, received: torch.Tensor | None
    ) -> torch.Tensor | None:
        if chunk.first:
            x = window[:, :-1]
        else:
            assert received is not None
            x = received.requires_grad_(True)
            self.inputs[key] = x
        pipeline = self.pipeline
        with optim.autocast(pipeline.rank.device, pipeline.dtype):
            out, stage_balance = chunk(x, pipeline.alpha)
            if chunk.last:
                lm = lm_loss(out, window[:, 1:])
        if chunk.last:
            self.outputs[key] = [(lm + stage_balance) / self.micro_batches]
            self.sums += torch.stack([lm.detach(), stage_balance.detach()]).double()
            return None
        self.sums[1] += stage_balance.detach().double()
        if out.dtype != torch.float32:
            raise TrainError(f"stage {chunk.stage} produced {out.dtype} activations; the links carry FP32")
        kept = [out]
        if stage_balance.requires_grad:
            kept.append(stage_balance / self.micro_batches)
        self.outputs[key] = kept
        return out.detach()

    def _backward(
        self, chunk: StageChunk, key: tuple[int, int], received: torch.Tensor | None
    ) -> torch.Tensor | None:
        roots = self.outputs.pop(key)
        if chunk.last:
            torch.autograd.backward(roots)
        else:
            assert received is not None
            grads: list[torch.Tensor | None] = [received, *([None] * (len(roots) - 1))]
            torch.autograd.backward(roots, grads)
        if chunk.first:
            return None
        x = self.inputs.pop(key)
        return x.grad
