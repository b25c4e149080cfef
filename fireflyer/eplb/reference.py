"""The published EPLB greedy, written from its description with plain Python loops.

It is the yardstick that benchmarks and property tests compare `rebalance` against: pack expert
groups onto nodes with a cardinality-constrained greedy, replicate the expert with the highest
load per replica until the node's slots are full, then pack replicas onto GPUs with the same
greedy. Global policy: one node, one group.
"""

from __future__ import annotations

from collections.abc import Sequence


def _pack(weights: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Heaviest first onto the lightest pack that is not full. Returns (pack, rank in pack)."""
    capacity = len(weights) // num_packs
    loads = [0.0] * num_packs
    counts = [0] * num_packs
    pack = [0] * len(weights)
    rank = [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        best = -1
        for p in range(num_packs):
            if counts[p] < capacity and (best < 0 or loads[p] < loads[best]):
                best = p
        pack[item] = best
        rank[item] = counts[best]
        loads[best] += weights[item]
        counts[best] += 1
    return pack, rank


def _replicate(weights: Sequence[float], num_slots: int) -> tuple[list[int], list[int]]:
    """Slot → expert and replica counts: each extra slot to the highest load per replica."""
    slots = list(range(len(weights)))
    counts = [1] * len(weights)
    for _ in range(num_slots - len(weights)):
        best = 0
        for e in range(1, len(weights)):
            if weights[e] / counts[e] > weights[best] / counts[best]:
                best = e
        slots.append(best)
        counts[best] += 1
    return slots, counts


def _layer(weights: list[float], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int) -> list[int]:
    experts = len(weights)
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    group_load = [sum(weights[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    group_pack, group_rank = _pack(group_load, num_nodes)
    # "meta" experts: node-major order of the logical experts
    meta_to_log = [0] * experts
    for g in range(num_groups):
        for j in range(group_size):
            meta = (group_pack[g] * groups_per_node + group_rank[g]) * group_size + j
            meta_to_log[meta] = g * group_size + j
    per_node_experts = experts // num_nodes
    per_node_slots = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus
    result = [0] * num_slots
    for node in range(num_nodes):
        base = node * per_node_experts
        node_weights = [weights[meta_to_log[base + i]] for i in range(per_node_experts)]
        slot_meta, counts = _replicate(node_weights, per_node_slots)
        slot_load = [node_weights[m] / counts[m] for m in slot_meta]
        pack, rank = _pack(slot_load, gpus_per_node)
        for slot, meta in enumerate(slot_meta):
            position = node * per_node_slots + pack[slot] * slots_per_gpu + rank[slot]
            result[position] = meta_to_log[base + meta]
    return result


def rebalance_reference(
    load: Sequence[Sequence[float]],
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
) -> list[list[int]]:
    """phy2log [L][S] by the published greedy."""
    hierarchical = policy == "hierarchical" or (policy == "auto" and num_groups % num_nodes == 0)
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    return [_layer([float(x) for x in row], num_slots, num_groups, num_nodes, num_gpus) for row in load]
