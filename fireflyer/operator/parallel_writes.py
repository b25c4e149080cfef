"""Writing one reconcile's independent children at once instead of one round trip after another.

A new deployment's pass applies a dozen children; one after another, on a busy API server, they
took 5–10 s. Children are written in waves: what workloads refer to (Services, ConfigMaps,
scalers' targets) first, then the workloads, each wave's objects in parallel. The same pool
sends a pass's other independent requests (`each`, `start`): its lists for pruning, its scalers'
writes and its Events."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

# Kinds whose pods start from what the other children provide: written after them.
WORKLOAD_KINDS = frozenset({"StatefulSet", "Deployment", "DaemonSet", "Job"})
# Shared by every pass running at once. In the 512-node burst 16 did best: 8 queued the passes'
# writes behind each other, 32 slowed every request on the API server (docs/benchmarks.md).
WORKERS = 16

T = TypeVar("T")
U = TypeVar("U")

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="child-writes")


def waves(objects: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The objects in write order: everything but workloads, then the workloads (input order
    kept within a wave; empty waves left out)."""
    first = [o for o in objects if o.get("kind") not in WORKLOAD_KINDS]
    second = [o for o in objects if o.get("kind") in WORKLOAD_KINDS]
    return [wave for wave in (first, second) if wave]


def write_all(objects: Sequence[dict[str, Any]], write: Callable[[dict[str, Any]], T]) -> list[T]:
    """write(obj) for every object, wave by wave, each wave in parallel. A failed write stops
    the later waves (a workload is not written without what it refers to) and is raised once
    the rest of its wave has finished; the results come in the objects' wave order."""
    results: list[T] = []
    for wave in waves(objects):
        results.extend(each(wave, write))
    return results


def start(call: Callable[[], T]) -> Future[T]:
    """call() on the pool, beside what the caller does next (a read the writes do not change)."""
    return _pool.submit(call)


def each(items: Sequence[U], call: Callable[[U], T]) -> list[T]:
    """call(item) for every item at once; results in the items' order, and the first failure
    raised once every call has finished (none is left running behind the caller)."""
    if len(items) <= 1:
        return [call(item) for item in items]
    futures = [_pool.submit(call, item) for item in items]
    wait(futures)
    return [future.result() for future in futures]
