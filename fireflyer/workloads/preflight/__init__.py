"""Preflight of an inference unit: before it serves, its ranks meet (`join_unit`), exchange tokens
through the expert-parallel Dispatcher and verify them, and measure all-to-all bandwidth against a
floor (`check_unit`). A failure is a PreflightError whose message names the ranks, pods and links.

    unit = join_unit("leader:29500", rank, world, timeout=300, name=pod_name)
    dist.init_process_group(backend, store=unit.store, rank=unit.rank, world_size=unit.world)
    report = check_unit(dist.group.WORLD, unit.rank, unit.world, store=unit.store, device=device,
                        min_gbps=50.0, timeout=300)
    log.info(report.summary())

`fireflyer preflight` runs the same as a program (fireflyer.workloads.preflight.launch). The names
below load torch on first use, so the command's parser can be built without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fireflyer.workloads.preflight.failure import PreflightError

if TYPE_CHECKING:
    from fireflyer.workloads.preflight.checks import PreflightReport, check_unit
    from fireflyer.workloads.preflight.unit import Member, Unit, join_unit

__all__ = ["Member", "PreflightError", "PreflightReport", "Unit", "check_unit", "join_unit"]

_LAZY = {
    "PreflightReport": "checks",
    "check_unit": "checks",
    "Member": "unit",
    "Unit": "unit",
    "join_unit": "unit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
