"""The rebalance algorithm: invariants (hypothesis), the reference it must never lose to, and the
edge cases a controller will meet."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fireflyer.eplb import balancedness, rebalance
from fireflyer.eplb.algorithm import PlacementError, from_phy2log, validate
from fireflyer.eplb.metrics import replica_counts
from fireflyer.eplb.reference import rebalance_reference
from fireflyer.eplb.synthetic import zipf_load


@st.composite
def shapes(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, int]:
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus_per_node = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * gpus_per_node
    groups = nodes * draw(st.sampled_from([1, 2]))
    experts = groups * draw(st.integers(1, 4)) * gpus_per_node
    slots_per_gpu = -(-experts // gpus) + draw(st.integers(0, 2))
    layers = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["random", "zero", "hot", "zipf"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "zero":
        load = np.zeros((layers, experts))
    elif kind == "hot":
        load = np.zeros((layers, experts))
        load[:, rng.integers(experts)] = 1000.0
    elif kind == "zipf":
        load = zipf_load(layers, experts, draw(st.floats(0.3, 1.5)), rng)
    else:
        load = rng.integers(0, 1000, (layers, experts)).astype(float)
    return load, gpus * slots_per_gpu, groups, nodes, gpus


@settings(max_examples=150, deadline=None)
@given(shapes(), st.sampled_from(["auto", "global"]))
def test_invariants(case: tuple[np.ndarray, int, int, int, int], policy: str) -> None:
    load, slots, groups, nodes, gpus = case
    placement = rebalance(load, slots, groups, nodes, gpus, policy)  # type: ignore[arg-type]
    layers, experts = load.shape
    assert placement.phy2log.shape == (layers, slots)
    assert validate(placement, experts, gpus) == []
    assert (replica_counts(placement.phy2log, experts) >= 1).all()  # every expert has a replica
    assert placement.replica_counts.sum(axis=1).tolist() == [slots] * layers
    for layer in range(layers):  # log2phy is the inverse of phy2log
        for expert in range(experts):
            phys = [p for p in placement.log2phy[layer, expert] if p >= 0]
            assert len(phys) == placement.replica_counts[layer, expert]
            assert all(placement.phy2log[layer, p] == expert for p in phys)
    again = rebalance(load, slots, groups, nodes, gpus, policy)  # type: ignore[arg-type]
    assert np.array_equal(again.phy2log, placement.phy2log)  # deterministic
    if policy == "auto":  # hierarchical: a group's replicas stay on one node
        group_size = experts // groups
        per_node = slots // nodes
        for layer in range(layers):
            node_of = placement.phy2log[layer].reshape(nodes, per_node)
            for group in range(groups):
                holders = {n for n in range(nodes) if np.any(node_of[n] // group_size == group)}
                assert len(holders) == 1
    # never worse than the published greedy on the load it was built from
    reference = np.array(rebalance_reference(load.tolist(), slots, groups, nodes, gpus, policy))
    assert balancedness(load, placement.phy2log, gpus) >= balancedness(load, reference, gpus) - 1e-9


def test_better_than_the_greedy_on_skewed_prefill() -> None:
    load = zipf_load(58, 256, 0.9, np.random.default_rng(3))
    ours = rebalance(load, 288, 8, 4, 32)
    greedy = np.array(rebalance_reference(load.tolist(), 288, 8, 4, 32))
    assert balancedness(load, ours.phy2log, 32) > balancedness(load, greedy, 32) + 0.005


def test_without_refinement_it_is_the_greedy() -> None:
    load = zipf_load(8, 64, 0.8, np.random.default_rng(4))
    greedy = np.array(rebalance_reference(load.tolist(), 96, 8, 4, 16))
    plain = rebalance(load, 96, 8, 4, 16, refine=False)
    assert balancedness(load, plain.phy2log, 16) == pytest.approx(balancedness(load, greedy, 16))


def test_bad_shapes_are_refused_with_reasons() -> None:
    load = np.ones((2, 16))
    with pytest.raises(PlacementError, match="divisible by num_gpus"):
        rebalance(load, 18, 4, 2, 4)
    with pytest.raises(PlacementError, match="< experts"):
        rebalance(load, 8, 4, 2, 4)
    with pytest.raises(PlacementError, match="hierarchical needs"):
        rebalance(load, 24, 4, 3, 6, "hierarchical")
    with pytest.raises(PlacementError, match="non-negative"):
        rebalance(-load, 16, 4, 2, 4)


def test_validate_catches_a_missing_expert() -> None:
    table = np.tile(np.arange(8) % 4, (1, 1))
    assert validate(from_phy2log(table, 5), 5, 2) == ["layer 0: expert 4 has no replica (1 such)"]


def test_a_dominant_expert_is_spread_one_replica_per_gpu() -> None:
    # One expert carries most of the load: the greedy gives it more replicas than the node has
    # GPUs, so two land on one GPU; capping at one per GPU frees slots and lowers the peak.
    load = np.full((1, 16), 10.0)
    load[0, 5] = 2000.0
    greedy = np.array(rebalance_reference(load.tolist(), 24, 1, 1, 4))
    ours = rebalance(load, 24, 1, 1, 4)
    assert replica_counts(greedy, 16)[0, 5] > 4
    assert ours.replica_counts[0, 5] == 4
    gpu_of_replica = [p // 6 for p in ours.log2phy[0, 5] if p >= 0]
    assert sorted(gpu_of_replica) == [0, 1, 2, 3]
    assert balancedness(load, ours.phy2log, 4) > balancedness(load, greedy, 4) + 0.05


def test_a_heavily_skewed_prefill_gains_from_the_replica_cap() -> None:
    load = zipf_load(58, 256, 1.2, np.random.default_rng(5))
    ours = rebalance(load, 288, 8, 4, 32)
    greedy = np.array(rebalance_reference(load.tolist(), 288, 8, 4, 32))
    assert balancedness(load, ours.phy2log, 32) > 1.05 * balancedness(load, greedy, 32)
