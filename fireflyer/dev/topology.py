"""Simulated GPU/RDMA cluster topologies: YAML files → kwok-managed Node objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fireflyer.dev.build import REPO_ROOT

TOPOLOGY_DIR = REPO_ROOT / "hack" / "topologies"
TOPOGRAPH_PREFIX = "network.topology.nvidia.com/"
NICS_ANNOTATION = "fireflyer.dev/rdma-nics"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
SIMULATED_LABEL = "fireflyer.dev/simulated"


class TopologyError(ValueError):
    """A topology file is missing or malformed; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Nic(_Strict):
    name: str
    netdev: str
    rail: int = Field(ge=0)
    gpus: list[int]


class Rdma(_Strict):
    resource: str = "rdma/ib"
    nics: int | list[Nic] = Field(default=8, description="a count, or the explicit NIC list")
    rail_optimized: bool = Field(default=True, alias="railOptimized")

    def nic_list(self, gpu_count: int) -> list[Nic]:
        if isinstance(self.nics, list):
            return self.nics
        count = self.nics
        if count == 0:
            return []
        per_nic = max(gpu_count // count, 1)
        return [
            Nic(
                name=f"mlx5_{i}",
                netdev=f"ibp{i}s0",
                rail=i if self.rail_optimized else 0,
                gpus=[g for g in range(i * per_nic, min((i + 1) * per_nic, gpu_count))],
            )
            for i in range(count)
        ]


class Gpu(_Strict):
    product: str
    count: int = Field(ge=0, le=72)


class NodeShape(_Strict):
    name_prefix: str = Field(alias="namePrefix", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    cpu: str = "128"
    memory: str = "1Ti"
    pods: int = Field(default=110, ge=1)
    gpu: Gpu
    rdma: Rdma = Field(default_factory=Rdma)
    taints: list[dict[str, str]] = Field(default_factory=list)


class Fabric(_Strict):
    levels: list[str] = Field(min_length=1)
    fanout: list[int] = Field(min_length=1)
    nodes_per_leaf: int = Field(alias="nodesPerLeaf", ge=1)

    @model_validator(mode="after")
    def _fanout_matches_levels(self) -> Fabric:
        if len(self.fanout) != len(self.levels):
            raise ValueError(f"fanout has {len(self.fanout)} entries but levels has {len(self.levels)}")
        if any(f < 1 for f in self.fanout):
            raise ValueError("every fanout entry must be ≥ 1")
        return self


class Topology(_Strict):
    name: str
    fabric: Fabric
    node: NodeShape

    @property
    def node_count(self) -> int:
        count = self.fabric.nodes_per_leaf
        for fan in self.fabric.fanout:
            count *= fan
        return count


def resolve(name_or_path: str) -> Path:
    """A topology is a file path, or the name of a file in hack/topologies."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TopologyError(f"topology file {path} does not exist")
        return path
    candidate = TOPOLOGY_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml")))
        raise TopologyError(f"unknown topology {name_or_path!r}; known: {known}")
    return candidate


def load(name_or_path: str) -> Topology:
    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise TopologyError(f"{path}: {problems}") from exc


def _domain_paths(fabric: Fabric) -> list[list[str]]:
    """Every leaf's path of domain names from the top level down, e.g. [core-0, spine-1, leaf-05]."""
    paths: list[list[str]] = [[]]
    for level, fan in zip(fabric.levels, fabric.fanout, strict=True):
        next_paths = []
        counter = 0
        for path in paths:
            for _ in range(fan):
                next_paths.append([*path, f"{level}-{counter:02d}"])
                counter += 1
        paths = next_paths
    return paths


def nodes(topology: Topology) -> list[dict[str, Any]]:
    """The Node objects for a topology, status included (kwok keeps what we give it)."""
    shape = topology.node
    nic_list = shape.rdma.nic_list(shape.gpu.count)
    nic_json = json.dumps([nic.model_dump() for nic in nic_list], separators=(",", ":"))
    result = []
    index = 0
    for path in _domain_paths(topology.fabric):
        for _ in range(topology.fabric.nodes_per_leaf):
            name = f"{shape.name_prefix}-{index:03d}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                SIMULATED_LABEL: "true",
                "nvidia.com/gpu.present": "true" if shape.gpu.count else "false",
                "nvidia.com/gpu.product": shape.gpu.product,
                "nvidia.com/gpu.count": str(shape.gpu.count),
            }
            for level, domain in zip(topology.fabric.levels, path, strict=True):
                labels[TOPOGRAPH_PREFIX + level] = domain
            resources = {"cpu": shape.cpu, "memory": shape.memory, "pods": str(shape.pods)}
            if shape.gpu.count:
                resources["nvidia.com/gpu"] = str(shape.gpu.count)
            if nic_list:
                resources[shape.rdma.resource] = str(len(nic_list))
            result.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {
                            KWOK_ANNOTATION: "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                            NICS_ANNOTATION: nic_json,
                        },
                    },
                    "spec": {"taints": list(shape.taints)},
                    "status": {"allocatable": resources, "capacity": dict(resources)},
                }
            )
            index += 1
    return result


def fabric_topology(nodes: int, nodes_per_leaf: int = 8) -> dict[str, Any]:
    """A topology file's content for `nodes` 8-GPU H800 nodes under one core: as many spines as
    leaves per spine, or twice as many leaves (2048 nodes = 16 spines × 16 leaves × 8 nodes)."""
    leaves, rest = divmod(nodes, nodes_per_leaf)
    if rest or leaves < 1 or leaves & (leaves - 1):
        raise TopologyError(f"{nodes} nodes: need {nodes_per_leaf} × a power of two")
    spines = 1 << (leaves.bit_length() - 1) // 2
    return {
        "name": f"fabric-{nodes}",
        "fabric": {
            "levels": ["core", "spine", "leaf"],
            "fanout": [1, spines, leaves // spines],
            "nodesPerLeaf": nodes_per_leaf,
        },
        "node": {
            "namePrefix": "h800",
            "cpu": "224",
            "memory": "2Ti",
            "gpu": {"product": "NVIDIA-H800", "count": 8},
            "rdma": {"resource": "rdma/ib", "nics": 8, "railOptimized": True},
        },
    }
