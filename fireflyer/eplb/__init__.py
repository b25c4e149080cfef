"""Expert-parallel load balancing: rebalance algorithm and metrics (numpy only, no I/O)."""

from fireflyer.eplb.algorithm import Placement, rebalance
from fireflyer.eplb.metrics import balancedness, gpu_loads, imbalance

__all__ = ["Placement", "balancedness", "gpu_loads", "imbalance", "rebalance"]
