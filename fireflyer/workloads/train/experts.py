"""Expert parallelism in training (`--expert-parallel E`).

The E ranks of an expert group (layout.py) each hold 1/E of every MoE layer's routed experts,
loaded as serving loads them (`Parallel`), and exchange tokens through the `Dispatcher` (normal
mode, portable transport) with its differentiable pair (`fireflyer.kernels.ep_autograd`).
Everything else — attention, dense layers, shared experts, routers — is replicated on every rank.

Gradients: a replicated weight's are averaged over every rank, as without expert parallelism. An
expert's gradient already sums the contributions of every token of its group (the dispatch's
backward brings them home), so it is summed only over the D/E ranks holding the same experts and
divided by the world size, like the rest: the step equals one rank's with every expert. The global
gradient norm counts each expert once (its squares are summed over the expert group). The routers'
loads are counted per logical expert on every rank and summed over the world, as before.

Checkpoints: expert tensors (and their AdamW moments) are saved sharded on their first dimension
by the ranks of expert group 0 (checkpoint rank e, world E); every other tensor once. Loaded with
another E (or none) they are re-split; a checkpoint saved without expert parallelism holds every
expert, and each rank takes its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fireflyer.kernels.ep import Dispatcher
from fireflyer.workloads.model.model import DeepseekV3, Parallel
from fireflyer.workloads.model.moe import Experts, MoE
from fireflyer.workloads.train import parallel
from fireflyer.workloads.train.layout import Layout
from fireflyer.workloads.train.parallel import Rank

EXPERT_WEIGHTS = ("w13", "w2")


@dataclass
class ExpertParallel:
    layout: Layout
    rank: Rank
    group: Any = None  # the expert group (token all-to-all); None without expert parallelism
    replicas: Any = None  # the ranks holding the same experts; None when there is only this one
    rows: dict[str, range] = field(default_factory=dict)  # expert weight name → its expert ids

    @property
    def enabled(self) -> bool:
        return self.layout.expert > 1

    @property
    def shard(self) -> Parallel:
        """Which experts this rank loads."""
        return Parallel(expert_rank=self.layout.expert_rank(self.rank.rank), expert_size=self.layout.expert)

    @property
    def saves(self) -> bool:
        """Whether this rank writes checkpoints: the ranks of expert group 0 hold every expert once."""
        return not self.enabled or self.layout.replica(self.rank.rank) < self.layout.expert

    @property
    def checkpoint_rank(self) -> tuple[int, int]:
        """(rank, world) of this rank in the checkpoint's world."""
        if not self.enabled:
            return self.rank.rank, self.rank.world
        return self.layout.expert_rank(self.rank.rank), self.layout.expert

    def all_reduce_over_group(self, tensor: torch.Tensor) -> None:
        """Sum over the expert group (a no-op without expert parallelism)."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)


def setup(layout: Layout, rank: Rank) -> ExpertParallel:
    """The expert groups' process groups (every rank creates every group, in one order)."""
    ep = ExpertParallel(layout, rank)
    if not ep.enabled:
        return ep
    for ranks in layout.expert_groups():
        created = dist.new_group(list(ranks))
        if rank.rank in ranks:
            ep.group = created
    for ranks in layout.expert_replica_groups():
        if len(ranks) == 1:
            continue
        created = dist.new_group(list(ranks))
        if rank.rank in ranks:
            ep.replicas = created
    return ep


def attach(model: DeepseekV3, ep: ExpertParallel, tokens_per_rank: int) -> None:
    """Give every MoE layer a Dispatcher over the expert group and record which expert ids each
    expert weight holds (for checkpoints saved without expert parallelism)."""
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            assert isinstance(module.experts, range)
            ep.rows |= {f"{name}.{w}": module.experts for w in EXPERT_WEIGHTS}
    if not ep.enabled:
        return
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp.dispatcher = Dispatcher(
                ep.group,
                model.config.hidden_size,
                tokens_per_rank,
                model.config.n_routed_experts,
                transport="portable",
                device=model.device,
            )


def is_expert_weight(name: str) -> bool:
    return ".mlp.experts." in name and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS


def split(
    ep: ExpertParallel, named: list[tuple[str, nn.Parameter]]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated weights, this rank's share of the experts); all replicated without EP."""
    if not ep.enabled:
        return [p for _, p in named], []
    replicated = [p for name, p in named if not is_expert_weight(name)]
    sharded = [p for name, p in named if is_expert_weight(name)]
    return replicated, sharded


def reduce_expert_gradients(ep: ExpertParallel, params: list[nn.Parameter]) -> None:
    """grad ← (sum over the ranks holding the same experts) ÷ world; an expert no token chose
    takes part with zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if ep.replicas is not None:
        parallel.reduce_buckets(grads, ep.replicas, ep.rank.world)
    else:
        for g in grads:
            g.div_(ep.rank.world)


def local_rows(name: str, saved: torch.Tensor, target: torch.Tensor, rows: dict[str, range]) -> torch.Tensor:
    """A saved expert tensor holding every expert, narrowed to this rank's (others unchanged)."""
    held = rows.get(name)
    if (
        held is None
        or saved.dim() == 0
        or saved.shape[0] == target.shape[0]
        or saved.shape[1:] != target.shape[1:]
    ):
        return saved
    if saved.shape[0] < held.stop:
        return saved
    return saved[held.start : held.stop]
