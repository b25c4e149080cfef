"""The inference controller's writes for lending: the preemption request on each TrainingJob
(under its own field manager) and an Event there."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fireflyer.api.training import PREEMPTION_REQUESTED
from fireflyer.operator import events, kube
from fireflyer.operator.inference.lending import FIELD_MANAGER, Preemption, is_trainer
from fireflyer.operator.inference.lending import PREEMPTION_REQUESTED as REASON
from fireflyer.operator.planning import format_time

log = logging.getLogger(__name__)


def training_jobs(pods: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The TrainingJobs, read only when a trainer pod holds a node (none to lend otherwise): a
    cluster without training pays no request."""
    if pods is not None and not any(is_trainer(p) for p in pods):
        return []
    return kube.list_("TrainingJob")


def request(cr: dict[str, Any], preemptions: Sequence[Preemption], now: datetime) -> None:
    """Ask each job for its nodes. A job deleted meanwhile is skipped: its nodes are free."""
    deployment = f"{cr['metadata']['namespace']}/{cr['metadata']['name']}"
    at = format_time(now)
    for p in preemptions:
        body = {"metadata": {"annotations": {PREEMPTION_REQUESTED: p.annotation(deployment, at)}}}
        try:
            # Through kube.patch: the informer holds the request at once, so the next pass does
            # not ask again inside the watch's lag.
            job = kube.patch("TrainingJob", p.name, p.namespace, body, field_manager=FIELD_MANAGER)
        except kube.ApiException as exc:
            if exc.status == 404:
                continue
            raise
        log.info(
            "asked TrainingJob %s/%s for %s (unit %s of %s)", p.namespace, p.name, p.nodes, p.unit, deployment
        )
        events.post(
            job,
            "Normal",
            REASON,
            f"{deployment} needs {', '.join(p.nodes)} for unit {p.unit}: giving them back",
        )
