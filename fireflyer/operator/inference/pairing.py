"""The pairing revision of an InferenceDeployment's units: a decode unit consumes a prefill unit's
KV cache only when both were rendered from the same one.

It covers what shapes the KV a prefill unit hands over and how the decode unit reads it: the
model (weights and architecture), the engine (kind, image, its extra arguments, which carry e.g.
a KV cache dtype) and the kernel backends. It leaves out what the two roles differ in by design,
or what does not touch the KV: each role's own shape, the units count, placement, network, EPLB,
and the KV offload directory. The router pairs units only within one pairing revision, so during
a rollout an old prefill unit never hands KV to a new decode unit.
"""

from __future__ import annotations

import hashlib
import json

from fireflyer.api.inference import InferenceDeploymentSpec


def pairing_revision(spec: InferenceDeploymentSpec) -> str:
    material = {
        "model": spec.model.to_wire(),
        "engine": spec.engine.to_wire(),
        "kernels": spec.kernels.to_wire(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]
