"""Scaling a role through its InferenceRoleScaler on the real control plane: `kubectl scale`
moves whole units, a change of the deployment's units wins over the live value, and scale-in
drains the surplus unit through the router before removing it."""

from __future__ import annotations

import copy
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.operator.inference import children
from fireflyer.operator.inference.drain_reader import HEALTH_URL_ANNOTATION
from tests.conftest import Operator
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
NAME = SMALL["metadata"]["name"]
PREFILL_SCALER = f"{NAME}-prefill"


def _prefill_units(kube: Kube) -> list[str]:
    sets = kube.get("statefulsets", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill")
    return sorted(s["metadata"]["name"] for s in sets["items"])


def _prefill_pods(kube: Kube) -> list[str]:
    pods = kube.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill")
    return sorted(p["metadata"]["name"] for p in pods["items"] if not p["metadata"].get("deletionTimestamp"))


def _scaler(kube: Kube) -> dict[str, Any]:
    return kube.get("inferencerolescaler", PREFILL_SCALER)  # type: ignore[no-any-return]


def _reasons(kube: Kube) -> set[str]:
    return {e.get("reason") for e in kube.get("events")["items"]}


def test_kubectl_scale_moves_whole_units_and_the_spec_wins_back(operator: Operator, kube: Kube) -> None:
    kube.apply(SMALL)
    wait_for(
        "the prefill scaler with its status",
        lambda: (
            kube.exists("inferencerolescaler", PREFILL_SCALER)
            and _scaler(kube).get("status", {}).get("replicas") == 1
        ),
        timeout=30,
    )
    owner = _scaler(kube)["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("InferenceDeployment", NAME)
    # The scale subresource an HPA reads: replicas and the role's pod selector.
    base = f"/apis/fireflyer.dev/v1alpha1/namespaces/{kube.namespace}"
    path = f"{base}/inferencerolescalers/{PREFILL_SCALER}/scale"
    scale = json.loads(kube.run("get", "--raw", path, namespaced=False).stdout)
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == (
        f"fireflyer.dev/component=unit,fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill"
    )

    kube.run("scale", f"inferencerolescaler/{PREFILL_SCALER}", "--replicas", "2")
    wait_for(
        "a second whole prefill unit",
        lambda: (
            _prefill_units(kube) == [f"{NAME}-prefill-0", f"{NAME}-prefill-1"]
            and len(_prefill_pods(kube)) == 2 * SMALL["spec"]["prefill"]["nodesPerUnit"]
        ),
        timeout=30,
    )
    wait_for(
        "status to show two prefill units",
        lambda: (
            kube.get("inferencedeployment", NAME)["status"].get("prefill", {}).get("units") == 2
            and _scaler(kube)["status"].get("replicas") == 2
        ),
        timeout=30,
    )
    assert kube.get("inferencedeployment", NAME)["spec"]["prefill"]["units"] == 1  # Git's intent untouched
    assert "UnitsScaled" in _reasons(kube)

    # A new value in the deployment wins: the scaler is reset and the role follows it.
    changed = copy.deepcopy(SMALL)
    changed["spec"]["prefill"]["units"] = 0
    # kwok's router pods answer nothing: no drain here (test_scale_in_drains_through_the_router).
    changed["spec"]["router"] = {**changed["spec"].get("router", {}), "drainTimeoutSeconds": 0}
    kube.apply(changed)
    wait_for(
        "the scaler reset to the spec's units and the prefill units gone",
        lambda: (
            _scaler(kube)["spec"]["replicas"] == 0 and _prefill_units(kube) == [] and not _prefill_pods(kube)
        ),
        timeout=40,
    )
    status = _scaler(kube)["status"]
    assert status["deploymentUnits"] == 0
    assert "ScalerReset" in _reasons(kube)
    assert kube.get("inferencedeployment", NAME)["status"]["prefillReady"] == "0/0"


class _RouterHealth(http.server.BaseHTTPRequestHandler):
    """The router's /health as the test scripts it (kwok's router pods serve nothing)."""

    answer: dict[str, Any] = {"status": "ok", "units": []}

    def do_GET(self) -> None:
        body = json.dumps(type(self).answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def router_health() -> Iterator[tuple[str, type[_RouterHealth]]]:
    handler = type("Scripted", (_RouterHealth,), {"answer": {"status": "ok", "units": []}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health", handler
    finally:
        server.shutdown()
        server.server_close()


def _drain_message(kube: Kube, index: int) -> str:
    units = kube.get("inferencedeployment", NAME).get("status", {}).get("units", [])
    return next(
        (u.get("drainMessage", "") for u in units if u["role"] == "prefill" and u["index"] == index), ""
    )


def test_scale_in_drains_through_the_router(
    operator: Operator, kube: Kube, router_health: tuple[str, type[_RouterHealth]]
) -> None:
    url, health = router_health
    doc = copy.deepcopy(SMALL)
    doc["metadata"].setdefault("annotations", {})[HEALTH_URL_ANNOTATION] = url
    kube.apply(doc)
    wait_for("the prefill scaler", lambda: kube.exists("inferencerolescaler", PREFILL_SCALER), timeout=30)
    kube.run("scale", f"inferencerolescaler/{PREFILL_SCALER}", "--replicas", "2")
    wait_for("two prefill units", lambda: len(_prefill_units(kube)) == 2, timeout=30)
    leaving = f"{NAME}-prefill-1"
    unit_url = children.backend_url(children.leader_host(NAME, "prefill", 1, kube.namespace))
    health.answer = {"status": "ok", "units": [{"url": unit_url, "in_flight": 2, "draining": True}]}

    kube.run("scale", f"inferencerolescaler/{PREFILL_SCALER}", "--replicas", "1")
    wait_for(
        "the unit draining, with the router's count in status",
        lambda: _drain_message(kube, 1) == "prefill unit 1 draining: 2 requests in flight",
        timeout=30,
    )
    sts = kube.get("statefulset", leaving)
    assert "fireflyer.dev/draining-since" in sts["metadata"]["annotations"]
    backends = json.loads(kube.get("configmap", f"{NAME}-router")["data"]["backends.json"])
    assert {"url": unit_url, "draining": True}.items() <= backends["prefill"][-1].items()
    time.sleep(5)  # past a few re-checks: requests are still in flight, the unit stays
    assert kube.exists("statefulset", leaving)
    assert _scaler(kube)["status"]["replicas"] == 1

    health.answer = {"status": "ok", "units": [{"url": unit_url, "in_flight": 0, "draining": True}]}
    wait_for("the drained unit removed", lambda: _prefill_units(kube) == [f"{NAME}-prefill-0"], timeout=30)
    assert {"UnitDraining", "UnitDrained"} <= _reasons(kube)
    backends = json.loads(kube.get("configmap", f"{NAME}-router")["data"]["backends.json"])
    assert [u["url"] for u in backends["prefill"]] == [
        children.backend_url(children.leader_host(NAME, "prefill", 0, kube.namespace))
    ]
