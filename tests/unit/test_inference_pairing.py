"""The pairing revision: which prefill and decode units the router may pair (a decode unit
consumes the prefill unit's KV cache), and what leaves it alone."""

from __future__ import annotations

import copy
from typing import Any

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.inference.pairing import pairing_revision
from tests.unit.test_inference_revision import SAMPLE


def _pairing(**changes: Any) -> str:
    """The pairing revision of the sample with `changes` ({"a.b": value}) applied to its spec."""
    doc = copy.deepcopy(SAMPLE)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = doc["spec"]
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return pairing_revision(InferenceDeployment.model_validate(doc).spec)


def test_what_shapes_the_kv_handed_over_changes_the_pairing_revision() -> None:
    base = _pairing()
    assert len(base) == 10 and base == _pairing()  # short and stable
    changed = [
        _pairing(**{"model.source": "/models/other"}),
        _pairing(**{"model.name": "other"}),
        _pairing(**{"engine.args": ["--kv-cache-dtype", "fp8"]}),
        _pairing(**{"engine.image": "registry.example/fireflyer:next"}),
        _pairing(**{"kernels.attention": "triton"}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_each_roles_own_shape_and_placement_leave_the_pairing_revision() -> None:
    base = _pairing()
    decode = SAMPLE["spec"]["decode"]
    assert _pairing(**{"decode.units": decode.get("units", 1) + 2}) == base
    assert _pairing(**{"prefill.units": 0}) == base
    assert _pairing(**{"decode.dispatchMode": "normal"}) == base
    assert _pairing(**{"decode.resources": {"requests": {"memory": "1Ti"}}}) == base
    assert _pairing(**{"decode.maxUnavailableUnits": 2}) == base
    assert _pairing(**{"router.replicas": 5, "router.policy": "round-robin"}) == base
    assert _pairing(**{"eplb.redundantExperts": 0, "eplb.mode": "off"}) == base
