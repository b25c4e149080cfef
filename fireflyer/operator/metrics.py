"""Prometheus metrics of the operator process."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

RECONCILES = Counter("fireflyer_reconcile_total", "Reconciles by kind and outcome", ["kind", "outcome"])
RECONCILE_SECONDS = Histogram(
    "fireflyer_reconcile_duration_seconds",
    "Reconcile duration by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

F = TypeVar("F", bound=Callable[..., Any])


def timed(kind: str) -> Callable[[F], F]:
    """Count and time a reconcile handler (outcome: ok, retry, error)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = func(*args, **kwargs)
                outcome = "ok"
                return result
            except Exception as exc:
                outcome = "retry" if type(exc).__name__ == "TemporaryError" else "error"
                raise
            finally:
                RECONCILES.labels(kind, outcome).inc()
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)

        return wrapper  # type: ignore[return-value]

    return decorate
