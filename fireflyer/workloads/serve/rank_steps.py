"""`fireflyer_serve_rank_step_seconds{rank}`: every rank's step time, observed on the unit's
leader from the ranks' step reports.

A histogram per rank through prometheus_client would cost a label lookup and a lock per rank and
step (144 per step on a DeepSeek-V3 decode unit); here one step's times for all ranks are binned
in one numpy call, and the series are built only when Prometheus scrapes."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Fewer buckets than the unit's step histogram: these series are multiplied by the ranks.
RANK_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0)


class RankStepHistogram(Collector):
    def __init__(self, name: str, ranks: int, buckets: Sequence[float] = RANK_STEP_BUCKETS) -> None:
        self.name = name
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros((ranks, len(buckets) + 1), dtype=np.int64)  # the last: above every bound
        self._sums = np.zeros(ranks, dtype=np.float64)
        self._lock = threading.Lock()  # the engine thread observes while the HTTP thread scrapes

    def observe(self, seconds: Sequence[float | None]) -> None:
        """One step: rank r took seconds[r] (None: it did not step, nothing is observed)."""
        values = np.array([np.nan if s is None else s for s in seconds], dtype=np.float64)
        ranks = np.flatnonzero(~np.isnan(values))
        if not ranks.size:
            return
        values = values[ranks]
        # Prometheus buckets are "≤ bound": a value on a bound belongs to that bound's bucket.
        slots = np.searchsorted(self.bounds, values, side="left")
        with self._lock:  # each rank once per call: plain fancy-index adds are exact
            self._counts[ranks, slots] += 1
            self._sums[ranks] += values

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, sums = self._counts.cumsum(axis=1), self._sums.copy()
        family = HistogramMetricFamily(self.name, "Wall time of each rank's step", labels=["rank"])
        labels = [f"{b:g}" for b in self.bounds] + ["+Inf"]
        for rank in range(counts.shape[0]):
            buckets = [(label, float(n)) for label, n in zip(labels, counts[rank], strict=True)]
            family.add_metric([str(rank)], buckets, float(sums[rank]))
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


__all__ = ["RANK_STEP_BUCKETS", "RankStepHistogram"]
