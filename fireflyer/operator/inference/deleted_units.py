"""The unit StatefulSets this operator deleted, until the watch no longer lists them: a lagging
informer must not make a pass plan (and so recreate) a unit an earlier pass removed."""

from __future__ import annotations

import threading
from typing import Any


class DeletedUnits:
    """The uids of unit StatefulSets this operator deleted, until no listing shows them."""

    def __init__(self) -> None:
        self._uids: set[str] = set()
        self._lock = threading.Lock()

    def note(self, uid: str) -> None:
        if uid:
            with self._lock:
                self._uids.add(uid)

    def uids(self) -> set[str]:
        with self._lock:
            return set(self._uids)

    def still_listed(self, listed: list[dict[str, Any]]) -> set[str]:
        """Those `listed` (every unit StatefulSet) still shows; the rest are forgotten: the watch
        has seen their deletion, and uids are never reused."""
        present = {s["metadata"].get("uid") for s in listed}
        with self._lock:
            self._uids &= present
            return set(self._uids)
