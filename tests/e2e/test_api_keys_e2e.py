"""The CPU sample with API keys, on the local nodes: pods rendered with their security contexts
(read-only root, /tmp as an emptyDir, $HOME there) run; the router asks clients for a key; the
router's key reaches the decode unit and the decode unit's the prefill unit (the KV hand-off
goes through); a unit asked directly wants a key too; an edited Secret takes effect without a
restart."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import urllib.error
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
# Long enough for whole KV blocks (64 tokens) to be handed from the prefill unit to the decode unit.
PROMPT = "The local cluster runs every pod as a process on this machine. " * 12


def _post(base: str, key: str | None) -> tuple[int, dict[str, Any]]:
    body = {"model": "fireflyer-tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(
        f"{base}/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _refused(base: str, key: str) -> bool:
    return _post(base, key)[0] == 401


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:  # open: no key
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _secret(keys: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "llm-keys"},
        "stringData": {"api-keys": keys},
    }


@contextlib.contextmanager
def _pod_logs_on_failure(ns: Kube) -> Iterator[None]:
    try:
        yield
    except AssertionError as error:
        lines = [str(error), ns.run("get", "pods", "-o", "wide", check=False).stdout]
        for pod in ns.get("pods")["items"]:
            name = pod["metadata"]["name"]
            lines += [f"--- {name}: {json.dumps(pod['status'].get('containerStatuses'))}"]
            lines += [ns.run("logs", name, "--tail=30", check=False).stdout]
        raise AssertionError("\n".join(lines)) from None


@pytest.fixture
def ns(local_cluster: Kube, local_operator: Operator, tiny_model: str) -> Iterator[Kube]:
    yield from fresh_namespace(local_cluster, "infd-keys", "--timeout=120s")


def test_api_keys_guard_the_router_and_the_units_and_rotate_without_a_restart(ns: Kube) -> None:
    ns.apply(_secret("sk-client\n"))
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["router"]["apiKeySecret"] = "llm-keys"
    ns.apply(doc)
    with _pod_logs_on_failure(ns):
        url = wait_for(
            "the router's URL", lambda: demo.router_url(ns.kubeconfig, NAME, ns.namespace), timeout=240
        )

    status, answer = _post(url, None)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key", answer
    assert _post(url, "sk-wrong")[0] == 401
    status, answer = _post(url, "sk-client")
    assert status == 200 and answer["choices"][0]["text"], answer

    pods = ns.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/component=unit")["items"]
    units = {
        p["metadata"]["labels"]["fireflyer.dev/role"]: f"http://{p['status']['podIP']}:30000" for p in pods
    }
    # The decode unit got the prompt's KV from the prefill unit: its request carried the key.
    assert _metric(units["decode"], "fireflyer_serve_kv_handoff_blocks_total") > 0
    assert _metric(units["decode"], "fireflyer_serve_kv_handoff_fallbacks_total") == 0
    for unit in units.values():
        assert _post(unit, None)[0] == 401
        assert _post(unit, "sk-client")[0] == 200
    restarts = {
        p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
        for p in ns.get("pods")["items"]
    }

    ns.apply(_secret("sk-rotated\n"))
    wait_for("the old key refused by the router", lambda: _post(url, "sk-client")[0] == 401, timeout=60)
    wait_for("the new key accepted end to end", lambda: _post(url, "sk-rotated")[0] == 200, timeout=60)
    for unit in units.values():
        wait_for("the unit to refuse the old key", functools.partial(_refused, unit, "sk-client"), timeout=60)
    after = {
        p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
        for p in ns.get("pods")["items"]
    }
    assert after == restarts, "no pod was restarted or replaced for the new keys"
