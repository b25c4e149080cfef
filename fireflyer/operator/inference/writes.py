"""Status writes to an InferenceDeployment by more than one writer (the reconcile, the EPLB timer):
each merges only its own conditions, conditioned on the resourceVersion it read
(fireflyer.operator.status_writes)."""

from __future__ import annotations

from typing import Any

from fireflyer.operator import status_writes

KIND = "InferenceDeployment"


def patch_status(
    name: str, namespace: str, fields: dict[str, Any], conditions: list[dict[str, Any]], generation: int
) -> None:
    """Merge-patch `fields` into status, with `conditions` merged into the live ones."""
    status_writes.patch_status(KIND, name, namespace, fields, conditions, generation)
