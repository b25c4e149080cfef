"""Placement of storage targets into chains, and the admin commands that create them.

3FS stores every chunk on a chain of targets (CR: `replication` copies, CRAQ; EC: data + parity
shards). We build chains disk by disk: the chains of disk index d use the targets on disk d of
`width` distinct storage nodes, every target is used exactly once, and chains are spread so that
every pair of storage nodes shares as equal a number of chains as possible — when a node fails,
its chains' recovery traffic then comes from all other nodes evenly.

Ids follow 3FS's own data-placement tool:
    target id = prefix·10¹¹ + node id·10⁵ + (disk + 1)·10² + (target on disk + 1)
    chain id  = prefix·10⁸  + (disk + 1)·10⁵ + chain number on that disk (from 1)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

TARGET_ID_PREFIX = 1
CHAIN_ID_PREFIX = 9
CHAIN_TABLE_ID = 1
MAX_TARGETS_PER_DISK = 99
MAX_DISKS = 998
MAX_CHAINS_PER_DISK = 99_999


class ChainTableError(ValueError):
    """A layout that cannot be built (the message says which input to change)."""


def target_id(node_id: int, disk: int, index: int, prefix: int = TARGET_ID_PREFIX) -> int:
    return prefix * 10**11 + node_id * 10**5 + (disk + 1) * 10**2 + (index + 1)


def chain_id(disk: int, number: int, prefix: int = CHAIN_ID_PREFIX) -> int:
    return prefix * 10**8 + (disk + 1) * 10**5 + number


@dataclass(frozen=True)
class Target:
    target_id: int
    node_id: int
    disk: int
    chain_id: int


@dataclass(frozen=True)
class Chain:
    chain_id: int
    targets: tuple[int, ...]  # target ids, head first


@dataclass(frozen=True)
class ChainTable:
    kind: str  # "CR" or "EC"
    width: int
    targets: tuple[Target, ...]
    chains: tuple[Chain, ...]

    def create_target_commands(self) -> list[str]:
        return [
            f"create-target --node-id {t.node_id} --disk-index {t.disk} --target-id {t.target_id}"
            f" --chain-id {t.chain_id} --use-new-chunk-engine"
            for t in self.targets
        ]

    def chains_csv(self) -> str:
        header = ",".join(["ChainId", *["TargetId"] * self.width])
        rows = [",".join(map(str, (c.chain_id, *c.targets))) for c in self.chains]
        return "\n".join([header, *rows]) + "\n"

    def chain_table_csv(self) -> str:
        return "\n".join(["ChainId", *(str(c.chain_id) for c in self.chains)]) + "\n"

    def pair_counts(self) -> dict[tuple[int, int], int]:
        """Chains shared by each pair of storage nodes."""
        node_of = {t.target_id: t.node_id for t in self.targets}
        nodes = sorted({t.node_id for t in self.targets})
        counts = {pair: 0 for pair in itertools.combinations(nodes, 2)}
        for chain in self.chains:
            members = sorted(node_of[t] for t in chain.targets)
            for pair in itertools.combinations(members, 2):
                counts[pair] += 1
        return counts


def plan_chain_table(
    node_ids: Sequence[int], disks: int, targets_per_disk: int, width: int, kind: str = "CR"
) -> ChainTable:
    """Chains of `width` targets on distinct nodes; every target of every disk used once."""
    nodes = sorted(node_ids)
    if len(set(nodes)) != len(nodes):
        raise ChainTableError("storage node ids must be distinct")
    if kind not in ("CR", "EC"):
        raise ChainTableError(f"chain table type must be CR or EC, not {kind!r}")
    if width < 1 or width > len(nodes):
        raise ChainTableError(
            f"chains of {width} targets need at least {width} storage nodes, have {len(nodes)}"
        )
    if not 1 <= targets_per_disk <= MAX_TARGETS_PER_DISK:
        raise ChainTableError(f"targets per disk must be 1–{MAX_TARGETS_PER_DISK}, not {targets_per_disk}")
    if not 1 <= disks <= MAX_DISKS:
        raise ChainTableError(f"disks per node must be 1–{MAX_DISKS}, not {disks}")
    if (len(nodes) * targets_per_disk) % width:
        raise ChainTableError(
            f"{len(nodes)} nodes × {targets_per_disk} targets per disk = {len(nodes) * targets_per_disk}"
            f" targets per disk index, not a multiple of the chain width {width}"
        )
    chains_per_disk = len(nodes) * targets_per_disk // width
    if chains_per_disk > MAX_CHAINS_PER_DISK:
        raise ChainTableError(
            f"{chains_per_disk} chains per disk exceed the id space ({MAX_CHAINS_PER_DISK})"
        )

    pairs = {pair: 0 for pair in itertools.combinations(nodes, 2)}
    targets: list[Target] = []
    chains: list[Chain] = []
    for disk in range(disks):
        groups = _balanced_groups(nodes, targets_per_disk, width, pairs, rotate=disk)
        used = dict.fromkeys(nodes, 0)
        for number, group in enumerate(groups, start=1):
            cid = chain_id(disk, number)
            members = []
            for node in group:
                tid = target_id(node, disk, used[node])
                used[node] += 1
                targets.append(Target(tid, node, disk, cid))
                members.append(tid)
            chains.append(Chain(cid, tuple(members)))
    return ChainTable(kind, width, tuple(targets), tuple(chains))


def _balanced_groups(
    nodes: list[int], per_node: int, width: int, pairs: dict[tuple[int, int], int], rotate: int
) -> list[tuple[int, ...]]:
    """Groups of `width` distinct nodes, each node in exactly `per_node` groups.

    Greedy: each member added is the node that has shared the fewest chains with the members
    chosen so far (ties: the most slots left), except that a node whose remaining slots equal the
    groups left must be taken, or the last groups would have to repeat it. Pair counts carry over
    between disks, so the balance is global. (Pairwise member swaps afterwards were tried; they
    cost 10× the time and did not lower the worst spread.)
    """
    remaining = dict.fromkeys(nodes, per_node)
    order = {node: (i - rotate) % len(nodes) for i, node in enumerate(nodes)}
    total = len(nodes) * per_node // width
    groups: list[list[int]] = []
    for made in range(total):
        groups_left = total - made
        group: list[int] = []
        while len(group) < width:
            candidates = [n for n in nodes if remaining[n] > 0 and n not in group]
            forced = [n for n in candidates if remaining[n] >= groups_left]
            pool = forced or candidates
            best = min(
                pool,
                key=lambda n: (_shared(pairs, n, group), -remaining[n], order[n]),
            )
            group.append(best)
        _count(pairs, group, +1)
        for node in group:
            remaining[node] -= 1
        groups.append(group)
    return [tuple(g) for g in groups]


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _shared(pairs: dict[tuple[int, int], int], node: int, group: Sequence[int]) -> int:
    return sum(pairs[_key(node, m)] for m in group)


def _count(pairs: dict[tuple[int, int], int], group: Sequence[int], delta: int) -> None:
    for a, b in itertools.combinations(group, 2):
        pairs[_key(a, b)] += delta
