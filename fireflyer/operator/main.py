"""The operator process: kopf with fireflyer's settings, health probe and metrics endpoint."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import kopf
from prometheus_client import start_http_server

from fireflyer.api.base import GROUP

FIELD_MANAGER = "fireflyer-operator"
PEERING_NAME = "fireflyer"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own bookkeeping lives in annotations, never in status fields the CRDs do not declare.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # A watch that stalls silently is re-established within minutes.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = FIELD_MANAGER
    settings.execution.max_workers = int(os.environ.get("FIREFLYER_WORKERS", "16"))
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]


def load_controllers() -> None:
    """Import the per-kind controllers so that their kopf handlers register."""
    from fireflyer.operator import controllers  # noqa: F401


def run(namespace: str | None, metrics_port: int, health_port: int, standalone: bool) -> None:
    load_controllers()
    if metrics_port:
        start_http_server(metrics_port)
    kopf.configure(verbose=bool(os.environ.get("FIREFLYER_VERBOSE")))
    kopf.run(
        clusterwide=namespace is None,
        namespaces=[namespace] if namespace else (),
        standalone=standalone,
        peering_name=None if standalone else PEERING_NAME,
        # Distinct priorities let one replica lead and the other wait (kopf peering).
        priority=random.randint(1, 1_000_000),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )
