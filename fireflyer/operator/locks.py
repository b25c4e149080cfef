"""Locks shared by controllers, and the operator's stop flag that every wait on them honours."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from types import TracebackType

STOPPING = threading.Event()
"""Set when the operator begins to shut down: queued work gives up instead of starting."""
_POLL_SECONDS = 0.1


class OperatorStopping(Exception):
    """Raised to work that would wait for a lock while the operator shuts down."""


class StoppableLock:
    """A re-entrant lock whose waiters give up (OperatorStopping) once the operator stops: a
    queue of reconciles behind it must not hold up the process's exit."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self) -> None:
        while not self._lock.acquire(timeout=_POLL_SECONDS):
            if STOPPING.is_set():
                raise OperatorStopping("the operator is stopping")
        if STOPPING.is_set():
            self._lock.release()
            raise OperatorStopping("the operator is stopping")

    def release(self) -> None:
        self._lock.release()

    def busy(self) -> bool:
        """Whether another thread holds the lock now (a hint: it may be released at once)."""
        if not self._lock.acquire(blocking=False):
            return True
        self._lock.release()
        return False

    def __enter__(self) -> StoppableLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


PLACEMENT = StoppableLock()
"""Held by every reconcile that plans GPU placement (inference units, training jobs): two plans
made at once could pick the same free nodes."""


class KeyedLocks:
    """One StoppableLock per key (an object's passes run one at a time, other objects' beside)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, StoppableLock] = {}
        self._guard = threading.Lock()

    def of(self, key: Hashable) -> StoppableLock:
        with self._guard:
            return self._locks.setdefault(key, StoppableLock())


OBJECTS = KeyedLocks()
"""Held by a reconcile for its whole pass, keyed by (kind, namespace, name)."""
