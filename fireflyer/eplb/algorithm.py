"""The rebalance algorithm, vectorised across layers.

It follows the structure DeepSeek published for EPLB (pack expert groups onto nodes, replicate
hot experts inside each node, pack replicas onto the node's GPUs) and improves two steps:

* packing: longest-processing-time greedy with equal item counts per pack, then a local search
  that swaps an item of the heaviest pack with a lighter item elsewhere while that lowers the
  heaviest pack — the greedy result is the starting point, so the result is never worse;
* replica choice: replicas go to the expert with the highest load per replica (the greedy); a
  second choice caps every expert at one replica per pack (more cannot lower its share of the
  peak pack, and the greedy wastes slots on it under heavy skew), and whichever packs to the
  lower peak is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from fireflyer.eplb.metrics import FloatArray, IntArray, replica_counts

Policy = Literal["auto", "hierarchical", "global"]
_EPS = 1e-9


class PlacementError(ValueError):
    """The requested shape cannot hold a valid placement."""


@dataclass(frozen=True)
class Placement:
    phy2log: IntArray
    """[L, S] logical expert of each physical slot; slot s lives on GPU s // (S / num_gpus)."""
    log2phy: IntArray
    """[L, E, max_replicas] physical slots of each logical expert, -1 padded."""
    replica_counts: IntArray
    """[L, E] replicas of each logical expert."""


def _pack_greedy(weights: FloatArray, num_packs: int) -> IntArray:
    """LPT with equal counts: heaviest item first onto the lightest pack that still has room."""
    batch, items = weights.shape
    capacity = items // num_packs
    order = np.argsort(-weights, axis=1, kind="stable")
    sorted_weights = np.take_along_axis(weights, order, axis=1)
    # A full pack's load reads as infinite, so argmin alone finds the lightest pack with room.
    open_loads = np.zeros((batch, num_packs))
    counts = np.zeros((batch, num_packs), dtype=np.int64)
    pack_of_step = np.empty((batch, items), dtype=np.int64)
    rows = np.arange(batch)
    for step in range(items):
        target = np.argmin(open_loads, axis=1)
        pack_of_step[:, step] = target
        open_loads[rows, target] += sorted_weights[:, step]
        counts[rows, target] += 1
        full = counts[rows, target] == capacity
        if full.any():
            open_loads[rows[full], target[full]] = np.inf
    pack = np.empty_like(pack_of_step)
    np.put_along_axis(pack, order, pack_of_step, axis=1)
    return pack


def _pack_members(pack: IntArray, num_packs: int) -> IntArray:
    """[B, P, capacity] item indices of every pack, in item order."""
    batch, items = pack.shape
    order = np.argsort(pack, axis=1, kind="stable")
    return order.reshape(batch, num_packs, items // num_packs)


def _improve_by_swaps(weights: FloatArray, pack: IntArray, num_packs: int, max_rounds: int) -> IntArray:
    """Swap an item of the heaviest pack with a lighter item of another pack while the heaviest
    pack gets lighter and the other stays below the old peak. Layers converge independently."""
    batch, items = weights.shape
    if num_packs < 2 or items == num_packs:
        return pack
    pack = pack.copy()
    active = np.ones(batch, dtype=bool)
    for _ in range(max_rounds):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        w = weights[idx]
        p = pack[idx]
        loads = np.zeros((idx.size, num_packs))
        np.add.at(loads, (np.arange(idx.size)[:, None], p), w)
        heavy = np.argmax(loads, axis=1)
        peak = loads[np.arange(idx.size), heavy]
        members = _pack_members(p, num_packs)[np.arange(idx.size), heavy]  # [b, cap]
        w_heavy = np.take_along_axis(w, members, axis=1)  # [b, cap]
        delta = w_heavy[:, :, None] - w[:, None, :]  # [b, cap, items]
        other_load = np.take_along_axis(loads, p, axis=1)  # load of each item's pack
        new_peak = np.maximum(peak[:, None, None] - delta, other_load[:, None, :] + delta)
        valid = (delta > _EPS) & (p != heavy[:, None])[:, None, :]
        score = np.where(valid, new_peak, np.inf).reshape(idx.size, -1)
        best = np.argmin(score, axis=1)
        best_score = score[np.arange(idx.size), best]
        improves = best_score < peak - _EPS * np.maximum(peak, 1.0)
        if not improves.any():
            break
        sel = np.nonzero(improves)[0]
        a = members[sel, best[sel] // items]
        b = best[sel] % items
        layer = idx[sel]
        pack_a = pack[layer, a].copy()
        pack[layer, a] = pack[layer, b]
        pack[layer, b] = pack_a
        active[:] = False
        active[layer] = True
    return pack


def balanced_packing(weights: FloatArray, num_packs: int, refine: bool = True) -> IntArray:
    """Pack [B, N] items into num_packs packs of N / num_packs items each, minimising the heaviest."""
    items = weights.shape[1]
    if items % num_packs:
        raise PlacementError(f"{items} items do not split evenly into {num_packs} packs")
    pack = _pack_greedy(weights, num_packs)
    if refine:
        pack = _improve_by_swaps(weights, pack, num_packs, max_rounds=4 * items)
    return pack


def replicate(weights: FloatArray, num_slots: int, max_replicas: int | None = None) -> IntArray:
    """[B, num_slots] slot → expert: every expert once, each extra slot to the expert with the
    highest load per replica (ties: lowest expert id). With max_replicas, experts already holding
    that many replicas are passed over while any other expert can take one."""
    batch, experts = weights.shape
    if num_slots < experts:
        raise PlacementError(f"{num_slots} slots cannot hold {experts} experts")
    slots = np.empty((batch, num_slots), dtype=np.int64)
    slots[:, :experts] = np.arange(experts)
    counts = np.ones((batch, experts), dtype=np.int64)
    rows = np.arange(batch)
    for slot in range(experts, num_slots):
        per_replica = weights / counts
        pick = np.argmax(per_replica, axis=1)
        if max_replicas is not None:
            open_score = np.where(counts < max_replicas, per_replica, -1.0)
            open_pick = np.argmax(open_score, axis=1)
            pick = np.where(open_score[rows, open_pick] >= 0, open_pick, pick)
        slots[:, slot] = pick
        counts[rows, pick] += 1
    return slots


def _replica_loads(weights: FloatArray, slot_expert: IntArray) -> FloatArray:
    """[B, S] load each slot carries: its expert's load split evenly over the expert's replicas."""
    rows = np.arange(weights.shape[0])[:, None]
    counts = np.zeros_like(weights, dtype=np.int64)
    np.add.at(counts, (rows, slot_expert), 1)
    return weights[rows, slot_expert] / counts[rows, slot_expert]


def _peak(per_slot: FloatArray, pack: IntArray, num_packs: int) -> FloatArray:
    loads = np.zeros((per_slot.shape[0], num_packs))
    np.add.at(loads, (np.arange(per_slot.shape[0])[:, None], pack), per_slot)
    return loads.max(axis=1)


def _place(weights: FloatArray, num_slots: int, num_packs: int, refine: bool) -> IntArray:
    """Replicate then pack, for [B, E] loads → [B, num_slots] slot → expert, pack-major slots."""
    slot_expert = replicate(weights, num_slots)
    per_slot = _replica_loads(weights, slot_expert)
    pack = _pack_greedy(per_slot, num_packs)
    if refine:
        # A replica beyond one per pack cannot lower its expert's share of the peak pack (two
        # replicas land together), so also try capping replicas at the pack count; keep whichever
        # packs lower. Rows where the cap changes nothing keep the greedy choice.
        over_cap = (replica_counts(slot_expert, weights.shape[1]) > num_packs).any(axis=1)
        if over_cap.any():
            differ = np.nonzero(over_cap)[0]
            capped = replicate(weights[differ], num_slots, max_replicas=num_packs)
            capped_per_slot = _replica_loads(weights[differ], capped)
            capped_pack = _pack_greedy(capped_per_slot, num_packs)
            greedy_peak = _peak(per_slot[differ], pack[differ], num_packs)
            better = _peak(capped_per_slot, capped_pack, num_packs) < greedy_peak * (1 - _EPS)
            take = differ[better]
            slot_expert[take] = capped[better]
            per_slot[take] = capped_per_slot[better]
            pack[take] = capped_pack[better]
        pack = _improve_by_swaps(per_slot, pack, num_packs, max_rounds=4 * num_slots)
    # Order slots pack by pack; inside a pack, heavier replicas first (stable, deterministic).
    key = pack * 2.0 + (1.0 - per_slot / (per_slot.max(axis=1, keepdims=True) + 1.0))
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(slot_expert, order, axis=1)


def _global(load: FloatArray, num_slots: int, num_gpus: int, refine: bool) -> IntArray:
    return _place(load, num_slots, num_gpus, refine)


def _hierarchical(
    load: FloatArray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int, refine: bool
) -> IntArray:
    layers, experts = load.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    # 1. expert groups onto nodes, balancing node totals
    group_load = load.reshape(layers, num_groups, group_size).sum(axis=2)
    group_node = balanced_packing(group_load, num_nodes, refine)  # [L, G]
    node_groups = _pack_members(group_node, num_nodes)  # [L, N, groups_per_node]
    # experts of each node, node-major: [L, N, experts_per_node]
    node_experts = (node_groups[:, :, :, None] * group_size + np.arange(group_size)).reshape(
        layers, num_nodes, groups_per_node * group_size
    )
    node_load = np.take_along_axis(load, node_experts.reshape(layers, -1), axis=1).reshape(
        layers * num_nodes, -1
    )
    # 2.+3. replicas inside each node, packed onto the node's GPUs
    local = _place(node_load, num_slots // num_nodes, num_gpus // num_nodes, refine)
    local = local.reshape(layers, num_nodes, -1)
    return np.take_along_axis(node_experts, local, axis=2).reshape(layers, num_slots)


def _validate_shape(load: FloatArray, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    experts = load.shape[1]
    problems = []
    if num_slots < experts:
        problems.append(f"num_slots ({num_slots}) < experts ({experts})")
    if num_gpus < 1 or num_slots % num_gpus:
        problems.append(f"num_slots ({num_slots}) must be divisible by num_gpus ({num_gpus})")
    if num_nodes < 1 or num_gpus % num_nodes:
        problems.append(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    if num_groups < 1 or experts % num_groups:
        problems.append(f"experts ({experts}) must be divisible by num_groups ({num_groups})")
    if np.any(~np.isfinite(load)) or np.any(load < 0):
        problems.append("load must be finite and non-negative")
    if problems:
        raise PlacementError("; ".join(problems))


def choose_policy(policy: Policy, num_groups: int, num_nodes: int, num_slots: int) -> str:
    hierarchical_fits = num_groups % num_nodes == 0 and num_slots % num_nodes == 0
    if policy == "auto":
        return "hierarchical" if hierarchical_fits else "global"
    if policy == "hierarchical" and not hierarchical_fits:
        raise PlacementError(
            f"hierarchical needs expert groups ({num_groups}) divisible by nodes ({num_nodes})"
        )
    return policy


def rebalance(
    load: npt.ArrayLike,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: Policy = "auto",
    *,
    refine: bool = True,
) -> Placement:
    """Compute a placement of L layers × E logical experts onto num_slots physical slots spread
    evenly over num_gpus GPUs on num_nodes nodes. load[l, e] is tokens routed to expert e."""
    weights = np.asarray(load, dtype=np.float64)
    if weights.ndim != 2:
        raise PlacementError(f"load must be [layers, experts], got shape {weights.shape}")
    _validate_shape(weights, num_slots, num_groups, num_nodes, num_gpus)
    chosen = choose_policy(policy, num_groups, num_nodes, num_slots)
    if chosen == "hierarchical":
        phy2log = _hierarchical(weights, num_slots, num_groups, num_nodes, num_gpus, refine)
    else:
        phy2log = _global(weights, num_slots, num_gpus, refine)
    return from_phy2log(phy2log, weights.shape[1])


def from_phy2log(phy2log: npt.ArrayLike, num_logical: int) -> Placement:
    table = np.asarray(phy2log, dtype=np.int64)
    counts = replica_counts(table, num_logical)
    layers = table.shape[0]
    max_rep = int(counts.max()) if counts.size else 1
    log2phy = np.full((layers, num_logical, max_rep), -1, dtype=np.int64)
    order = np.argsort(table, axis=1, kind="stable")  # slots grouped by expert, ascending
    sorted_experts = np.take_along_axis(table, order, axis=1)
    starts = np.cumsum(counts, axis=1) - counts
    rank = np.arange(table.shape[1])[None, :] - np.take_along_axis(starts, sorted_experts, axis=1)
    log2phy[np.arange(layers)[:, None], sorted_experts, rank] = order
    return Placement(table, log2phy, counts)


def validate(placement: Placement, num_logical: int, num_gpus: int) -> list[str]:
    """Problems that make a placement unusable (empty when it is valid)."""
    problems = []
    table = placement.phy2log
    if table.ndim != 2:
        return [f"phy2log must be 2-D, got {table.ndim}-D"]
    if table.shape[1] % num_gpus:
        problems.append(f"{table.shape[1]} slots do not split evenly over {num_gpus} GPUs")
    if table.size and (table.min() < 0 or table.max() >= num_logical):
        problems.append(f"phy2log holds ids outside 0..{num_logical - 1}")
        return problems
    missing = np.argwhere(replica_counts(table, num_logical) == 0)
    if missing.size:
        layer, expert = missing[0]
        problems.append(f"layer {layer}: expert {expert} has no replica ({len(missing)} such)")
    return problems
