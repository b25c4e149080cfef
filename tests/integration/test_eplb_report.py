"""`fireflyer eplb report` against the real control plane: the placement ConfigMap, ExpertPlacement
and statuses written as the EPLB controller writes them, the load served by the test on loopback
(the deployment's load-url annotation, as the controller would read it)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fireflyer.eplb import balancedness, rebalance
from fireflyer.eplb.synthetic import zipf_load
from tests.integration.test_eplb_controller import NAME, SMALL, LoadServer
from tests.kube import Kube

pytestmark = pytest.mark.integration
LAYERS, EXPERTS, GPUS, SLOTS = 58, 256, 32, 288


@pytest.fixture
def load_server() -> Iterator[LoadServer]:
    server = LoadServer()
    yield server
    server.httpd.shutdown()


def report(kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fireflyer.cli", "eplb", "report", NAME, "-n", kube.namespace]
    cmd += ["--kubeconfig", str(kube.kubeconfig), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_report_draws_the_placement_the_units_mount_over_their_load(
    crds: Kube, kube: Kube, load_server: LoadServer, tmp_path: Path
) -> None:
    load = zipf_load(LAYERS, EXPERTS, 1.0, np.random.default_rng(3))
    load_server.payload = {"layers": LAYERS, "experts": EXPERTS, "windowSeconds": 60, "tokens": load.tolist()}
    doc = copy.deepcopy(SMALL)
    doc["metadata"]["annotations"] = {"eplb.fireflyer.dev/load-url": load_server.url}
    kube.apply(doc)
    placement = rebalance(load, SLOTS, 8, 4, GPUS, "auto").phy2log
    document = {
        "generation": 1,
        "layers": LAYERS,
        "logicalExperts": EXPERTS,
        "gpus": GPUS,
        "slotsPerGpu": SLOTS // GPUS,
        "phy2log": placement.tolist(),
    }
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{NAME}-decode-placement"},
            "data": {"placement.json": json.dumps(document)},
        }
    )
    kube.apply(
        {
            "apiVersion": "fireflyer.dev/v1alpha1",
            "kind": "ExpertPlacement",
            "metadata": {"name": f"{NAME}-decode-1", "labels": {"app.kubernetes.io/managed-by": "fireflyer"}},
            "spec": {"deployment": NAME, "role": "decode", **document},
        }
    )
    status = {"balancedness": 0.931, "previousBalancedness": 0.612, "appliedUnits": 1}
    kube.run("patch", "expertplacement", f"{NAME}-decode-1", "--subresource=status", "--type=merge",
             "-p", json.dumps({"status": status}))  # fmt: skip
    role_status = {
        "decode": {"placementGeneration": 1, "appliedPlacementGeneration": 1, "balancedness": 0.931}
    }
    kube.run("patch", "inferencedeployment", NAME, "--subresource=status", "--type=merge",
             "-p", json.dumps({"status": role_status}))  # fmt: skip

    png = tmp_path / "decode.png"
    result = report(kube, "--layers", "0-9", "--png", str(png))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{kube.namespace}/{NAME} decode: generation 1 ({NAME}-decode-1), 58 MoE layers on 32 GPUs" in out
    assert "units run generation: 1 (1 unit(s) on this one)" in out
    assert "predicted at publish: 0.931 (the placement before it: 0.612); controller's latest: 0.931" in out
    measured = balancedness(load, placement, GPUS)
    assert f"measured on the load of 1 source(s): {measured:.3f} (all MoE layers)" in out
    rows = [line for line in out.splitlines() if line.startswith("L")]
    assert [row.split()[0] for row in rows] == [f"L{i}" for i in range(10)]
    assert all(len(row.split("  ")[1]) == GPUS for row in rows)  # one plain character per GPU
    assert "\x1b[" not in out  # piped: no colour
    assert png.read_bytes()[:4] == b"\x89PNG"

    # No placement yet ({} in the ConfigMap): the default even split, over a skewed load.
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{NAME}-decode-placement"},
            "data": {"placement.json": "{}"},
        }
    )
    even = np.tile(np.arange(EXPERTS), (LAYERS, 1))
    result = report(kube)
    assert result.returncode == 0, result.stderr
    assert "the default even split, 58 MoE layers on 32 GPUs × 8 slots" in result.stdout
    assert f": {balancedness(load, even, GPUS):.3f} (all MoE layers)" in result.stdout

    load_server.payload = {"tokens": "nothing"}
    failed = report(kube)
    assert failed.returncode == 2 and "not a numeric table" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
