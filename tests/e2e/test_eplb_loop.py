"""The EPLB loop closed on the local nodes, as a user watches it: one decode unit of two real
ranks (EP2) serves skewed traffic, the operator reads the unit's expert load from its leader,
writes ExpertPlacement generation 1, the placement ConfigMap changes, the local runtime rewrites
the mounted file in place, both ranks switch to it, the operator records that the unit runs it,
and nothing restarted: the same pods answer the same text as before."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import demo
from tests.conftest import Operator
from tests.e2e.conftest import needs_root
from tests.kube import Kube, fresh_namespace, wait_for

pytestmark = [pytest.mark.integration, needs_root]
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference-cpu-ep.yaml").read_text())
NAME = SAMPLE["metadata"]["name"]
LEADER = f"{NAME}-decode-0-0"
CONFIG_MAP = f"{NAME}-decode-placement"
# One prompt, over and over: its tokens keep going to the same few experts, so the even split of
# the experts over the two ranks leaves one rank busier than the other.
PROMPT = {
    "model": "fireflyer-tiny",
    "prompt": "The the the the the the the",
    "max_tokens": 16,
    "temperature": 0,
}


def _post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(PROMPT).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, str(json.loads(response.read())["choices"][0]["text"])


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _pods(kube: Kube) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in kube.get("pods")["items"]}


def _restarts(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount", 0)) for c in pod["status"].get("containerStatuses") or [])


def _placements(kube: Kube) -> dict[int, dict[str, Any]]:
    return {int(p["spec"]["generation"]): p for p in kube.get("expertplacements")["items"]}


def _document(kube: Kube) -> dict[str, Any]:
    return json.loads(kube.get("configmap", CONFIG_MAP)["data"]["placement.json"])  # type: ignore[no-any-return]


def _decode_status(kube: Kube) -> dict[str, Any]:
    return (kube.get("infd", NAME).get("status") or {}).get("decode") or {}  # type: ignore[no-any-return]


@pytest.fixture
def ns(local_cluster: Kube, local_operator: Operator, tiny_model: str) -> Iterator[Kube]:
    yield from fresh_namespace(local_cluster, "eplb-loop", "--timeout=120s")


def test_skewed_load_moves_experts_in_place_without_restarting_the_unit(ns: Kube) -> None:
    started = time.monotonic()
    ns.apply(SAMPLE)
    router = wait_for(
        "the router's URL", lambda: demo.router_url(ns.kubeconfig, NAME, ns.namespace), timeout=180
    )
    ready_at = time.monotonic()
    before = _pods(ns)
    leader_ip = before[LEADER]["status"]["podIP"]
    load_url = f"http://{leader_ip}:30000/v1/eplb/load"
    assert all(_restarts(p) == 0 for p in before.values())
    # Nothing served yet: the even split, no placement, and the operator reads that from the
    # leader's pod address (no load-url annotation).
    assert _get_json(load_url)["generation"] is None
    assert _document(ns) == {}
    wait_for(
        "the operator to read the unit's generation (the even split)",
        lambda: _decode_status(ns).get("appliedPlacementGeneration") == 0,
        timeout=60,
    )
    assert _placements(ns) == {}, "no placement while the load window is empty"

    answers = {_post(router) for _ in range(6)}
    assert len(answers) == 1 and next(iter(answers))[0] == 200
    [(_, text)] = answers
    load = _get_json(load_url)
    assert sum(map(sum, load["tokens"])) > 0
    # Tokens per rank and MoE layer under the even split.
    split = load["gpuTokens"]
    traffic_at = time.monotonic()

    placement = wait_for("ExpertPlacement generation 1", lambda: _placements(ns).get(1), timeout=60)
    published_at = time.monotonic()
    document = wait_for(
        "the placement ConfigMap at generation 1",
        lambda: (d := _document(ns)).get("generation") == 1 and d,
        timeout=20,
    )
    configmap_at = time.monotonic()
    assert document["phy2log"] == placement["spec"]["phy2log"]
    assert placement["spec"]["gpus"] == 2 and placement["spec"]["slotsPerGpu"] == 9  # 16 + 2 redundant
    status = wait_for(
        "the placement's balancedness",
        lambda: (st := _placements(ns)[1].get("status") or {}).get("balancedness") and st,
        timeout=20,
    )
    assert status["balancedness"] > status["previousBalancedness"], status
    wait_for(
        "the unit to run generation 1",
        lambda: _get_json(load_url)["generation"] == 1,
        timeout=30,
        interval=0.5,
    )
    applied_at = time.monotonic()
    wait_for(
        "appliedUnits 1 on the ExpertPlacement",
        lambda: _placements(ns)[1].get("status", {}).get("appliedUnits") == 1,
        timeout=40,
    )
    wait_for(
        "the role's appliedPlacementGeneration 1",
        lambda: _decode_status(ns).get("appliedPlacementGeneration") == 1,
        timeout=40,
    )
    recorded_at = time.monotonic()

    # In place: the same pods, never restarted, answering as before (FP32: a replica computes
    # what the expert's only copy did).
    after = _pods(ns)
    assert {n: p["metadata"]["uid"] for n, p in after.items()} == {
        n: p["metadata"]["uid"] for n, p in before.items()
    }
    assert all(_restarts(p) == 0 for p in after.values())
    assert _post(router) == (200, text)
    assert _post(f"http://{leader_ip}:30000") == (200, text)
    print(
        f"ready {ready_at - started:.1f}s after apply; tokens per rank {split}; generation 1"
        f" {published_at - traffic_at:.1f}s after the traffic, in the ConfigMap"
        f" {configmap_at - published_at:.1f}s later, run by the unit {applied_at - configmap_at:.1f}s"
        f" later, recorded {recorded_at - applied_at:.1f}s later"
    )
