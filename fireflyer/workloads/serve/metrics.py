"""Prometheus metrics of `fireflyer serve`, served at `GET /metrics`.

Every name starts with `fireflyer_serve_`:

histograms
  time_to_first_token_seconds     arrival of a request → its first generated token
  inter_token_latency_seconds     one generated token → the next, per request
  e2e_request_latency_seconds     arrival → finish
gauges
  requests_running                sequences in the running batch
  requests_waiting                sequences queued (waiting or preempted)
  kv_blocks_used, kv_blocks_total paged KV cache blocks (GPU tier)
  prefix_cache_hit_ratio          cumulative hit tokens / queried tokens since start
  generation_tokens_per_second    generated tokens over the last `rate_window_s` seconds
  eplb_balancedness               MoE models only: mean over MoE layers of mean / max tokens per
                                  logical expert in the EPLB load window, set as each 10-s bucket
                                  closes (per expert, not per GPU: a one-rank unit hosts them all;
                                  1.0 is perfect, idle layers count 1). No per-expert series: the
                                  table itself is GET /v1/eplb/load
counters
  prompt_tokens_total             prompt tokens admitted
  generation_tokens_total         tokens generated
  prefix_cache_queried_tokens_total, prefix_cache_hit_tokens_total
  kv_tier_hit_tokens_total        prompt tokens whose KV was loaded from the KV block store tier
  requests_total{finish_reason}   finished requests by reason (stop, length, abort)
  preemptions_total               sequences preempted for lack of KV blocks
  kv_handoff_blocks_total         decode role: KV blocks received from prefill units
  kv_handoff_fallbacks_total      decode role: hand-offs that fell short (the rest computed here)
  kv_handoff_seconds (histogram)  decode role: asking a prefill unit → its blocks received
  rank_requests_total{rank}       units of several ranks: requests the leader gave each
                                  data-parallel rank (by least KV load)
  step_seconds (histogram)        wall time of one engine step: on a unit's leader, every rank
                                  stepping together (the slowest rank sets it)
units of several ranks (the leader exports them for the unit)
  rank_step_seconds{rank} (hist.) each rank's own model step, from the step reports it sends the
                                  leader anyway (rank_steps.py: binned with numpy per step)
  collective_errors_total{backend} steps that failed in a collective: the control group (gloo),
                                  or rank 0's dispatch/combine (nccl, nvshmem; other: another
                                  torch.distributed error); the unit then stops and restarts
units with the experts split over their ranks (the leader exports them, read from the ranks'
last reports when scraped: nothing is added to a step)
  ep_rank_tokens_total{rank}      (token, expert) pairs each rank's experts computed since start,
                                  all MoE layers together: the load each GPU actually carried
  ep_tokens_total{moe_layer,rank} the same per MoE layer, with `ep_layers` (`--ep-metrics`) only:
                                  MoE layers × ranks series (58 × 144 for a DeepSeek-V3 decode
                                  unit), which take ~0.1 s to render on the API's event loop
  eplb_gpu_balancedness           mean over MoE layers of mean / max of those pairs per rank over
                                  the last closed load-window bucket (10 s): the live per-GPU
                                  balance the placement produces (kept while no tokens flow)

The engine loop calls the `record_*` / `set_*` methods; `render()` is the exposition.
Each instance owns its registry, so several engines (or tests) never collide.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from fireflyer.eplb.metrics import table_balancedness
from fireflyer.workloads.serve.rank_steps import RankStepHistogram
from fireflyer.workloads.serve.types import FinishReason
from fireflyer.workloads.serve.unit.failures import BACKENDS

PREFIX = "fireflyer_serve_"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240, 480, 960, 1920)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)

GpuTokens = list[list[int]]  # [MoE layer][rank]


def gpu_balancedness(tokens: Sequence[Sequence[float]]) -> float | None:
    """Mean over MoE layers of mean / max tokens per rank (1.0 is perfect; a layer without tokens
    counts 1); None when no layer has any token."""
    if not any(value > 0 for row in tokens for value in row):
        return None
    return table_balancedness(tokens)


def tokens_since(before: GpuTokens | None, now: GpuTokens) -> GpuTokens:
    """Per (layer, rank), what `now` counted since `before` (a counter that went back restarted:
    all of it is new)."""
    if before is None or len(before) != len(now):
        return [list(row) for row in now]
    return [
        [n - b if n >= b else n for n, b in zip(row, prev, strict=False)]
        for row, prev in zip(now, before, strict=True)
    ]


class _EpTokens(Collector):
    """Tokens per rank (and per MoE layer and rank), read from the unit's last rank reports when
    scraped."""

    def __init__(self, source: Callable[[], GpuTokens | None], layers: bool) -> None:
        self._source = source
        self._layers = layers

    def collect(self) -> Iterator[Metric]:
        rows = self._source() or []
        ranks = CounterMetricFamily(
            PREFIX + "ep_rank_tokens",
            "(token, expert) pairs each rank's experts computed since start, all MoE layers",
            labels=["rank"],
        )
        for rank, column in enumerate(zip(*rows, strict=True)):
            ranks.add_metric([str(rank)], sum(column))
        yield ranks
        if not self._layers:
            return
        layers = CounterMetricFamily(
            PREFIX + "ep_tokens",
            "(token, expert) pairs each rank's experts computed, per MoE layer, since start",
            labels=["moe_layer", "rank"],
        )
        for layer, row in enumerate(rows):
            for rank, count in enumerate(row):
                layers.add_metric([str(layer), str(rank)], count)
        yield layers

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class EngineMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        rate_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        ep_layers: bool = False,
    ) -> None:
        self._ep_layers = ep_layers  # export tokens per (MoE layer, rank), not only per rank
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._clock = clock
        self._rate_window_s = rate_window_s
        self._started = clock()
        self._lock = threading.Lock()  # the engine thread writes while the HTTP thread scrapes
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._queried = 0
        self._hit = 0

        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token", registry=r, buckets=_TTFT_BUCKETS
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            registry=r,
            buckets=_ITL_BUCKETS,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to finish of a request",
            registry=r,
            buckets=_E2E_BUCKETS,
        )
        self.requests_running = Gauge(
            PREFIX + "requests_running", "Requests in the running batch", registry=r
        )
        self.requests_waiting = Gauge(PREFIX + "requests_waiting", "Requests waiting to run", registry=r)
        self.kv_blocks_used = Gauge(PREFIX + "kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge(PREFIX + "kv_blocks_total", "KV cache blocks in all", registry=r)
        self.prefix_cache_hit_ratio = Gauge(
            PREFIX + "prefix_cache_hit_ratio",
            "Prefix cache hit tokens / queried tokens since start",
            registry=r,
        )
        self.generation_tokens_per_second = Gauge(
            PREFIX + "generation_tokens_per_second",
            f"Generated tokens per second over the last {rate_window_s:g} s",
            registry=r,
        )
        # Computed when scraped, so the rate decays to 0 while the engine is idle.
        self.generation_tokens_per_second.set_function(self.generation_rate)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.prefix_cache_queried_tokens = Counter(
            PREFIX + "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            PREFIX + "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", registry=r
        )
        self.kv_tier_hit_tokens = Counter(
            PREFIX + "kv_tier_hit_tokens",
            "Prompt tokens whose KV was loaded from the KV store tier",
            registry=r,
        )
        self.requests = Counter(
            PREFIX + "requests", "Finished requests by finish reason", ["finish_reason"], registry=r
        )
        for reason in FinishReason:
            self.requests.labels(reason.value)  # present at 0 before the first finish
        self.preemptions = Counter(PREFIX + "preemptions", "Sequences preempted", registry=r)
        self.eplb_balancedness: Gauge | None = None  # registered by the first set_eplb_balancedness
        self.kv_handoff_blocks = Counter(
            PREFIX + "kv_handoff_blocks", "KV blocks received from prefill units", registry=r
        )
        self.kv_handoff_fallbacks = Counter(
            PREFIX + "kv_handoff_fallbacks",
            "KV hand-offs that fell short, the rest of the prompt computed here",
            registry=r,
        )
        self.kv_handoff_seconds = Histogram(
            PREFIX + "kv_handoff_seconds", "Asking a prefill unit until its KV blocks arrived", registry=r
        )
        self.rank_requests = Counter(
            PREFIX + "rank_requests",
            "Requests given to each data-parallel rank of the unit",
            ["rank"],
            registry=r,
        )
        self.step_seconds = Histogram(
            PREFIX + "step_seconds", "Wall time of one engine step", registry=r, buckets=_STEP_BUCKETS
        )
        self.eplb_gpu_balancedness: Gauge | None = None  # registered by set_gpu_tokens_source
        self._gpu_tokens_before: GpuTokens | None = None
        self.rank_step_seconds: RankStepHistogram | None = None  # registered by set_unit_ranks
        self.collective_errors: Counter | None = None

    # -- called by the engine loop -------------------------------------------------------------

    def set_scheduler_state(self, running: int, waiting: int) -> None:
        """Once per step: the sizes of the running batch and the waiting queue."""
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_kv_blocks(self, used: int, total: int) -> None:
        """Once per step: KV cache blocks in use and in all."""
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(total)

    def record_kv_handoff(self, blocks: int, wanted: int, seconds: float, failure: str | None) -> None:
        """One hand-off: `blocks` of `wanted` arrived in `seconds`; `failure` says why not all."""
        self.kv_handoff_blocks.inc(blocks)
        if wanted:
            self.kv_handoff_seconds.observe(seconds)
        if failure is not None:
            self.kv_handoff_fallbacks.inc()

    def record_rank_requests(self, rank: int, n: int) -> None:
        """Requests the unit's leader gave data-parallel rank `rank` since the last call."""
        self.rank_requests.labels(str(rank)).inc(n)

    def record_step(self, seconds: float) -> None:
        """One step of the engine (of every rank of the unit, on its leader)."""
        self.step_seconds.observe(seconds)

    def set_unit_ranks(self, ranks: int) -> None:
        """A unit of several ranks: register the per-rank step histogram and the collective error
        counter (every backend present at 0)."""
        with self._lock:
            if self.rank_step_seconds is not None:
                return
            self.rank_step_seconds = RankStepHistogram(PREFIX + "rank_step_seconds", ranks)
            self.registry.register(self.rank_step_seconds)
            self.collective_errors = Counter(
                PREFIX + "collective_errors",
                "Unit steps that failed in a collective, by transport",
                ["backend"],
                registry=self.registry,
            )
            for backend in BACKENDS:
                self.collective_errors.labels(backend)

    def record_rank_steps(self, seconds: Sequence[float | None]) -> None:
        """One unit step: each rank's step time (None for a rank that did not step)."""
        if self.rank_step_seconds is not None:
            self.rank_step_seconds.observe(seconds)

    def record_collective_error(self, backend: str) -> None:
        """A unit step failed in a collective of `backend` (nccl, gloo, nvshmem, other)."""
        if self.collective_errors is not None:
            self.collective_errors.labels(backend).inc()

    def set_gpu_tokens_source(self, source: Callable[[], GpuTokens | None]) -> None:
        """A unit with the experts split: export `source()` ([MoE layer][rank] pairs since start)
        when scraped, and the per-GPU balancedness gauge that `record_gpu_tokens` sets."""
        with self._lock:
            if self.eplb_gpu_balancedness is not None:
                return
            self.registry.register(_EpTokens(source, self._ep_layers))
            self.eplb_gpu_balancedness = Gauge(
                PREFIX + "eplb_gpu_balancedness",
                "Mean over MoE layers of mean / max tokens per rank over the last load-window bucket",
                registry=self.registry,
            )

    def record_gpu_tokens(self, tokens: GpuTokens | None) -> None:
        """As a load-window bucket closes: the per-GPU balancedness of the pairs counted since the
        previous call (the gauge keeps its value when none were)."""
        if tokens is None or self.eplb_gpu_balancedness is None:
            return
        delta = tokens_since(self._gpu_tokens_before, tokens)
        self._gpu_tokens_before = [list(row) for row in tokens]
        value = gpu_balancedness(delta)
        if value is not None:
            self.eplb_gpu_balancedness.set(value)

    def record_prompt_tokens(self, n: int) -> None:
        """A request's prompt admitted (count every prompt token once, cached ones included)."""
        self.prompt_tokens.inc(n)

    def record_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        """One prefix cache lookup at admission: tokens looked up and tokens found."""
        self.prefix_cache_queried_tokens.inc(queried_tokens)
        self.prefix_cache_hit_tokens.inc(hit_tokens)
        with self._lock:
            self._queried += queried_tokens
            self._hit += hit_tokens
            ratio = self._hit / self._queried if self._queried else 0.0
        self.prefix_cache_hit_ratio.set(ratio)

    def record_kv_tier_hit(self, tokens: int) -> None:
        """Prompt tokens whose KV came from the KV block store tier instead of being computed."""
        self.kv_tier_hit_tokens.inc(tokens)

    def record_generated_tokens(self, n: int) -> None:
        """Once per step: the tokens that step generated (all sequences together)."""
        if n <= 0:
            return
        self.generation_tokens.inc(n)
        now = self._clock()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def record_first_token(self, seconds: float) -> None:
        """A request's first token: seconds since its arrival."""
        self.time_to_first_token.observe(seconds)

    def record_inter_token(self, seconds: float) -> None:
        """A request's later token: seconds since its previous token."""
        self.inter_token_latency.observe(seconds)

    def record_request_finished(self, finish_reason: FinishReason | str, e2e_seconds: float) -> None:
        """A request left the engine (finished or aborted): why, and seconds since its arrival."""
        reason = finish_reason.value if isinstance(finish_reason, FinishReason) else finish_reason
        self.requests.labels(reason).inc()
        self.e2e_request_latency.observe(e2e_seconds)

    def record_preemptions(self, n: int = 1) -> None:
        self.preemptions.inc(n)

    def set_eplb_balancedness(self, value: float) -> None:
        """The expert load window's balancedness (MoE models; a dense model never has the gauge)."""
        with self._lock:
            if self.eplb_balancedness is None:
                self.eplb_balancedness = Gauge(
                    PREFIX + "eplb_balancedness",
                    "Mean over MoE layers of mean / max tokens per logical expert in the EPLB load window",
                    registry=self.registry,
                )
            gauge = self.eplb_balancedness
        gauge.set(value)

    # -- read side --------------------------------------------------------------------------------

    def generation_rate(self) -> float:
        """Generated tokens per second over the recent window (shorter right after start)."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            tokens = sum(n for _, n in self._recent)
        span = min(self._rate_window_s, now - self._started)
        return tokens / span if span > 0 else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric above."""
        return generate_latest(self.registry)

    def _trim(self, now: float) -> None:
        horizon = now - self._rate_window_s
        while self._recent and self._recent[0][0] <= horizon:
            self._recent.popleft()
