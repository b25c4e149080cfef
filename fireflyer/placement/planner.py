"""The gang planner: every unit lands whole inside the tightest fabric domain that fits it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fireflyer.placement.topology import LEVELS, ClusterTopology, NodeInfo

CLUSTER = "cluster"  # the pseudo-level above every labelled level


@dataclass(frozen=True)
class UnitRequest:
    role: str
    index: int
    nodes: int
    gpus_per_node: int
    rdma_per_node: int = 0

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class UnitPlacement:
    unit: UnitRequest
    level: str
    domain: str
    nodes: tuple[str, ...]
    """Planned nodes, by rank."""
    above_preferred: bool = False

    def describe(self) -> str:
        where = "the whole cluster" if self.level == CLUSTER else f"{self.level} {self.domain}"
        return f"{self.unit.name} → {where} ({len(self.nodes)} nodes: {', '.join(self.nodes)})"


@dataclass
class PlacementPlan:
    placed: list[UnitPlacement] = field(default_factory=list)
    unplaced: list[tuple[UnitRequest, str]] = field(default_factory=list)
    """Units that fit nowhere, with the shortfall."""
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unplaced

    def explain(self) -> str:
        lines = [p.describe() for p in self.placed]
        lines += [f"{u.name}: cannot place: {why}" for u, why in self.unplaced]
        lines += self.notes
        return "\n".join(lines)


def _eligible(node: NodeInfo, unit: UnitRequest, taken: set[str]) -> bool:
    return (
        node.usable
        and node.name not in taken
        and node.free_gpus >= unit.gpus_per_node
        and node.free_rdma >= unit.rdma_per_node
    )


def _pick_nodes(candidates: list[NodeInfo], count: int, levels_below: Sequence[str]) -> list[NodeInfo]:
    """Choose `count` nodes inside one domain: keep them in as few lower-level domains as
    possible (largest sub-domains first) and prefer nodes with the fewest free GPUs (best fit)."""

    def sub_key(node: NodeInfo) -> tuple[str, ...]:
        return tuple(node.domains.get(level, "") for level in reversed(levels_below))

    groups: dict[tuple[str, ...], list[NodeInfo]] = defaultdict(list)
    for node in candidates:
        groups[sub_key(node)].append(node)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    chosen: list[NodeInfo] = []
    for _, members in ordered:
        members.sort(key=lambda n: (n.free_gpus, n.name))
        chosen.extend(members[: count - len(chosen)])
        if len(chosen) == count:
            break
    return sorted(chosen, key=lambda n: n.name)


def _place_one(
    unit: UnitRequest,
    topology: ClusterTopology,
    taken: set[str],
    required_level: str,
    used_domains: Mapping[str, set[str]],
    spread: bool,
) -> UnitPlacement | str:
    eligible = [n for n in topology.usable() if _eligible(n, unit, taken)]
    if len(eligible) < unit.nodes:
        free = len(eligible)
        return (
            f"needs {unit.nodes} nodes with {unit.gpus_per_node} free GPUs and "
            f"{unit.rdma_per_node} free RDMA devices; {free} such nodes are free in the cluster"
        )
    max_rank = LEVELS.index(required_level) if required_level in LEVELS else len(LEVELS)
    levels = [lv for lv in topology.levels if LEVELS.index(lv) <= max_rank]
    best_shortfall = ""
    for depth, level in enumerate(levels):
        domains: dict[str, list[NodeInfo]] = defaultdict(list)
        for node in eligible:
            if level in node.domains:
                domains[node.domains[level]].append(node)
        fitting = {d: members for d, members in domains.items() if len(members) >= unit.nodes}
        if not fitting:
            largest = max((len(m) for m in domains.values()), default=0)
            best_shortfall = (
                f"needs {unit.nodes} nodes inside one {level}; the largest {level} "
                f"has {largest} eligible nodes"
            )
            continue
        if spread:
            fresh = {d: m for d, m in fitting.items() if d not in used_domains.get(level, set())}
            fitting = fresh or fitting

        # Best fit: the domain that strands the fewest free GPUs once the unit is in it.
        def stranded(item: tuple[str, list[NodeInfo]]) -> tuple[int, str]:
            domain, members = item
            return sum(n.free_gpus for n in members) - unit.nodes * unit.gpus_per_node, domain

        domain, members = min(fitting.items(), key=stranded)
        nodes = _pick_nodes(members, unit.nodes, levels[:depth])
        return UnitPlacement(unit, level, domain, tuple(n.name for n in nodes))
    if required_level not in topology.levels:  # that level is unlabelled: the cluster is one domain
        nodes = _pick_nodes(eligible, unit.nodes, topology.levels)
        return UnitPlacement(unit, CLUSTER, CLUSTER, tuple(n.name for n in nodes))
    return best_shortfall + f" (requiredLevel {required_level})"


def plan_units(
    units: Sequence[UnitRequest],
    topology: ClusterTopology,
    required_level: str = "spine",
    preferred_level: str | None = None,
    spread: bool = False,
    keep: Mapping[str, Sequence[str]] | None = None,
) -> PlacementPlan:
    """Place every unit whole. `keep` maps a unit name to nodes it already runs on: such a unit
    keeps them (stability) as long as they are all still usable."""
    plan = PlacementPlan()
    taken: set[str] = set()
    used_domains: dict[str, set[str]] = defaultdict(set)
    keep = keep or {}
    # Keep healthy existing units first, so that new units plan around them.
    pending: list[UnitRequest] = []
    for unit in units:
        existing = keep.get(unit.name)
        if (
            existing
            and len(existing) == unit.nodes
            and all(topology.nodes.get(n) is not None and topology.nodes[n].usable for n in existing)
        ):
            level, domain = _common_domain([topology.nodes[n] for n in existing], topology.levels)
            placement = UnitPlacement(unit, level, domain, tuple(existing))
            plan.placed.append(placement)
            taken.update(existing)
            used_domains[level].add(domain)
        else:
            pending.append(unit)
    # Larger units first: they are the hardest to fit (then by name, for determinism).
    for unit in sorted(pending, key=lambda u: (-u.nodes * u.gpus_per_node, u.role, u.index)):
        result = _place_one(unit, topology, taken, required_level, used_domains, spread)
        if isinstance(result, str):
            plan.unplaced.append((unit, result))
            continue
        if (
            preferred_level
            and result.level != CLUSTER
            and LEVELS.index(result.level) > LEVELS.index(preferred_level)
        ):
            result = UnitPlacement(result.unit, result.level, result.domain, result.nodes, True)
            plan.notes.append(
                f"{unit.name} placed in a {result.level}: no {preferred_level} had {unit.nodes} free nodes"
            )
        plan.placed.append(result)
        taken.update(result.nodes)
        used_domains[result.level].add(result.domain)
    order = {(u.role, u.index): i for i, u in enumerate(units)}
    plan.placed.sort(key=lambda p: order[(p.unit.role, p.unit.index)])
    return plan


def _common_domain(nodes: Sequence[NodeInfo], levels: Sequence[str]) -> tuple[str, str]:
    for level in levels:
        values = {n.domains.get(level) for n in nodes}
        if len(values) == 1 and None not in values:
            return level, str(values.pop())
    return CLUSTER, CLUSTER
