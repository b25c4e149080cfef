"""The engine's expert load window: tokens routed to each logical expert of each MoE layer over
the last `window_seconds`, served at `GET /v1/eplb/load` (docs/eplb.md, "The load contract").

One int64 counter tensor [moe layers, routed experts] lives on the model's device; each MoE
layer's `load` is its row, so the forward pass counts with a `scatter_add_` and no host
synchronisation, inside CUDA graph replays too (the graphs capture the count into this tensor,
which is therefore made before the graphs and never reallocated; padding rows do not count).

Only the engine thread reads the device counters, at step boundaries (`tick`): every
`bucket_seconds` it closes a bucket (the counts since the previous one, copied to the host) into
a ring that spans the window, and at most every `publish_seconds` (or when the engine goes idle)
it publishes the counts since the last bucket. Readers on other threads (`window`, `report`) sum
those host copies under a lock and never touch the device tensor: the live counts they see are
at most `publish_seconds` old while the engine is busy, exact once it is idle.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fireflyer.eplb.metrics import table_balancedness
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.model.moe import MoE

Counts = npt.NDArray[np.int64]


class LoadWindow:
    def __init__(
        self,
        moe_layers: Sequence[MoE],
        experts: int,
        device: torch.device | str,
        *,
        window_seconds: float = 600.0,
        bucket_seconds: float = 10.0,
        publish_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("window_seconds", window_seconds), ("bucket_seconds", bucket_seconds)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if not moe_layers:
            raise ValueError("a load window needs at least one MoE layer")
        self.layers = len(moe_layers)
        self.experts = experts
        self.window_seconds = window_seconds
        self.bucket_seconds = min(bucket_seconds, window_seconds)
        self.publish_seconds = publish_seconds
        self._clock = clock
        # The device counters: written by the forward pass, read by the engine thread only.
        self.counters = torch.zeros(self.layers, experts, dtype=torch.long, device=device)
        self._moes = list(moe_layers)
        self._rows = list(self.counters.unbind(0))  # views: counting into them counts into `counters`
        for moe, row in zip(self._moes, self._rows, strict=True):
            moe.load = row
        # Called on the engine thread after a bucket closes (e.g. to update a gauge).
        self.on_bucket: Callable[[LoadWindow], None] | None = None
        # Engine-thread state.
        self._taken = self._zeros()  # device counts already closed into buckets
        self._live = self._zeros()  # device counts since the last bucket, as last read
        self._dirty = False  # steps have run since the last read
        self._bucket_start = self._published_at = clock()
        # Shared with readers, under the lock: host copies only.
        self._lock = threading.Lock()
        self._buckets: collections.deque[tuple[float, Counts]] = collections.deque()  # (end, counts)
        self._partial = self._zeros()

    @classmethod
    def for_model(cls, model: DeepseekV3, **kwargs: Any) -> LoadWindow | None:
        """A window counting every MoE layer of `model`; None for a model without MoE layers."""
        moes = [block.mlp for block in model.blocks if isinstance(block.mlp, MoE)]
        if not moes:
            return None
        return cls(moes, model.config.n_routed_experts, model.device, **kwargs)

    def _zeros(self) -> Counts:
        return np.zeros((self.layers, self.experts), dtype=np.int64)

    # -- the engine thread -----------------------------------------------------------------------

    def tick(self, *, stepped: bool = True, flush: bool = False) -> bool:
        """At a step boundary (`stepped`: a step ran since the last call; False while idle):
        closes the current bucket once `bucket_seconds` have passed since it began, otherwise
        publishes the counts since the last bucket when `publish_seconds` have passed or `flush`.
        Reads the device counters only when steps ran. Returns whether a bucket closed."""
        now = self._clock()
        self._dirty = self._dirty or stepped
        closing = now - self._bucket_start >= self.bucket_seconds
        if not (closing or flush or now - self._published_at >= self.publish_seconds):
            return False
        if self._dirty:
            self._live = self.counters.cpu().numpy() - self._taken
            self._dirty = False
        live, self._published_at = self._live, now
        if closing:
            self._taken = self._taken + live
            self._live = self._zeros()
            self._bucket_start = now
        with self._lock:
            if closing:
                self._buckets.append((now, live))
                self._partial = self._live
                horizon = now - self.window_seconds
                while self._buckets and self._buckets[0][0] <= horizon:
                    self._buckets.popleft()
            else:
                self._partial = live
        if closing and self.on_bucket is not None:
            self.on_bucket(self)
        return closing

    def reset(self) -> None:
        """Forget every count (warm-up runs are not load); the counters stay the same tensor."""
        self.counters.zero_()
        self._taken, self._live, self._dirty = self._zeros(), self._zeros(), False
        self._bucket_start = self._published_at = self._clock()
        with self._lock:
            self._buckets.clear()
            self._partial = self._zeros()

    def detach(self) -> None:
        """Stop counting: the MoE layers that still count into this window no longer do."""
        for moe, row in zip(self._moes, self._rows, strict=True):
            if moe.load is row:
                moe.load = None

    # -- any thread ------------------------------------------------------------------------------

    def window(self, seconds: float | None = None) -> Counts:
        """Tokens per (MoE layer, logical expert) over the last `seconds` (default, and at most,
        `window_seconds`): the closed buckets that overlap that span (so up to one bucket more),
        and the published counts since the last bucket. A host array of its own."""
        span = self._span(seconds)
        horizon = self._clock() - span
        with self._lock:
            total = self._partial.copy()
            for end, counts in reversed(self._buckets):
                if end <= horizon:
                    break
                total += counts
        return total

    def report(self, seconds: float | None = None) -> dict[str, Any]:
        """The load contract's JSON object: {"layers", "experts", "windowSeconds", "tokens"}."""
        span = self._span(seconds)
        return {
            "layers": self.layers,
            "experts": self.experts,
            "windowSeconds": int(span) if float(span).is_integer() else span,
            "tokens": self.window(span).tolist(),
        }

    def balancedness(self, seconds: float | None = None) -> float:
        """Mean over MoE layers of mean expert load / max expert load over the window (1.0 is
        perfect; a layer without tokens counts 1, as in `fireflyer.eplb.balancedness`). Per
        logical expert: a one-rank unit hosts every expert, so expert and GPU balance differ."""
        return balancedness(self.window(seconds))

    def _span(self, seconds: float | None) -> float:
        if seconds is None:
            return self.window_seconds
        if not (math.isfinite(seconds) and 0 < seconds <= self.window_seconds):
            raise ValueError(
                f"windowSeconds must be a number of seconds in (0, {self.window_seconds:g}], not {seconds!r}"
            )
        return seconds


def balancedness(load: npt.ArrayLike) -> float:
    """Mean over layers of mean / max load of a [layers, experts] table; idle layers count 1."""
    return table_balancedness(load)


__all__ = ["LoadWindow", "balancedness"]
