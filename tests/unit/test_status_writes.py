"""Status writes conditioned on the resourceVersion read: a raced write is redone on the newer
object and keeps the other writer's conditions; an object re-created under the same name is
left alone."""

from __future__ import annotations

from typing import Any

import pytest

from fireflyer.operator import status_writes


class FakeApi:
    def __init__(self, live: dict[str, Any]) -> None:
        self.live = live
        self.patches: list[dict[str, Any]] = []
        self.race_once = False

        self.stale: dict[str, Any] | None = None  # what an informer behind the API server holds
        self.reads: list[bool] = []

    def get(
        self, kind: str, name: str, namespace: str | None = None, *, fresh: bool = False
    ) -> dict[str, Any] | None:
        self.reads.append(fresh)
        return self.stale if self.stale is not None and not fresh else self.live

    def call(self, method: str, path: str, body: Any = None, **_: Any) -> None:
        self.patches.append(body)
        if self.race_once:  # another writer got in first: its condition is now live
            self.race_once = False
            self.live = {
                "metadata": {"uid": "u1", "resourceVersion": "8"},
                "status": {"conditions": [*self.live["status"]["conditions"], _cond("EplbHealthy")]},
            }
            raise status_writes.kube.ApiException(status=409)


def _cond(kind: str, status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": "R", "message": "", "lastTransitionTime": "t"}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi(
        {"metadata": {"uid": "u1", "resourceVersion": "7"}, "status": {"conditions": [_cond("Ready")]}}
    )
    monkeypatch.setattr(status_writes.kube, "get", fake.get)
    monkeypatch.setattr(status_writes.kube, "_call", fake.call)
    return fake


def test_a_raced_write_is_redone_and_keeps_the_other_writers_conditions(api: FakeApi) -> None:
    api.race_once = True
    status_writes.patch_status(
        "ThreeFSCluster", "fs", "ns", {"phase": "Ready"}, [_cond("Ready", "False")], 3, "u1"
    )
    first, second = api.patches
    assert first["metadata"]["resourceVersion"] == "7" and second["metadata"]["resourceVersion"] == "8"
    assert second["status"]["phase"] == "Ready"
    types = {c["type"]: c["status"] for c in second["status"]["conditions"]}
    assert types == {"Ready": "False", "EplbHealthy": "True"}


def test_a_write_refused_on_a_stale_cached_copy_is_redone_on_the_api_servers(api: FakeApi) -> None:
    """The informer still holds resourceVersion 6: the retry must not read that copy again (it
    would be refused every time), but the API server's."""
    api.stale = {"metadata": {"uid": "u1", "resourceVersion": "6"}, "status": {"conditions": []}}

    def call(method: str, path: str, body: Any = None, **_: Any) -> None:
        api.patches.append(body)
        if body["metadata"]["resourceVersion"] != api.live["metadata"]["resourceVersion"]:
            raise status_writes.kube.ApiException(status=409)

    status_writes.kube._call = call  # type: ignore[assignment]  # undone by the fixture's monkeypatch
    status_writes.patch_status("TrainingJob", "job", "ns", {"phase": "Running"}, [], 2, "u1")
    assert [b["metadata"]["resourceVersion"] for b in api.patches] == ["6", "7"]
    assert api.reads == [False, True]


def test_a_status_planned_for_an_earlier_object_of_the_name_is_not_written(api: FakeApi) -> None:
    status_writes.patch_status("ThreeFSCluster", "fs", "ns", {"phase": "Ready"}, [], 1, "an-older-uid")
    assert api.patches == []


def test_the_training_reconcile_writes_only_its_own_fields_and_keeps_the_polled_progress(
    api: FakeApi,
) -> None:
    """The reconcile of a TrainingJob read its object before the progress poll wrote a newer step
    and loss: its write carries neither, so the poll's values stay, and other conditions stay."""
    from fireflyer.operator.training import controller
    from fireflyer.operator.training.plan import Desired

    cr = {
        "metadata": {"name": "job", "namespace": "ns", "uid": "u1", "generation": 4},
        "status": {"phase": "Pending", "step": 10, "conditions": [_cond("Ready", "False")]},
    }
    api.live = {
        "metadata": {"uid": "u1", "resourceVersion": "9"},
        "status": {"phase": "Pending", "step": 12, "loss": 2.5, "conditions": [_cond("Ready", "False")]},
    }
    desired = Desired(children=[], status={"phase": "Running", "conditions": [_cond("Ready", "True")]})
    controller.apply(cr, desired)
    (patch,) = api.patches
    assert patch["metadata"]["resourceVersion"] == "9"
    assert patch["status"]["phase"] == "Running" and patch["status"]["observedGeneration"] == 4
    assert "step" not in patch["status"] and "loss" not in patch["status"]
    assert {c["type"]: c["status"] for c in patch["status"]["conditions"]} == {"Ready": "True"}
