"""Coalescing bursts of child events into few reconciles: a small work queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

from fireflyer.operator.locks import STOPPING, OperatorStopping

log = logging.getLogger(__name__)
_IDLE_WAIT_SECONDS = 1.0  # how often an idle worker looks at the stop flag


class Debouncer:
    """At most one run per `window` seconds per key, never two at once for one key, and always
    one run after the last request (trailing edge), so a dropped request never leaves a change
    unreconciled. Runs happen on the debouncer's own worker threads: a request never blocks the
    caller (kopf's handler threads), however long the runs queue."""

    def __init__(self, window: float, workers: int = 4) -> None:
        self.window = window
        self.workers = workers
        self._cond = threading.Condition()
        self._due: dict[Hashable, float] = {}
        self._runs: dict[Hashable, Callable[[], None]] = {}
        self._running: set[Hashable] = set()
        self._again: dict[Hashable, bool] = {}  # requested while running → urgent?
        self._last: dict[Hashable, float] = {}
        self._threads: list[threading.Thread] = []

    def request(self, key: Hashable, run: Callable[[], None], *, urgent: bool = False) -> None:
        """Run `run` for `key` soon: now when urgent, else `window` after its previous run."""
        with self._cond:
            self._runs[key] = run
            if key in self._running:
                self._again[key] = self._again.get(key, False) or urgent
                return
            self._schedule(key, urgent)
            if len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"debouncer-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def again(self, key: Hashable) -> None:
        """From within a run of `key`: run its latest request once more, a window after this run
        ends (a newer request, urgent or not, is kept as it is)."""
        with self._cond:
            if key in self._running:
                self._again[key] = self._again.get(key, False)

    def pending(self) -> int:
        with self._cond:
            return len(self._due) + len(self._running)

    def _schedule(self, key: Hashable, urgent: bool) -> None:
        now = time.monotonic()
        when = now if urgent else max(now, self._last.get(key, float("-inf")) + self.window)
        self._due[key] = min(when, self._due.get(key, when))
        self._cond.notify()

    def _next(self) -> tuple[Hashable, Callable[[], None]] | None:
        with self._cond:
            while not STOPPING.is_set():
                now = time.monotonic()
                ready = [k for k, t in self._due.items() if t <= now]
                if ready:
                    key = min(ready, key=self._due.__getitem__)
                    del self._due[key]
                    self._running.add(key)
                    return key, self._runs[key]
                soonest = min(self._due.values(), default=now + _IDLE_WAIT_SECONDS)
                self._cond.wait(min(max(soonest - now, 0.0), _IDLE_WAIT_SECONDS))
            return None

    def _work(self) -> None:
        while (item := self._next()) is not None:
            key, run = item
            try:
                run()
            except OperatorStopping:
                return
            except Exception:
                log.exception("run for %s failed", key)
            finally:
                with self._cond:
                    self._running.discard(key)
                    self._last[key] = time.monotonic()
                    if key in self._again:
                        self._schedule(key, self._again.pop(key))
