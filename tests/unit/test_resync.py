"""Periodic work per object without kopf timers (fireflyer.operator.resync)."""

from __future__ import annotations

import threading
import time

from fireflyer.operator.resync import Resync


def test_runs_repeat_until_the_object_is_gone_and_errors_are_retried() -> None:
    resync = Resync("test", 0.02)
    runs: list[str] = []
    done = threading.Event()

    def run() -> bool:
        runs.append("run")
        if len(runs) == 2:
            raise RuntimeError("the API server hiccuped")
        if len(runs) == 4:
            done.set()
            return False  # the object is gone
        return True

    resync.arm("a", run)
    assert done.wait(5)
    time.sleep(0.1)
    assert len(runs) == 4, "no run after the object is gone; the failed run was retried"
    assert not resync.armed("a")


def test_arming_an_armed_key_keeps_one_pending_run() -> None:
    resync = Resync("test", 0.05)
    runs: list[int] = []
    for _ in range(5):
        resync.arm("a", lambda: runs.append(1) is not None and False)
    assert resync.armed("a")
    time.sleep(0.3)
    assert runs == [1]
    resync.cancel_all()
