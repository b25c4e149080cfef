"""The network environment every GPU workload pod gets (inference units and training jobs alike):
NCCL/Gloo bootstrap interface, NVSHMEM over IBGDA, and each node's HCA list from its NIC
annotation. Pure builders."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fireflyer.api.base import Network

NICS_ANNOTATION = "fireflyer.dev/rdma-nics"


def network_env(network: Network) -> list[dict[str, Any]]:
    """Environment for the collectives: node and pod address, bootstrap interface, IB GID,
    NVSHMEM IBGDA."""
    return [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NCCL_SOCKET_IFNAME", "value": network.socket_ifname},
        {"name": "GLOO_SOCKET_IFNAME", "value": network.socket_ifname},
        {"name": "NCCL_IB_GID_INDEX", "value": "3"},
        {"name": "NCCL_NVLS_ENABLE", "value": "0"},
        # NVSHMEM over InfiniBand GPUDirect Async: the GPU drives the NIC (DeepEP low-latency).
        {"name": "NVSHMEM_IB_ENABLE_IBGDA", "value": "1"},
        {"name": "NVSHMEM_IBGDA_NIC_HANDLER", "value": "gpu"},
        {"name": "NVSHMEM_DISABLE_P2P", "value": "0"},
    ]


def node_hca(node: dict[str, Any], gpus_per_node: int) -> tuple[str, str]:
    """(HCA list, GPU→HCA rail map) from the node's NIC annotation. On rail-optimised nodes
    GPU i uses the NIC that serves it, one NIC per GPU."""
    raw = (node.get("metadata", {}).get("annotations") or {}).get(NICS_ANNOTATION, "[]")
    try:
        nics = json.loads(raw)
    except json.JSONDecodeError:
        nics = []
    names = [n["name"] for n in nics if "name" in n]
    rails = []
    for gpu in range(gpus_per_node):
        owner = next((n["name"] for n in nics if gpu in n.get("gpus", [])), None)
        if owner is None and names:
            owner = names[gpu % len(names)]
        if owner:
            rails.append(f"{gpu}:{owner}")
    return ",".join(names), ",".join(rails)


def hca_env(nodes: Iterable[dict[str, Any]], gpus_per_node: int) -> list[dict[str, Any]]:
    """NCCL_IB_HCA, NVSHMEM_HCA_LIST and FIREFLYER_GPU_HCA as plain values for pods that may land
    on any of `nodes`. Nodes of one job normally share a NIC layout; where they differ, the HCA
    lists are merged (NCCL skips names a node lacks) and no rail map is given."""
    pairs = [node_hca(node, gpus_per_node) for node in nodes]
    pairs = [p for p in pairs if p[0]]
    if not pairs:
        return []
    if len(set(pairs)) == 1:
        hcas, rails = pairs[0]
    else:
        merged: list[str] = []
        for names, _ in pairs:
            merged += [n for n in names.split(",") if n not in merged]
        hcas, rails = ",".join(merged), ""
    env = [{"name": "NCCL_IB_HCA", "value": hcas}, {"name": "NVSHMEM_HCA_LIST", "value": hcas}]
    if rails:
        env.append({"name": "FIREFLYER_GPU_HCA", "value": rails})
    return env
