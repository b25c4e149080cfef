"""The EPLB controller on the real control plane: load served by the test on loopback."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fireflyer.eplb.synthetic import zipf_load
from tests.conftest import Operator
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
SMALL = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/samples/small/inference.yaml").read_text()
)
NAME = SMALL["metadata"]["name"]


class LoadServer:
    """Serves the load contract: GET /v1/eplb/load → {"layers", "experts", "windowSeconds", "tokens"}."""

    def __init__(self) -> None:
        self.payload: Any = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(server.payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/eplb/load"


@pytest.fixture
def load_server() -> Iterator[LoadServer]:
    server = LoadServer()
    yield server
    server.httpd.shutdown()


def _placements(kube: Kube, role: str) -> list[dict[str, Any]]:
    items = kube.get(
        "expertplacements", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role={role}"
    )
    return sorted(items["items"], key=lambda p: p["spec"]["generation"])


def test_skewed_load_publishes_a_better_generation_and_bad_load_publishes_none(
    operator: Operator, kube: Kube, load_server: LoadServer
) -> None:
    tokens = zipf_load(58, 256, 1.0, np.random.default_rng(7))
    load_server.payload = {"layers": 58, "experts": 256, "windowSeconds": 10, "tokens": tokens.tolist()}
    doc = copy.deepcopy(SMALL)
    doc["metadata"]["annotations"] = {"eplb.fireflyer.dev/load-url": load_server.url}
    doc["spec"]["eplb"].update(intervalSeconds=10, windowSeconds=10, minGain=0.02)
    kube.apply(doc)

    first = wait_for("a decode ExpertPlacement", lambda: _placements(kube, "decode"), timeout=60)[-1]
    assert first["spec"]["generation"] == 1
    assert first["spec"]["gpus"] == 32 and first["spec"]["slotsPerGpu"] == 9
    assert len(first["spec"]["phy2log"]) == 58
    owner = first["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "InferenceDeployment" and owner["name"] == NAME
    status = wait_for(
        "placement status", lambda: kube.get("expertplacement", first["metadata"]["name"]).get("status")
    )
    assert status["balancedness"] > status["previousBalancedness"] + 0.02
    infd = wait_for(
        "the deployment's EPLB status",
        lambda: (o := kube.get("inferencedeployment", NAME))["status"].get("balancedness") and o,
    )
    assert infd["status"]["decode"]["placementGeneration"] == 1
    assert condition(infd, "EplbHealthy")["status"] == "True"
    assert any(e["reason"] == "RebalanceApplied" for e in kube.get("events")["items"])

    # A malformed window: an Event and a condition, never a new generation.
    load_server.payload = {"layers": 58, "experts": 256, "tokens": [[1, 2, 3]]}

    def unhealthy() -> dict[str, Any] | None:
        cond = condition(kube.get("inferencedeployment", NAME), "EplbHealthy")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for("EplbHealthy=False", unhealthy, timeout=60)
    assert cond["reason"] == "LoadUnavailable" and "shape" in cond["message"]
    assert any(e["reason"] == "LoadUnavailable" for e in kube.get("events")["items"])
    assert [p["spec"]["generation"] for p in _placements(kube, "decode")] == [1]
