"""Topology files → simulated nodes, and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fireflyer.dev import topology


def test_small_topology_shape() -> None:
    nodes = topology.nodes(topology.load("small"))
    assert len(nodes) == 8
    leaves = [n["metadata"]["labels"]["network.topology.nvidia.com/leaf"] for n in nodes]
    assert leaves.count(leaves[0]) == 4 and len(set(leaves)) == 2
    nics = json.loads(nodes[0]["metadata"]["annotations"][topology.NICS_ANNOTATION])
    assert [(n["name"], n["rail"], n["gpus"]) for n in nics][:2] == [("mlx5_0", 0, [0]), ("mlx5_1", 1, [1])]


def test_deepseek_topology_has_256_nodes_in_three_levels() -> None:
    topo = topology.load("deepseek")
    nodes = topology.nodes(topo)
    assert len(nodes) == topo.node_count == 256
    labels = [n["metadata"]["labels"] for n in nodes]
    assert len({lab["network.topology.nvidia.com/spine"] for lab in labels}) == 4
    assert len({lab["network.topology.nvidia.com/leaf"] for lab in labels}) == 32
    assert len({n["metadata"]["name"] for n in nodes}) == 256
    # every leaf sits under exactly one spine
    leaf_to_spine = {}
    for lab in labels:
        leaf = lab["network.topology.nvidia.com/leaf"]
        assert (
            leaf_to_spine.setdefault(leaf, lab["network.topology.nvidia.com/spine"])
            == lab["network.topology.nvidia.com/spine"]
        )


def test_malformed_topology_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nfabric: {levels: [spine, leaf], fanout: [1, 2], nodesPerLeaf: 0}\n"
        "node: {namePrefix: gpu, gpu: {product: H100, count: 8}}\n"
    )
    with pytest.raises(topology.TopologyError) as err:
        topology.load(str(bad))
    assert str(bad) in str(err.value) and "fabric.nodesPerLeaf" in str(err.value)


def test_fanout_must_match_levels(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nfabric: {levels: [spine, leaf], fanout: [2], nodesPerLeaf: 2}\n"
        "node: {namePrefix: gpu, gpu: {product: H100, count: 8}}\n"
    )
    with pytest.raises(topology.TopologyError, match=r"fabric.*fanout has 1 entries"):
        topology.load(str(bad))


def test_unknown_topology_lists_known_ones() -> None:
    with pytest.raises(topology.TopologyError, match="known: deepseek, small"):
        topology.load("nope")
