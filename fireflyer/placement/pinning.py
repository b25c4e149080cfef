"""How a planned gang is pinned in its pod template (what `reservations.planned_nodes` reads
back): required node affinity on the planned hosts and their domain, one pod per node, the GPU
operator's taint and the placement's own tolerations and node selector. Pure."""

from __future__ import annotations

from typing import Any

from fireflyer.api.base import Placement

HOSTNAME = "kubernetes.io/hostname"


def pod_placement(
    placement: Placement, selector: dict[str, str], nodes: tuple[str, ...], domain: tuple[str, str, str]
) -> dict[str, Any]:
    """Pod-spec fields for a gang of pods matching `selector`, planned onto `nodes` inside
    `domain` = (level, label key, value); an empty label key means no domain label."""
    _, label_key, domain_value = domain
    match = [{"key": HOSTNAME, "operator": "In", "values": list(nodes)}]
    if label_key:
        match.append({"key": label_key, "operator": "In", "values": [domain_value]})
    rules: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": match}]
                }
            },
            # One pod per node: a rank owns its node's GPUs and NICs.
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": selector}, "topologyKey": HOSTNAME}
                ]
            },
        },
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            *(t.to_wire() for t in placement.tolerations),
        ],
    }
    if placement.node_selector:
        rules["nodeSelector"] = dict(placement.node_selector)
    return rules
