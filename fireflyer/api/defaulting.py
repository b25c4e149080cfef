"""The API server's defaulting of custom resources, applied to what a controller is about to
write: a status read back carries every schema default, so a comparison with what the controller
computed must too, or an unchanged status would look changed on every pass."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from fireflyer.api.crd import part_schema


def with_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """`value` with each absent property that has a default in `schema` filled in, in every object
    present (array items included), as a structural schema's defaulting does."""
    properties = schema.get("properties")
    if isinstance(value, Mapping) and isinstance(properties, Mapping):
        out = dict(value)
        for name, prop in properties.items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = with_defaults(out[name], prop)
        return out
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        return [with_defaults(v, items) for v in value]
    return value


def status_as_stored(kind: str, status: Mapping[str, Any]) -> dict[str, Any]:
    """The status fields a controller sends, each as the API server will store it. Only the sent
    fields: others are other writers'."""
    properties = part_schema(kind, "status").get("properties") or {}
    return {key: with_defaults(value, properties.get(key) or {}) for key, value in status.items()}
