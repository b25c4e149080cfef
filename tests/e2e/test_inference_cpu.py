"""The CPU sample on the local nodes, as a user sees it: the operator's rendered commands start
real engines and a real router; a completion comes back through status.endpoints.router; a
deleted pod brings its whole unit back; deleting the deployment leaves no process behind."""

from __future__ import annotations

import json
import subprocess
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
SAMPLE = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference-cpu.yaml").read_text())
NAME = SAMPLE["metadata"]["name"]
PROMPT = {"model": "fireflyer-tiny", "prompt": "The local cluster", "max_tokens": 12, "temperature": 0}


def _complete(base: str) -> str:
    request = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps(PROMPT).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["choices"][0]["text"])


def _unit_pods(kube: Kube) -> list[dict[str, Any]]:
    items = kube.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/component=unit")[
        "items"
    ]
    return items  # type: ignore[no-any-return]


def _netns_pids(uid: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    spaces = [n for n in names if n.endswith(uid[:12])]
    pids: list[str] = []
    for space in spaces:
        pids += subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split()
    return pids


@pytest.fixture
def ns(local_cluster: Kube, local_operator: Operator, tiny_model: str) -> Iterator[Kube]:
    yield from fresh_namespace(local_cluster, "infd-cpu", "--timeout=120s")


def test_cpu_sample_serves_through_the_router_recovers_a_unit_and_cleans_up(ns: Kube) -> None:
    started = time.monotonic()
    ns.apply(SAMPLE)
    url = wait_for(
        "the router's URL", lambda: demo.router_url(ns.kubeconfig, NAME, ns.namespace), timeout=180
    )
    assert url.startswith("http://127.")
    through_router = _complete(url)
    assert through_router.strip(), "the engine generated text"
    pods = _unit_pods(ns)
    assert {p["metadata"]["labels"]["fireflyer.dev/role"] for p in pods} == {"prefill", "decode"}
    # Greedy decoding: every unit, asked directly, gives what the router returned.
    for pod in pods:
        assert _complete(f"http://{pod['status']['podIP']}:30000") == through_router
    first_ready = time.monotonic() - started

    decode = next(p for p in pods if p["metadata"]["labels"]["fireflyer.dev/role"] == "decode")
    old_uid, old_pids = decode["metadata"]["uid"], _netns_pids(decode["metadata"]["uid"])
    assert old_pids
    ns.run("delete", "pod", decode["metadata"]["name"], "--wait=false")
    # The router keeps answering from the other unit while this one comes back.
    assert _complete(url) == through_router

    def recreated() -> bool:
        now = [p for p in _unit_pods(ns) if p["metadata"]["labels"]["fireflyer.dev/role"] == "decode"]
        ready = (
            now
            and now[0]["metadata"]["uid"] != old_uid
            and any(
                c["type"] == "Ready" and c["status"] == "True" for c in now[0]["status"].get("conditions", [])
            )
        )
        return bool(ready) and demo.router_url(ns.kubeconfig, NAME, ns.namespace) is not None

    wait_for("the decode unit back and Ready", recreated, timeout=120)
    new_decode = next(p for p in _unit_pods(ns) if p["metadata"]["labels"]["fireflyer.dev/role"] == "decode")
    assert _complete(f"http://{new_decode['status']['podIP']}:30000") == through_router
    assert _complete(url) == through_router
    for pid in old_pids:
        assert not Path(f"/proc/{pid}").exists(), "the deleted pod's processes are gone"

    everything = [p["metadata"]["uid"] for p in ns.get("pods")["items"]]
    pids = [pid for uid in everything for pid in _netns_pids(uid)]
    assert pids
    ns.run("delete", "infd", NAME, "--timeout=60s")
    wait_for("every pod of the deployment gone", lambda: not ns.get("pods")["items"], timeout=90)
    for uid in everything:
        assert not _netns_pids(uid)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived the deployment"
    print(f"first completion {first_ready:.1f}s after apply")
