"""Coalescing bursts of child events into few reconciles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class Debouncer:
    """At most one run per `window` seconds per key, and always one run after the last request
    (trailing edge), so a dropped request never leaves a change unreconciled."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._last: dict[Hashable, float] = {}
        self._pending: set[Hashable] = set()
        self._lock = threading.Lock()

    def request(self, key: Hashable, run: Callable[[], None], *, urgent: bool = False) -> None:
        def body() -> None:
            with self._lock:
                self._pending.discard(key)
            self._last[key] = time.monotonic()
            run()

        wait = self.window - (time.monotonic() - self._last.get(key, 0.0))
        if urgent or wait <= 0:
            body()
            return
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        timer = threading.Timer(wait, body)
        timer.daemon = True
        timer.start()
