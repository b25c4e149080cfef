"""The child-event work queue (fireflyer.operator.debounce) and the stoppable placement lock."""

from __future__ import annotations

import threading
import time

import pytest

from fireflyer.operator import locks
from fireflyer.operator.debounce import Debouncer


def _wait(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_a_request_never_runs_on_the_callers_thread_and_never_blocks_it() -> None:
    debouncer = Debouncer(window=0.05)
    release = threading.Event()
    ran_on: list[str] = []

    def slow() -> None:
        ran_on.append(threading.current_thread().name)
        release.wait(5)

    started = time.monotonic()
    debouncer.request("a", slow, urgent=True)
    debouncer.request("b", slow, urgent=True)
    assert time.monotonic() - started < 0.5
    _wait(lambda: len(ran_on) == 2)
    release.set()
    assert threading.current_thread().name not in ran_on


def test_a_burst_coalesces_and_the_last_request_always_runs() -> None:
    debouncer = Debouncer(window=0.2)
    runs: list[int] = []
    gate = threading.Event()

    def run(n: int) -> None:
        runs.append(n)
        gate.wait(5)

    debouncer.request("k", lambda: run(0), urgent=True)
    _wait(lambda: runs == [0])
    for n in range(1, 50):  # while the first run is still going
        debouncer.request("k", lambda n=n: run(n))  # type: ignore[misc]
    gate.set()
    _wait(lambda: len(runs) >= 2)
    time.sleep(0.5)
    assert runs == [0, 49], "one trailing run, with the newest request's work"


def test_one_key_never_runs_twice_at_once() -> None:
    debouncer = Debouncer(window=0.0, workers=4)
    active, most = [0], [0]
    lock = threading.Lock()
    done = threading.Event()
    count = [0]

    def run() -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
            count[0] += 1
            if count[0] >= 5:
                done.set()

    for _ in range(40):
        debouncer.request("k", run, urgent=True)
        time.sleep(0.002)
    assert done.wait(5)
    assert most[0] == 1


def test_waiters_on_the_placement_lock_give_up_once_the_operator_stops() -> None:
    lock = locks.StoppableLock()
    outcome: list[str] = []

    def waiter() -> None:
        try:
            with lock:
                outcome.append("ran")
        except locks.OperatorStopping:
            outcome.append("gave up")

    lock.acquire()
    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    locks.STOPPING.set()
    try:
        thread.join(2)
        assert outcome == ["gave up"]
        with pytest.raises(locks.OperatorStopping):
            lock.acquire()  # re-entrant for its holder, but not once stopping
    finally:
        locks.STOPPING.clear()
        lock.release()
