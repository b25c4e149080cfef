"""Periodic work per object (drift repair, deadlines, polling) without kopf timers.

A kopf timer or daemon puts a finalizer on every object it serves, which only a running operator
removes: with the operator stopped or uninstalled, deleting such an object, or its namespace,
would hang. Owner references already clean up our children, so nothing needs a finalizer; each
object's own handlers arm its next periodic run instead. A run that finds the object gone does
not re-arm, and an operator restart re-arms every object through the resume handlers."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Hashable

from fireflyer.operator.locks import STOPPING, OperatorStopping

log = logging.getLogger(__name__)


class Resync:
    """One pending run per key, `interval` seconds (±10 %, so objects do not tick together) after
    it was armed. `run` returns whether the object still exists (whether to re-arm); an error is
    logged and the run re-armed, as kopf retries a failed timer."""

    def __init__(self, name: str, interval: float, *, timer: type[threading.Timer] = threading.Timer) -> None:
        self.name = name
        self.interval = interval
        self._timer = timer
        self._armed: dict[Hashable, threading.Timer] = {}
        self._lock = threading.Lock()

    def arm(self, key: Hashable, run: Callable[[], bool]) -> None:
        """Make sure `run` runs for `key` within about `interval` seconds; an already armed key
        keeps its earlier time."""
        with self._lock:
            if key in self._armed:
                return
            delay = self.interval * random.uniform(0.9, 1.1)
            timer = self._timer(delay, self._fire, (key, run))
            timer.daemon = True
            self._armed[key] = timer
        timer.start()

    def armed(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._armed

    def _fire(self, key: Hashable, run: Callable[[], bool]) -> None:
        with self._lock:
            self._armed.pop(key, None)
        if STOPPING.is_set():
            return
        try:
            keep = run()
        except OperatorStopping:
            return
        except Exception:
            log.exception("%s of %s failed; trying again in %.0f s", self.name, key, self.interval)
            keep = True
        if keep and not STOPPING.is_set():
            self.arm(key, run)

    def cancel_all(self) -> None:
        with self._lock:
            timers, self._armed = list(self._armed.values()), {}
        for timer in timers:
            timer.cancel()


__all__ = ["Resync"]
