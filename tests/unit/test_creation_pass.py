"""A new InferenceDeployment's first pass: planned from its creation event, run on a queue of its
own a few at a time (never on kopf's handler threads), with its scalers' writes beside the
children's and its Events beside its status."""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf
import pytest

from fireflyer.operator import events, kube, status_writes
from fireflyer.operator.debounce import Debouncer
from fireflyer.operator.inference import controller, first_pass, lending_writes, scaling
from fireflyer.operator.inference.plan import Observed, plan
from tests.unit.test_inference_plan import NOW, _cr, _nodes

# -- first_pass.from_event --------------------------------------------------------------------


def test_only_the_first_try_of_a_creation_plans_from_the_event() -> None:
    body = {"metadata": {"name": "a", "uid": "u1"}, "spec": {"x": 1}}
    copied = first_pass.from_event(kopf.Reason.CREATE, 0, body)
    assert copied == body and copied is not body
    copied["spec"]["x"] = 2  # the pass may change its copy: the event stays as it came
    assert body["spec"]["x"] == 1
    assert first_pass.from_event("create", 0, body) == body
    assert first_pass.from_event(kopf.Reason.UPDATE, 0, body) is None
    assert first_pass.from_event(kopf.Reason.RESUME, 0, body) is None
    assert first_pass.from_event(kopf.Reason.CREATE, 1, body) is None  # a retry reads it fresh
    assert first_pass.from_event(kopf.Reason.CREATE, 0, {**body, "status": {"phase": "Pending"}}) is None
    assert first_pass.from_event(kopf.Reason.CREATE, 0, None) is None


# -- the creation queue --------------------------------------------------------------------------


def test_new_deployments_are_reconciled_off_the_handler_thread_a_few_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = 0
    most = 0
    threads: set[str] = set()
    passes: list[tuple[str, dict[str, Any] | None]] = []
    guard = threading.Lock()

    def reconcile(namespace: str, name: str, *args: Any, created: Any = None, **kwargs: Any) -> None:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        time.sleep(0.05)
        with guard:
            running -= 1
            passes.append((name, created))

    queue = Debouncer(window=0.0, workers=2)
    monkeypatch.setattr(controller, "_creations", queue)
    monkeypatch.setattr(controller, "reconcile", reconcile)
    monkeypatch.setattr(kube, "held", lambda *a, **k: None)  # no informer copy: the event is planned
    monkeypatch.setattr(controller, "arm_resync", lambda *a: None)
    monkeypatch.setattr(scaling, "arm_autoscaler", lambda *a: None)
    handler_thread = threading.current_thread().name
    started = time.monotonic()
    for i in range(8):
        body = {"metadata": {"name": f"d{i}", "namespace": "ns"}, "spec": {}}
        controller.on_change("ns", f"d{i}", reason=kopf.Reason.CREATE, retry=0, body=body)
    assert time.monotonic() - started < 0.2, "the handler returns without waiting for the passes"
    deadline = time.monotonic() + 10
    while len(passes) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(name for name, _ in passes) == [f"d{i}" for i in range(8)]
    assert all(created is not None and created["metadata"]["name"] == name for name, created in passes)
    assert most == 2
    assert handler_thread not in threads

    # Any later change is reconciled at once, on the handler's thread, from a fresh read.
    passes.clear()
    controller.on_change("ns", "d0", reason=kopf.Reason.UPDATE, retry=0, body={"metadata": {}})
    assert passes == [("d0", None)]


# -- apply: fewer rounds -------------------------------------------------------------------------


def _desired() -> tuple[dict[str, Any], Any]:
    cr = _cr()
    return cr, plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW, scalers=[]))


def test_the_scalers_are_written_beside_the_children(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler_started = threading.Event()

    def apply(obj: dict[str, Any]) -> dict[str, Any]:
        # Sequential rounds would never see the scaler's write start while the children's run.
        assert scaler_started.wait(5), "the scalers' writes waited for the children's"
        return obj

    monkeypatch.setattr(kube, "apply", apply)
    monkeypatch.setattr(scaling, "scaler_writes", lambda cr, scales: [scaler_started.set])
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(lending_writes, "request", lambda *a: None)
    monkeypatch.setattr(events, "post", lambda *a: None)
    monkeypatch.setattr(status_writes, "patch_status", lambda *a, **k: None)
    cr, desired = _desired()
    controller.apply(cr, desired)
    assert scaler_started.is_set()


def test_a_failed_child_write_fails_the_pass_after_the_scalers(monkeypatch: pytest.MonkeyPatch) -> None:
    finished = threading.Event()

    def slow_scaler() -> None:
        time.sleep(0.2)
        finished.set()

    def apply(obj: dict[str, Any]) -> dict[str, Any]:
        raise kube.ApiException(status=500, reason="boom")

    monkeypatch.setattr(kube, "apply", apply)
    monkeypatch.setattr(scaling, "scaler_writes", lambda cr, scales: [slow_scaler])
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    statuses: list[Any] = []
    monkeypatch.setattr(status_writes, "patch_status", lambda *a, **k: statuses.append(a))
    cr, desired = _desired()
    with pytest.raises(kube.ApiException):
        controller.apply(cr, desired)
    assert finished.is_set(), "no scaler write is left running behind the failed pass"
    assert statuses == [], "a pass whose children failed writes no status"


def test_the_events_go_out_beside_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    status_started = threading.Event()
    posted: list[str] = []

    def post(cr: Any, type_: str, reason: str, message: str) -> None:
        assert status_started.wait(5), "the status waited for the events"
        posted.append(reason)

    monkeypatch.setattr(kube, "apply", lambda obj: obj)
    monkeypatch.setattr(scaling, "scaler_writes", lambda cr, scales: [])
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(lending_writes, "request", lambda *a: None)
    monkeypatch.setattr(events, "post", post)
    monkeypatch.setattr(status_writes, "patch_status", lambda *a, **k: status_started.set())
    cr, desired = _desired()
    assert desired.events, "a new deployment's pass announces its placement"
    controller.apply(cr, desired)
    assert posted == [e.reason for e in desired.events]


def test_the_queued_first_pass_plans_from_the_newest_copy_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    created = {"metadata": {"name": "a", "namespace": "ns", "uid": "u1", "resourceVersion": "5"}}
    held: dict[str, Any] | None = None
    monkeypatch.setattr(kube, "held", lambda *a, **k: held)
    assert first_pass.newest_known(created) is created  # the informer has not seen it yet
    held = {"metadata": {**created["metadata"], "resourceVersion": "6", "annotations": {"kopf": "x"}}}
    assert first_pass.newest_known(created) is held  # kopf's annotations are on it already
    held = {"metadata": {**created["metadata"], "uid": "u0"}}
    assert first_pass.newest_known(created) is created  # an older object of the same name
    held = {"metadata": created["metadata"], "status": {"prefill": {"autoscaler": {}}}}
    assert first_pass.newest_known(created) is held  # another writer's fields only
    held = {"metadata": created["metadata"], "status": {"phase": "Pending", "observedGeneration": 1}}
    assert first_pass.newest_known(created) is None  # a pass of ours wrote its status: read it fresh


def test_a_first_pass_writes_its_status_against_the_informers_newer_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planned = {
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": "5"}
    }
    held: dict[str, Any] | None = None
    monkeypatch.setattr(kube, "held", lambda *a, **k: held)
    assert first_pass.status_read(planned) is planned  # nothing newer known
    annotated = {"metadata": {**planned["metadata"], "resourceVersion": "6", "annotations": {"kopf": "x"}}}
    held = annotated
    assert first_pass.status_read(planned) is annotated  # only kopf's annotations moved
    held = {**annotated, "status": {"eplb": {}}}
    assert first_pass.status_read(planned) is planned  # another writer's status: not ours to drop
    held = {"metadata": {**annotated["metadata"], "generation": 2}}
    assert first_pass.status_read(planned) is planned  # the spec changed: the write must fail


def test_a_resync_leaves_a_queued_first_pass_to_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    armed: dict[Any, Any] = {}
    passes: list[str] = []
    monkeypatch.setattr(controller._resync, "arm", lambda key, run: armed.__setitem__(key, run))
    monkeypatch.setattr(controller, "reconcile", lambda namespace, name, *a, **k: passes.append(name) or {})
    controller.arm_resync("ns", "new", {})
    monkeypatch.setattr(controller, "_first_pass_queued", {("ns", "new")})
    assert armed[("ns", "new")]() is True and passes == [], "the timer keeps running, the queue creates it"
    monkeypatch.setattr(controller, "_first_pass_queued", set())
    assert armed[("ns", "new")]() is True and passes == ["new"]
