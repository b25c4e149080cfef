"""Launch commands for each engine and role. The shell line runs under /bin/sh -c so that the
rank (from the StatefulSet pod index) can be used in arithmetic."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from fireflyer.api.inference import InferenceDeploymentSpec, Role
from fireflyer.operator.inference.mounts import PLACEMENT_DIR

DEFAULT_IMAGE = "ghcr.io/fireflyer/workloads:0.1.0"
SERVE_PORT = 30000
DIST_PORT = 5000
BOOTSTRAP_PORT = 8998
VLLM_RPC_PORT = 13345


@dataclass(frozen=True)
class UnitContext:
    """What a unit's pods know about their unit when they start."""

    deployment: str
    role: str  # prefill | decode
    index: int
    leader_host: str  # DNS name of rank 0
    ib_devices: str  # comma-separated HCA names (from the node's NIC annotation)


def dispatch_mode(role_name: str, role: Role) -> str:
    return role.dispatch_mode or ("lowLatency" if role_name == "decode" else "normal")


def _join(args: list[str]) -> str:
    return " ".join(a if a.startswith("$") or a.startswith('"$') else shlex.quote(a) for a in args)


def fireflyer_command(spec: InferenceDeploymentSpec, role: Role, unit: UnitContext) -> list[str]:
    """Our own engine: `fireflyer serve`, with the EPLB placement read from the ConfigMap."""
    args = [
        "fireflyer",
        "serve",
        "--role",
        unit.role,
        "--model",
        spec.model.source,
        "--served-model-name",
        spec.model.name,
        "--nnodes",
        str(role.nodes_per_unit),
        "--node-rank",
        "$RANK",
        "--gpus-per-node",
        str(role.gpus_per_node),
        "--tensor-parallel",
        str(role.parallelism.tensor),
        "--data-parallel",
        str(role.parallelism.data),
        "--expert-parallel",
        str(role.parallelism.expert),
        "--dispatch-mode",
        dispatch_mode(unit.role, role),
        "--attention-backend",
        spec.kernels.attention,
        "--gemm-backend",
        spec.kernels.gemm,
        "--dispatch-backend",
        spec.kernels.dispatch,
        "--dist-init-addr",
        f"{unit.leader_host}:{DIST_PORT}",
        "--port",
        str(SERVE_PORT),
        "--placement-dir",
        PLACEMENT_DIR,
    ]
    if spec.eplb.mode != "off":
        args += ["--redundant-experts", str(spec.eplb.redundant_experts)]
    if spec.kv_cache:
        args += ["--kv-cache-dir", spec.kv_cache.path]
    if spec.network.preflight:
        # The engine checks the unit's links before serving; on failure it exits with a
        # termination message starting "preflight failed:" and the operator moves the unit.
        args.append("--preflight")
    return args + list(spec.engine.args)


def sglang_command(spec: InferenceDeploymentSpec, role: Role, unit: UnitContext) -> list[str]:
    gpus = role.nodes_per_unit * role.gpus_per_node
    mode = dispatch_mode(unit.role, role)
    args = [
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        spec.model.source,
        "--served-model-name",
        spec.model.name,
        "--trust-remote-code",
        "--tp-size",
        str(gpus),
        "--dp-size",
        str(role.parallelism.data),
        "--ep-size",
        str(role.parallelism.expert),
        "--dist-init-addr",
        f"{unit.leader_host}:{DIST_PORT}",
        "--nnodes",
        str(role.nodes_per_unit),
        "--node-rank",
        "$RANK",
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVE_PORT),
        "--moe-a2a-backend",
        "deepep",
        "--deepep-mode",
        "low_latency" if mode == "lowLatency" else "normal",
        "--disaggregation-mode",
        unit.role,
        "--disaggregation-ib-device",
        unit.ib_devices,
        "--disaggregation-bootstrap-port",
        str(BOOTSTRAP_PORT),
    ]
    if role.parallelism.data > 1:
        args.append("--enable-dp-attention")
    if spec.eplb.mode != "off":
        args += ["--ep-num-redundant-experts", str(spec.eplb.redundant_experts)]
    if spec.eplb.mode == "dynamic":
        args.append("--enable-eplb")
    elif spec.eplb.mode == "static":
        args += ["--init-expert-location", "/etc/fireflyer/placement/phy2log.json"]
    return args + list(spec.engine.args)


def vllm_command(spec: InferenceDeploymentSpec, role: Role, unit: UnitContext) -> list[str]:
    mode = dispatch_mode(unit.role, role)
    local = (
        role.gpus_per_node // role.parallelism.tensor if role.parallelism.tensor <= role.gpus_per_node else 1
    )
    args = [
        "vllm",
        "serve",
        spec.model.source,
        "--served-model-name",
        spec.model.name,
        "--trust-remote-code",
        "--tensor-parallel-size",
        str(role.parallelism.tensor),
        "--data-parallel-size",
        str(role.parallelism.data),
        "--data-parallel-size-local",
        str(local),
        "--data-parallel-address",
        unit.leader_host,
        "--data-parallel-rpc-port",
        str(VLLM_RPC_PORT),
        "--data-parallel-start-rank",
        f"$((RANK * {local}))",
        "--enable-expert-parallel",
        "--all2all-backend",
        "deepep_low_latency" if mode == "lowLatency" else "deepep_high_throughput",
        "--port",
        str(SERVE_PORT),
        "--kv-transfer-config",
        json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"}),
    ]
    if spec.eplb.mode == "dynamic":
        # vLLM counts its EPLB window and interval in engine steps, not seconds: keep its own.
        config = {"num_redundant_experts": spec.eplb.redundant_experts}
        args += ["--enable-eplb", "--eplb-config", json.dumps(config)]
    return args + list(spec.engine.args)


def shell_line(spec: InferenceDeploymentSpec, role: Role, unit: UnitContext) -> str:
    """The container's `sh -c` line: network environment from the node's files, then the engine.
    Non-leader vLLM ranks run headless."""
    builders = {"fireflyer": fireflyer_command, "sglang": sglang_command, "vllm": vllm_command}
    args = builders[spec.engine.kind](spec, role, unit)
    line = _join(args)
    if spec.engine.kind == "vllm":
        line = f'if [ "$RANK" != 0 ]; then set -- --headless; fi; exec {line} "$@"'
    else:
        line = f"exec {line}"
    return f". /etc/fireflyer/net/env.sh; {line}"


def image(spec: InferenceDeploymentSpec) -> str:
    return spec.engine.image or DEFAULT_IMAGE
