"""Reading the router replicas' in-flight counts for a drain (drain.py decides with them).

Each router replica counts only the requests it forwarded, so every replica is asked (by pod IP,
as the autoscaler reads their metrics): a count through the router Service would be one replica's
at random. A replica that does not answer makes the reading unknown, which the drain waits out
(up to router.drainTimeoutSeconds). `read_router_load` is replaceable, as the autoscaler's
`read_metric` is."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.inference import drain, scaler
from fireflyer.operator.inference.autoscale_metrics import router_pod_urls

log = logging.getLogger(__name__)

HEALTH_URL_ANNOTATION = "fireflyer.dev/router-health-url"
"""Annotation on an InferenceDeployment: a URL answering the router's /health contract
({"units": [{"url", "in_flight", "draining"}]}) read in place of the router replicas, e.g. an
aggregator in front of them or a router outside the pod network."""
TIMEOUT_SECONDS = 2.0

Fetch = Callable[[str], dict[str, Any] | None]
RouterLoadReader = Callable[[dict[str, Any]], drain.RouterLoad | None]


def fetch_json(url: str) -> dict[str, Any] | None:
    """The JSON body of a GET; a router with no healthy unit answers 503 with the units too."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (OSError, ValueError) as exc:
        log.debug("no answer from %s: %s", url, exc)
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class RouterHealthReader:
    def __init__(self, fetch: Fetch = fetch_json) -> None:
        self.fetch = fetch

    def __call__(self, cr: dict[str, Any]) -> drain.RouterLoad | None:
        override = (cr["metadata"].get("annotations") or {}).get(HEALTH_URL_ANNOTATION)
        name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
        urls = [override] if override else router_pod_urls(name, namespace, "/health")
        if not urls:
            return None
        with ThreadPoolExecutor(max_workers=min(len(urls), 8)) as pool:
            answers = list(pool.map(self.fetch, urls))
        return drain.merge_router_answers(answers)


read_router_load: RouterLoadReader = RouterHealthReader()
"""Replaceable (tests): where the in-flight counts of a drain come from."""


def drain_possible(cr: dict[str, Any], deleted_uids: Collection[str] = ()) -> bool:
    """Whether a unit of the deployment drains, or sits at or above its role's live count (the
    units it runs now, as the plan counts them: the scaler's replicas, or the spec's units while
    the scaler is reset to them). deleted_uids: unit StatefulSets already deleted."""
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    selector = f"{L.DEPLOYMENT}={name},{L.COMPONENT}=unit,{L.MANAGED_BY}={L.MANAGER}"
    statefulsets = [
        s
        for s in kube.list_("StatefulSet", namespace, selector)
        if s["metadata"].get("uid") not in deleted_uids
    ]
    if not statefulsets:
        return False
    try:
        spec = InferenceDeployment.model_validate(cr).spec
    except ValidationError:  # the plan reports it
        return False
    scalers = kube.list_(scaler.KIND, namespace, f"{L.DEPLOYMENT}={name}")
    live = {role: scale.units for role, scale in scaler.live_units(cr, spec, scalers).items()}
    return drain.drain_due(statefulsets, live)
