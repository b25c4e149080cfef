"""Writing a reconcile's requests at once (fireflyer.operator.parallel_writes), reads of
our own children that an informer answers without a request, and the per-phase timing of a
reconcile (fireflyer.operator.metrics)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fireflyer.operator import cache, kube, metrics, parallel_writes, status_writes
from fireflyer.operator import labels as L


@pytest.fixture
def informers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    made = {
        "Deployment": cache.Informer("Deployment", cache.MANAGED),
        "TrainingJob": cache.Informer("TrainingJob"),
        "ConfigMap": cache.Informer("ConfigMap", f"{L.MANAGED_BY}={L.MANAGER},extra=1"),
    }
    for informer in made.values():
        informer.synced.set()
    cache._informers.update(made)
    kube.set_cache(kube.CacheHooks(cache.serve, cache.current, cache.written, cache.holds_all_ours))
    asked: list[str] = []

    def call(method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        asked.append(f"{method} {path}")
        return {"kind": "Deployment", "metadata": {"name": "from-the-server"}}

    monkeypatch.setattr(kube, "_call", call)
    try:
        yield asked
    finally:
        kube.set_cache(None)
        cache._informers.clear()


def test_a_child_of_ours_not_created_yet_costs_no_request(informers: list[str]) -> None:
    assert kube.get("Deployment", "svc-router", "ns", ours=True) is None
    assert informers == []
    cache.written(
        {
            "kind": "Deployment",
            "metadata": {"name": "svc-router", "namespace": "ns", "labels": {L.MANAGED_BY: L.MANAGER}},
        }
    )
    held = kube.get("Deployment", "svc-router", "ns", ours=True)
    assert held is not None and held["metadata"]["name"] == "svc-router"
    assert informers == []


def test_objects_an_informer_may_not_hold_are_asked_for(informers: list[str]) -> None:
    kube.get("Deployment", "someone-elses", "ns")  # not known to be ours
    kube.get("ConfigMap", "c", "ns", ours=True)  # the informer's filter is narrower than ours
    kube.get("Pod", "p", "ns", ours=True)  # pods are held slim
    assert len(informers) == 3
    assert cache.holds_all_ours("TrainingJob")  # unfiltered: holds everything


def test_a_slow_reconcile_logs_where_its_time_went(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics, "SLOW_RECONCILE_SECONDS", 0.0)
    lock = threading.Lock()

    @metrics.timed("Test")
    def reconcile(namespace: str, name: str) -> None:
        with metrics.holding("Test", "lock_wait", lock), metrics.phase("Test", "writes"):
            threading.Event().wait(0.02)

    with caplog.at_level(logging.INFO, logger="fireflyer.operator.metrics"):
        reconcile("ns", "svc")
    [line] = [r.getMessage() for r in caplog.records if "slow Test reconcile" in r.getMessage()]
    assert line.startswith("slow Test reconcile of ns/svc (ok): ")
    assert line.split(" s: ", 1)[1].startswith("writes 0.0")  # the slowest phase first
    assert not lock.locked()


def test_phase_summary_puts_the_slowest_phase_first() -> None:
    summary = metrics.phase_summary({"plan": 0.01, "placement_lock_wait": 2.0}, 2.5)
    assert summary == "2.50 s: placement_lock_wait 2.00, other 0.49, plan 0.01"


def test_a_status_write_tries_the_callers_read_first_and_rereads_when_it_is_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    current = {"metadata": {"uid": "u1", "resourceVersion": "9"}, "status": {}}
    reads: list[str] = []
    patches: list[str] = []

    def get(kind: str, name: str, namespace: str | None = None, *, fresh: bool = False) -> dict[str, Any]:
        reads.append(name)
        return current

    def call(method: str, path: str, body: Any = None, **_: Any) -> None:
        patches.append(body["metadata"]["resourceVersion"])
        if body["metadata"]["resourceVersion"] != "9":
            raise kube.ApiException(status=409)

    monkeypatch.setattr(status_writes.kube, "get", get)
    monkeypatch.setattr(status_writes.kube, "_call", call)
    stale = {"metadata": {"uid": "u1", "resourceVersion": "7"}, "status": {}}
    status_writes.patch_status("InferenceDeployment", "svc", "ns", {"phase": "Ready"}, [], 1, read=current)
    assert reads == [] and patches == ["9"]  # no GET when the caller's read is current
    status_writes.patch_status("InferenceDeployment", "svc", "ns", {"phase": "Ready"}, [], 1, read=stale)
    assert reads == ["svc"] and patches == ["9", "7", "9"]


def test_a_run_that_finds_its_object_busy_runs_again_after_the_window() -> None:
    from fireflyer.operator.debounce import Debouncer

    debouncer = Debouncer(window=0.05, workers=1)
    runs: list[float] = []
    done = threading.Event()

    def run() -> None:
        runs.append(1.0)
        if len(runs) == 1:
            debouncer.again("svc")  # as a reconcile whose deployment has a pass running
        else:
            done.set()

    debouncer.request("svc", run, urgent=True)
    assert done.wait(5) and len(runs) == 2
    debouncer.again("other")  # not running: nothing scheduled
    assert "other" not in debouncer._again


def test_calls_run_together_and_the_first_failure_is_raised_after_all_finished() -> None:
    together = threading.Barrier(3, timeout=5)  # broken if the calls ran one after another
    finished: list[int] = []
    lock = threading.Lock()

    def call(item: int) -> int:
        together.wait()
        with lock:
            finished.append(item)
        if item == 1:
            raise ValueError("item 1")
        return item * 10

    with pytest.raises(ValueError, match="item 1"):
        parallel_writes.each([0, 1, 2], call)
    assert sorted(finished) == [0, 1, 2]  # nothing left running behind the caller
    together.reset()
    assert parallel_writes.each([2, 0, 1], lambda item: item * 10) == [20, 0, 10]
    assert parallel_writes.each([], call) == []
