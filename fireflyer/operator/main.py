"""The operator process: kopf with fireflyer's settings, health probe and metrics endpoint."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import kopf
from prometheus_client import start_http_server

from fireflyer.api.base import GROUP
from fireflyer.operator import cache, kube
from fireflyer.operator import labels as L
from fireflyer.operator.locks import STOPPING

FIELD_MANAGER = "fireflyer-operator"
PEERING_NAME = "fireflyer"
log = logging.getLogger(__name__)
# From SIGTERM to exit: kopf's own shutdown gets this long, then the process ends regardless (a
# reconcile caught mid-way is repeated by the next operator: every write is idempotent).
SHUTDOWN_GRACE_SECONDS = 7.0


class QuietEventHandlers(logging.Filter):
    """Drops kopf's line for each successful run of a watch-event handler: with thousands of
    nodes sending heartbeats, those lines were most of the log and much of its cost."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Handler 'on_") and message.endswith("_event' succeeded."))


class SignalsAreOurs(logging.Filter):
    """kopf, run off the main thread, warns that it ignores signals: run() handles them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OS signals are ignored")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own bookkeeping lives in annotations, never in status fields the CRDs do not declare.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = L.FINALIZER
    # A watch that stalls silently is re-established within minutes.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = FIELD_MANAGER
    settings.execution.max_workers = int(os.environ.get("FIREFLYER_WORKERS", "16"))
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    kube.configure_watches(settings)
    logging.getLogger("kopf.objects").addFilter(QuietEventHandlers())
    cache.start()


@kopf.on.cleanup()
async def stop_informers(**_: Any) -> None:
    STOPPING.set()
    cache.stop()


def load_controllers() -> None:
    """Import the per-kind controllers so that their kopf handlers register."""
    from fireflyer.operator import controllers  # noqa: F401


def ensure_peering(namespace: str | None) -> bool:
    """Create the kopf peering object replicas agree through (namespaced with --namespace, else
    cluster-wide) when it is missing: without it kopf waits, silently, forever. False when
    kopf's peering CRDs are not installed at all."""
    from kubernetes import client

    from fireflyer.operator.kube import api_client

    api = client.CustomObjectsApi(api_client())
    kind = "KopfPeering" if namespace else "ClusterKopfPeering"
    body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": PEERING_NAME}}
    try:
        if namespace:
            api.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", body)
        else:
            api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
        log.info("created %s %s", kind, PEERING_NAME)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        if exc.status != 409:  # 409: it exists already
            log.warning(
                "could not create %s %s (%s); kopf waits until it exists", kind, PEERING_NAME, exc.reason
            )
    return True


def run(namespace: str | None, metrics_port: int, health_port: int, standalone: bool) -> None:
    kube.set_scope(namespace)
    load_controllers()
    if not standalone and not ensure_peering(namespace):
        log.warning("kopf's peering CRDs are not installed: running standalone (one replica only)")
        standalone = True
    if metrics_port:
        start_http_server(metrics_port)
    kopf.configure(verbose=bool(os.environ.get("FIREFLYER_VERBOSE")))
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        STOPPING.set()  # queued reconciles give up at once (fireflyer.operator.locks)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kopf runs in a thread so that the stop flag, not kopf's own signal handling, ends it: the
    # main thread sets it, and bounds how long the shutdown may take.
    operator = threading.Thread(
        target=kopf.run,
        name="kopf",
        daemon=True,
        kwargs={
            "clusterwide": namespace is None,
            "namespaces": [namespace] if namespace else (),
            "standalone": standalone,
            "peering_name": None if standalone else PEERING_NAME,
            # Distinct priorities let one replica lead and the other wait (kopf peering).
            "priority": random.randint(1, 1_000_000),
            "liveness_endpoint": f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
            "stop_flag": stop,
        },
    )
    logging.getLogger("kopf._core.reactor.running").addFilter(SignalsAreOurs())
    operator.start()
    scope = f"namespace {namespace}" if namespace else "cluster-wide"
    log.info("operator started (%s); SIGTERM stops it", scope)
    while operator.is_alive() and not stop.is_set():
        operator.join(0.5)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while operator.is_alive() and time.monotonic() < deadline:
        operator.join(0.2)
    if operator.is_alive():
        log.warning("kopf did not stop within %.0f s; exiting anyway", SHUTDOWN_GRACE_SECONDS)
    STOPPING.set()
    cache.stop()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal interpreter exit: that joins every worker thread of kopf's executor, and
    # threads blocked in API calls would hold it for up to their timeout.
    os._exit(0 if stop.is_set() else 1)
