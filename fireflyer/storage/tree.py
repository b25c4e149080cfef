"""Nested state dicts ⇄ flat tensor names plus JSON leaves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

SEPARATOR = "/"


def flatten_state(
    state: Mapping[str, Any],
) -> tuple[dict[str, tuple[list[str], torch.Tensor]], list[dict[str, Any]]]:
    """Tensors by flat name (with their key path) and the JSON-serialisable leaves.

    A flat dict's names are its own keys; nested mappings join keys with "/".
    """
    tensors: dict[str, tuple[list[str], torch.Tensor]] = {}
    extra: list[dict[str, Any]] = []

    def visit(node: Mapping[str, Any], path: list[str]) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"state dict keys must be strings, found {key!r}"
                    f" under {SEPARATOR.join(path) or 'the root'}"
                )
            here = [*path, key]
            if isinstance(value, torch.Tensor):
                name = SEPARATOR.join(here)
                if name in tensors:
                    raise ValueError(f"two entries flatten to the same name {name!r}")
                tensors[name] = (here, value)
            elif isinstance(value, Mapping):
                visit(value, here)
            else:
                try:
                    json.dumps(value)
                except TypeError:
                    raise TypeError(
                        f"{SEPARATOR.join(here)}: {type(value).__name__}"
                        " is neither a tensor nor JSON-serialisable"
                    ) from None
                extra.append({"path": here, "value": value})

    visit(state, [])
    return tensors, extra


def unflatten_state(tensors: list[tuple[list[str], Any]], extra: list[dict[str, Any]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in [*tensors, *((e["path"], e["value"]) for e in extra)]:
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root
