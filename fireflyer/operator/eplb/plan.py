"""Decide whether a role gets a new ExpertPlacement generation. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fireflyer.api.inference import InferenceDeploymentSpec
from fireflyer.eplb import balancedness, rebalance
from fireflyer.eplb.algorithm import PlacementError, validate


class LoadError(ValueError):
    """A load window that does not follow the contract."""


def parse_window(payload: Any, layers: int, experts: int, source: str) -> np.ndarray:
    """GET /v1/eplb/load → {"layers", "experts", "windowSeconds", "tokens": [[…]]}."""
    if not isinstance(payload, dict) or "tokens" not in payload:
        raise LoadError(f"{source}: expected an object with a 'tokens' table")
    try:
        tokens = np.asarray(payload["tokens"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{source}: 'tokens' is not a numeric table: {exc}") from exc
    if tokens.shape != (layers, experts):
        raise LoadError(f"{source}: tokens has shape {tokens.shape}, expected ({layers}, {experts})")
    if payload.get("layers", layers) != layers or payload.get("experts", experts) != experts:
        raise LoadError(f"{source}: layers/experts do not match the model")
    if not np.all(np.isfinite(tokens)) or np.any(tokens < 0):
        raise LoadError(f"{source}: tokens must be finite and non-negative")
    return tokens


@dataclass
class Decision:
    publish: bool
    reason: str
    before: float
    after: float
    phy2log: np.ndarray | None = None


def current_table(
    placements: list[dict[str, Any]], layers: int, experts: int, slots: int
) -> tuple[int, np.ndarray]:
    """(generation, phy2log) of the newest usable ExpertPlacement, or (0, round robin)."""
    best: tuple[int, np.ndarray] | None = None
    for item in placements:
        spec = item.get("spec", {})
        table = np.asarray(spec.get("phy2log", []), dtype=np.int64)
        if table.shape != (layers, slots) or spec.get("logicalExperts") != experts:
            continue
        generation = int(spec.get("generation", 0))
        if best is None or generation > best[0]:
            best = (generation, table)
    if best is None:
        latest = max((int(p.get("spec", {}).get("generation", 0)) for p in placements), default=0)
        return latest, np.tile(np.arange(slots) % experts, (layers, 1))
    return best


def decide(spec: InferenceDeploymentSpec, role_name: str, load: np.ndarray, current: np.ndarray) -> Decision:
    role = getattr(spec, role_name)
    arch = spec.model.architecture
    gpus = role.parallelism.expert
    slots = arch.routed_experts + spec.eplb.redundant_experts
    before = balancedness(load, current, gpus)
    if load.sum() == 0:
        return Decision(False, "the load window is empty", before, before)
    try:
        placement = rebalance(load, slots, arch.expert_groups, role.nodes_per_unit, gpus, spec.eplb.policy)
    except PlacementError as exc:
        return Decision(False, f"cannot rebalance: {exc}", before, before)
    problems = validate(placement, arch.routed_experts, gpus)
    if problems:
        return Decision(False, "invalid placement: " + "; ".join(problems), before, before)
    after = balancedness(load, placement.phy2log, gpus)
    if after - before < spec.eplb.min_gain:
        return Decision(
            False, f"gain {after - before:+.4f} below minGain {spec.eplb.min_gain}", before, after
        )
    return Decision(True, f"balancedness {before:.4f} → {after:.4f}", before, after, placement.phy2log)
