"""Prometheus metrics of `fireflyer router`, served at `GET /metrics`.

Every name starts with `fireflyer_router_`:

counters
  requests_total{backend,outcome}   forwarded attempts by unit and outcome: ok (2xx), client_error
                                    (4xx passed on), server_error (5xx), unreachable (no answer),
                                    stream_error (broken after streaming began), cancelled (the
                                    client left); a retried request counts once per unit tried.
                                    backend="" outcome="no_backend": nothing healthy to send it to
  pairs_total{prefill,decode,outcome}
                                    the attempts among those that went to a decode unit naming a
                                    prefill unit (x-fireflyer-prefill), by pair and the same outcome
  unpaired_total{reason}            attempts sent to a unit to compute whole: no_prefill_unit (none
                                    healthy, or a one-role deployment), revision_mismatch (none of
                                    the decode unit's revision), no_decode_unit (a prefill unit
                                    computes it)
  retries_total{reason}             requests sent again to another unit (unreachable, server_error)
gauges
  in_flight_requests{backend}       requests this router has open on the unit; on a prefill unit,
                                    those named to it whose answer has not begun (it is prefilling)
  backend_healthy{backend,role}     1 while the unit passes its health checks
histograms
  time_to_first_byte_seconds        arrival → first byte to the client (a whole JSON answer, or the
                                    first SSE event): the units' queueing and prefill, retries included
  request_duration_seconds          arrival → last byte to the client

Each instance owns its registry, so several routers (or tests) in one process never collide.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

PREFIX = "fireflyer_router_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            PREFIX + "requests", "Forwarded attempts by unit and outcome", ["backend", "outcome"], registry=r
        )
        self.pairs = Counter(
            PREFIX + "pairs",
            "Attempts sent to a decode unit that fetches the KV from a prefill unit",
            ["prefill", "decode", "outcome"],
            registry=r,
        )
        self.unpaired = Counter(
            PREFIX + "unpaired", "Attempts sent to a unit to compute whole, by why", ["reason"], registry=r
        )
        self.retries = Counter(
            PREFIX + "retries", "Requests sent again to another unit", ["reason"], registry=r
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight_requests", "Requests open on the unit", ["backend"], registry=r
        )
        self.healthy = Gauge(
            PREFIX + "backend_healthy",
            "1 while the unit passes health checks",
            ["backend", "role"],
            registry=r,
        )
        self.first_byte = Histogram(
            PREFIX + "time_to_first_byte_seconds",
            "Arrival to the first byte sent to the client",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Arrival to the last byte sent to the client",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )

    def forget(self, url: str, role: str) -> None:
        """Drop a unit that left the backend set, so its series stop being exported."""
        for gauge, labels in ((self.in_flight, (url,)), (self.healthy, (url, role))):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
