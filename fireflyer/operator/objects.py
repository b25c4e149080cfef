"""Helpers every controller uses to build child objects."""

from __future__ import annotations

from typing import Any


def owner_reference(cr: dict[str, Any]) -> dict[str, Any]:
    """Marks a child as owned (and garbage-collected with) the custom resource `cr`."""
    meta = cr["metadata"]
    return {
        "apiVersion": cr["apiVersion"],
        "kind": cr["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
