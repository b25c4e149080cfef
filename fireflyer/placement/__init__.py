"""RDMA-aware gang placement: a topology model from Node objects and a whole-unit planner.
Pure functions, no I/O."""

from fireflyer.placement.planner import PlacementPlan, UnitPlacement, UnitRequest, plan_units
from fireflyer.placement.topology import ClusterTopology, NodeInfo, build_topology, pod_node

__all__ = [
    "ClusterTopology",
    "NodeInfo",
    "PlacementPlan",
    "UnitPlacement",
    "UnitRequest",
    "build_topology",
    "plan_units",
    "pod_node",
]
