"""The autoscaler's metric values, read from the Prometheus endpoints the workloads serve.

queueTime comes from the router replicas (`fireflyer_router_time_to_first_byte_seconds`: the
units' queueing and prefill as clients see it), as the mean over the requests that finished
since the previous reading; kvBlockUsage and tokensPerSecondPerUnit come from the role's unit
leaders (`fireflyer_serve_kv_blocks_used / _total`, `fireflyer_serve_generation_tokens_per_second`),
averaged over the units that answer. The arithmetic is pure; `Collector` does the HTTP, through
a fetch function tests replace."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.inference import children
from fireflyer.operator.inference.engines import SERVE_PORT

log = logging.getLogger(__name__)

TTFB = "fireflyer_router_time_to_first_byte_seconds"
KV_USED = "fireflyer_serve_kv_blocks_used"
KV_TOTAL = "fireflyer_serve_kv_blocks_total"
TOKENS_PER_SECOND = "fireflyer_serve_generation_tokens_per_second"

Fetch = Callable[[str], str | None]


def samples(text: str) -> dict[str, float]:
    """Sample name → value, summed over label sets (one unit's or router's exposition)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def unit_value(metric: str, exposition: dict[str, float]) -> float | None:
    if metric == "kvBlockUsage":
        total = exposition.get(KV_TOTAL)
        used = exposition.get(KV_USED)
        return used / total if used is not None and total else None
    if metric == "tokensPerSecondPerUnit":
        return exposition.get(TOKENS_PER_SECOND)
    raise ValueError(f"{metric} is not read from units")


def mean_over_units(metric: str, expositions: list[dict[str, float]]) -> float | None:
    values = [v for e in expositions if (v := unit_value(metric, e)) is not None]
    return sum(values) / len(values) if values else None


def queue_time(
    previous: dict[str, tuple[float, float]], current: dict[str, tuple[float, float]]
) -> float | None:
    """Mean time to first byte over the requests finished between two readings, from each
    router's (sum, count); a router seen once (new, or restarted: its counters fell) tells
    nothing yet. No request at all reads as no queue (0)."""
    total = count = 0.0
    compared = False
    for router, (now_sum, now_count) in current.items():
        before = previous.get(router)
        if before is None or now_count < before[1]:
            continue
        compared = True
        total += now_sum - before[0]
        count += now_count - before[1]
    if not compared:
        return None
    return total / count if count else 0.0


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            text: str = resp.read().decode()
            return text
    except (OSError, ValueError) as exc:
        log.debug("no metrics from %s: %s", url, exc)
        return None


def router_pod_urls(name: str, namespace: str, path: str) -> list[str]:
    """`path` on every router replica that may be running, by pod IP: each counts only what it
    forwarded, so one reached through the Service would be a replica at random."""
    pods = kube.list_("Pod", namespace, f"{L.DEPLOYMENT}={name},{L.COMPONENT}=router")
    ips = sorted(
        ip
        for p in pods
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and (ip := (p.get("status") or {}).get("podIP"))
    )
    return [f"http://{ip}:{children.ROUTER_PORT}{path}" for ip in ips]


class Collector:
    """One reading per call; keeps the routers' previous histogram totals between calls."""

    def __init__(self, fetch: Fetch = http_get) -> None:
        self.fetch = fetch
        self._ttfb: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}

    def __call__(self, cr: dict[str, Any], role: str, metric: str, units: int) -> float | None:
        name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
        if metric == "queueTime":
            current = {}
            for url in router_pod_urls(name, namespace, "/metrics"):
                text = self.fetch(url)
                if text is not None:
                    values = samples(text)
                    current[url] = (values.get(TTFB + "_sum", 0.0), values.get(TTFB + "_count", 0.0))
            value = queue_time(self._ttfb.get((namespace, name), {}), current)
            self._ttfb[(namespace, name)] = current
            return value
        texts = [self.fetch(url) for url in self._unit_urls(name, namespace, role, units)]
        return mean_over_units(metric, [samples(t) for t in texts if t is not None])

    def forget(self, namespace: str, name: str) -> None:
        self._ttfb.pop((namespace, name), None)

    @staticmethod
    def _unit_urls(name: str, namespace: str, role: str, units: int) -> list[str]:
        urls = []
        for index in range(units):
            leader = kube.get("Pod", f"{children.unit_name(name, role, index)}-0", namespace)
            host = ((leader or {}).get("status") or {}).get("podIP") or children.leader_host(
                name, role, index, namespace
            )
            urls.append(f"http://{host}:{SERVE_PORT}/metrics")
        return urls
