"""Synthetic expert loads for sizing and benchmarks (deterministic given the generator)."""

from __future__ import annotations

import numpy as np

from fireflyer.eplb.metrics import FloatArray


def zipf_load(
    layers: int, experts: int, exponent: float, rng: np.random.Generator, tokens: float = 1e5
) -> FloatArray:
    """Per layer, expert popularity ∝ 1 / rank^exponent over a random permutation of experts,
    with ±20 % noise."""
    base = 1.0 / np.arange(1, experts + 1) ** exponent
    rows = [rng.permutation(base) * rng.uniform(0.8, 1.2, experts) for _ in range(layers)]
    load = np.stack(rows)
    return load / load.sum(axis=1, keepdims=True) * tokens


def drifting_loads(
    layers: int, experts: int, exponent: float, steps: int, drift: float, rng: np.random.Generator
) -> list[FloatArray]:
    """A sequence of windows whose popularity drifts: each step mixes in a fresh random pattern."""
    current = zipf_load(layers, experts, exponent, rng)
    windows = [current]
    for _ in range(steps - 1):
        current = (1 - drift) * current + drift * zipf_load(layers, experts, exponent, rng)
        windows.append(current)
    return windows
