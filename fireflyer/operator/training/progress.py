"""The trainer's progress as rank 0 reports it at GET /status, turned into status fields. Pure."""

from __future__ import annotations

import json
import math
from typing import Any

from fireflyer.operator import labels as L


def rank0_address(pods: list[dict[str, Any]]) -> str | None:
    """The pod IP of the running rank 0 (completion index 0) among an attempt's pods. Pod IPs
    work where the operator runs outside the cluster's DNS."""
    for pod in pods:
        annotations = pod["metadata"].get("annotations") or {}
        if (
            annotations.get(L.COMPLETION_INDEX) == "0"
            and pod.get("status", {}).get("phase") == "Running"
            and not pod["metadata"].get("deletionTimestamp")
            and pod.get("status", {}).get("podIP")
        ):
            return str(pod["status"]["podIP"])
    return None


def progress_status(polled: dict[str, Any]) -> dict[str, Any]:
    """Status fields from rank 0's GET /status ({"step", "loss", "lastCheckpointStep",
    "tokensPerSecond", "phase"}). Values of the wrong type, and a loss that is not finite (JSON
    has no NaN), are left out rather than written."""
    out: dict[str, Any] = {}

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    if integer(polled.get("step")):
        out["step"] = polled["step"]
    if number(polled.get("loss")):
        out["loss"] = float(polled["loss"])
    if integer(polled.get("lastCheckpointStep")):
        out["lastCheckpointStep"] = polled["lastCheckpointStep"]
    if number(polled.get("tokensPerSecond")) and polled["tokensPerSecond"] >= 0:
        out["tokensPerSecond"] = float(polled["tokensPerSecond"])
    return out


def progress_changes(previous: dict[str, Any], polled: dict[str, Any]) -> dict[str, Any]:
    """The polled fields that differ from the status (nothing to patch when empty)."""
    return {k: v for k, v in progress_status(polled).items() if previous.get(k) != v}


def rank0_final(pods: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's last report, from its container's termination message (the trainer writes its
    final /status there): the numbers the poller could not read once rank 0 had exited."""
    for pod in pods:
        if (pod["metadata"].get("annotations") or {}).get(L.COMPLETION_INDEX) != "0":
            continue
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((container.get("state") or {}).get("terminated") or {}).get("message")
            if not message:
                continue
            try:
                report = json.loads(message)
            except ValueError:
                continue
            if isinstance(report, dict):
                return progress_status(report)
    return {}
