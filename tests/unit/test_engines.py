"""Engine launch commands for the DeepSeek-V3 sample: golden files plus the flags each engine
needs for wide-EP disaggregated serving. Regenerate the golden files with
FIREFLYER_UPDATE_GOLDEN=1 after an intended change, and review the diff."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.inference import children
from fireflyer.operator.inference.engines import UnitContext, shell_line

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
SAMPLE = yaml.safe_load((REPO / "manifests/samples/inference-deepseek-v3.yaml").read_text())


def _line(engine: str, role: str) -> str:
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["engine"] = {"kind": engine, "image": f"example.com/{engine}:1"}
    spec = InferenceDeployment.model_validate(doc).spec
    ctx = UnitContext(
        "deepseek-v3", role, 0, children.leader_host("deepseek-v3", role, 0, "serving"), "$NCCL_IB_HCA"
    )
    return shell_line(spec, getattr(spec, role), ctx)


@pytest.mark.parametrize("engine", ["fireflyer", "sglang", "vllm"])
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_golden(engine: str, role: str) -> None:
    line = _line(engine, role)
    path = GOLDEN / f"{engine}-{role}.sh"
    if os.environ.get("FIREFLYER_UPDATE_GOLDEN"):
        path.write_text(line + "\n")
    assert line + "\n" == path.read_text()


def test_sglang_flags() -> None:
    decode = _line("sglang", "decode")
    for flag in (
        "--tp-size 144",
        "--dp-size 144",
        "--enable-dp-attention",
        "--ep-size 144",
        "--moe-a2a-backend deepep",
        "--deepep-mode low_latency",
        "--disaggregation-mode decode",
        "--disaggregation-ib-device $NCCL_IB_HCA",
        "--nnodes 18",
        "--node-rank $RANK",
        "--enable-eplb",
        "--ep-num-redundant-experts 32",
        "--dist-init-addr deepseek-v3-decode-0-0.deepseek-v3-decode-0.serving.svc.cluster.local:5000",
    ):
        assert flag in decode, flag
    prefill = _line("sglang", "prefill")
    assert "--deepep-mode normal" in prefill and "--disaggregation-mode prefill" in prefill
    assert "--nnodes 4" in prefill and "--tp-size 32" in prefill


def test_vllm_flags() -> None:
    decode = _line("vllm", "decode")
    for flag in (
        "--data-parallel-size 144",
        "--data-parallel-size-local 8",
        "--data-parallel-start-rank $((RANK * 8))",
        "--enable-expert-parallel",
        "--all2all-backend deepep_low_latency",
        "--enable-eplb",
        "--data-parallel-address deepseek-v3-decode-0-0",
        "--headless",
    ):
        assert flag in decode, flag
    assert "--all2all-backend deepep_high_throughput" in _line("vllm", "prefill")
    assert '"num_redundant_experts": 32' in decode


def test_every_line_sources_the_network_environment_first() -> None:
    for engine in ("fireflyer", "sglang", "vllm"):
        assert _line(engine, "decode").startswith(". /etc/fireflyer/net/env.sh; ")
