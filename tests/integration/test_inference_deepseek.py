"""The DeepSeek-V3 sample on the 256-node `deepseek` topology: prefill units (4 nodes) land in
one leaf each, decode units (18 nodes, more than a leaf holds) in one spine each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import install_crds, running_operator
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[2] / "manifests/samples/inference-deepseek-v3.yaml"
TOPOGRAPH = "network.topology.nvidia.com/"


@pytest.fixture(scope="module")
def deepseek_operator(deepseek_cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    install_crds(deepseek_cluster)
    with running_operator(
        deepseek_cluster.kubeconfig, tmp_path_factory.mktemp("ds-operator") / "operator.log"
    ):
        yield deepseek_cluster


def test_deepseek_sample_units_land_in_the_tightest_domain(deepseek_operator: Kube) -> None:
    kube = deepseek_operator
    doc = yaml.safe_load(SAMPLE.read_text())
    # Placement is the subject here: units with kvCache wait for a Ready 3FS cluster
    # (tests/integration/test_placement_mount.py).
    doc["spec"].pop("kvCache")
    kube.apply(doc)

    def ready() -> dict | None:
        obj = kube.get("inferencedeployment", "deepseek-v3")
        cond = condition(obj, "Ready")
        return obj if cond and cond["status"] == "True" else None

    obj = wait_for("the DeepSeek-V3 sample to be Ready", ready, timeout=120)
    assert obj["status"]["prefillReady"] == "4/4" and obj["status"]["decodeReady"] == "2/2"
    nodes = {
        n["metadata"]["name"]: n["metadata"]["labels"] for n in kube.get("nodes", namespaced=False)["items"]
    }
    pods = kube.get("pods", selector="fireflyer.dev/deployment=deepseek-v3,fireflyer.dev/component=unit")[
        "items"
    ]
    assert len(pods) == 4 * 4 + 2 * 18
    assert len({p["spec"]["nodeName"] for p in pods}) == len(pods)  # never two ranks on a node
    for unit in obj["status"]["units"]:
        unit_nodes = [
            p["spec"]["nodeName"]
            for p in pods
            if p["metadata"]["labels"]["fireflyer.dev/role"] == unit["role"]
            and p["metadata"]["labels"]["fireflyer.dev/unit"] == str(unit["index"])
        ]
        level = "leaf" if unit["role"] == "prefill" else "spine"
        assert len({nodes[n][TOPOGRAPH + level] for n in unit_nodes}) == 1, unit
        assert unit["domain"].startswith(level + "/")
        if unit["role"] == "decode":  # 18 nodes cannot fit in an 8-node leaf
            assert len({nodes[n][TOPOGRAPH + "leaf"] for n in unit_nodes}) == 3
