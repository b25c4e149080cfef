"""Replacing a failed storage node without any chain losing its last serving target.

One node at a time, in order:
  remove      offline the failed node's targets and take them out of their chains — only when
              every affected chain keeps another SERVING target;
  reschedule  give the pod a new 3FS node id and let it start on a spare node;
  add         create a target on the replacement for every removed one (same disk, same chain)
              and add it to the chain;
  sync        wait until every chain serves again;
  unregister  remove the failed node from mgmtd.
"""

from __future__ import annotations

from dataclasses import dataclass

from fireflyer.threefs.admin import AdminStep, Health
from fireflyer.threefs.chaintable import target_id

STEPS = ("remove", "reschedule", "add", "sync", "unregister")


@dataclass(frozen=True)
class RemovedTarget:
    chain_id: int
    target_id: int
    disk: int


class ReplacementBlocked(Exception):
    """Removing the node's targets now would leave a chain without a serving target."""


def targets_to_remove(health: Health, node_id: int) -> list[RemovedTarget]:
    """The failed node's targets that are still in chains, checked against the last-target rule."""
    by_target = {t.target_id: t for t in health.targets}
    removed = []
    blocked = []
    for chain in health.chains:
        members = [by_target[t] for t, _ in chain.targets if t in by_target]
        mine = [t for t in members if t.node_id == node_id]
        if not mine:
            continue
        others_serving = [t for t in members if t.node_id != node_id and t.public_state == "SERVING"]
        if not others_serving:
            blocked.append(chain.chain_id)
            continue
        removed += [RemovedTarget(chain.chain_id, t.target_id, t.disk or 0) for t in mine]
    if blocked:
        shown = ", ".join(map(str, blocked[:8])) + (" …" if len(blocked) > 8 else "")
        raise ReplacementBlocked(
            f"chains {shown} have no serving target besides node {node_id}'s; waiting for them to recover"
        )
    return removed


def remove_step(ordinal: int, node_id: int, removed: list[RemovedTarget], health: Health) -> AdminStep:
    state = {t.target_id: t.public_state for t in health.targets}
    offline = [
        f"offline-target --node-id {node_id} --target-id {r.target_id}"
        for r in removed
        if state.get(r.target_id) not in ("OFFLINE", "LASTSRV")
    ]
    remove = [f"update-chain --mode remove {r.chain_id} {r.target_id}" for r in removed]
    return AdminStep(f"replace-{ordinal}-remove", (*offline, *remove))


def replacement_targets(removed: list[RemovedTarget], new_node_id: int) -> list[tuple[RemovedTarget, int]]:
    """A new target id on the replacement for every removed target (index per disk from 0)."""
    per_disk: dict[int, int] = {}
    out = []
    for r in sorted(removed, key=lambda r: (r.disk, r.chain_id)):
        index = per_disk.get(r.disk, 0)
        per_disk[r.disk] = index + 1
        out.append((r, target_id(new_node_id, r.disk, index)))
    return out


def add_step(ordinal: int, removed: list[RemovedTarget], new_node_id: int) -> AdminStep:
    pairs = replacement_targets(removed, new_node_id)
    create = [
        f"create-target --node-id {new_node_id} --disk-index {r.disk} --target-id {new}"
        f" --chain-id {r.chain_id} --use-new-chunk-engine"
        for r, new in pairs
    ]
    add = [f"update-chain --mode add {r.chain_id} {new}" for r, new in pairs]
    return AdminStep(f"replace-{ordinal}-add", (*create, *add))


def unregister_step(ordinal: int, node_id: int) -> AdminStep:
    return AdminStep(f"replace-{ordinal}-unregister", (f"unregister-node {node_id} STORAGE",))
