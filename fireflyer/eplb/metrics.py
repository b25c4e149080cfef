"""How balanced a placement is: per-GPU load when tokens spread evenly over an expert's replicas."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def replica_counts(phy2log: IntArray, num_logical: int) -> IntArray:
    layers = phy2log.shape[0]
    counts = np.zeros((layers, num_logical), dtype=np.int64)
    np.add.at(counts, (np.arange(layers)[:, None], phy2log), 1)
    return counts


def gpu_loads(load: npt.ArrayLike, phy2log: IntArray, num_gpus: int) -> FloatArray:
    """[L, num_gpus] load of each GPU: every slot carries load[expert] / replicas(expert)."""
    weights = np.asarray(load, dtype=np.float64)
    counts = replica_counts(phy2log, weights.shape[1])
    rows = np.arange(weights.shape[0])[:, None]
    per_slot = weights[rows, phy2log] / counts[rows, phy2log]
    return per_slot.reshape(weights.shape[0], num_gpus, -1).sum(axis=2)


def table_balancedness(table: npt.ArrayLike) -> float:
    """Mean over the rows (layers) of mean / max of a [layers, columns] load table (columns: GPUs
    or experts; 1.0 is perfect). Idle layers count 1."""
    loads = np.asarray(table, dtype=np.float64)
    peak = loads.max(axis=1)
    ratio = np.divide(loads.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)
    return float(ratio.mean())


def balancedness(load: npt.ArrayLike, phy2log: IntArray, num_gpus: int) -> float:
    """Mean over layers of mean GPU load / max GPU load (1.0 is perfect). Idle layers count 1."""
    return table_balancedness(gpu_loads(load, phy2log, num_gpus))


def imbalance(load: npt.ArrayLike, phy2log: IntArray, num_gpus: int) -> float:
    """Mean over layers of max GPU load / mean GPU load (1.0 is perfect)."""
    gpu = gpu_loads(load, phy2log, num_gpus)
    mean = gpu.mean(axis=1)
    ratio = np.divide(gpu.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
    return float(ratio.mean())
