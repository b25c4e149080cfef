"""Writing one reconcile's independent requests at once instead of one round trip after another.

A new deployment's pass applies a dozen children; one after another, on a busy API server, they
took 5–10 s. They go out together, workloads beside the ConfigMaps and Services their pods refer
to: a pod whose ConfigMap is not there yet waits for it (the kubelet retries the mount), and each
round waits for its slowest write (0.5–1 s in the creation burst at 2,048 nodes). The same pool
sends a pass's other independent requests (`each`, `start`, `started`): its lists for pruning,
its scalers' writes, its Events and its status."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

# Shared by every pass running at once. In the 512-node burst 16 did best: 8 queued the passes'
# writes behind each other, 32 slowed every request on the API server (docs/benchmarks.md).
WORKERS = 16

T = TypeVar("T")
U = TypeVar("U")

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="child-writes")


def start(call: Callable[[], T]) -> Future[T]:
    """call() on the pool, beside what the caller does next (a read the writes do not change)."""
    return _pool.submit(call)


def started(calls: Sequence[Callable[[], T]]) -> list[Future[T]]:
    """Every call on the pool at once, beside what the caller does next; `finish` waits for them."""
    return [_pool.submit(call) for call in calls]


def finish(futures: Sequence[Future[T]]) -> list[T]:
    """The results of `started` calls, the first failure raised once every call has finished."""
    wait(futures)
    return [future.result() for future in futures]


def each(items: Sequence[U], call: Callable[[U], T]) -> list[T]:
    """call(item) for every item at once; results in the items' order, and the first failure
    raised once every call has finished (none is left running behind the caller)."""
    if len(items) <= 1:
        return [call(item) for item in items]
    return finish([_pool.submit(call, item) for item in items])
