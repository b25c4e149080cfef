"""The engine behind the HTTP API: a thread runs the step loop; requests enter through `submit`
and leave as per-token events on an asyncio queue. New requests and aborts are handed to the
engine thread and applied between steps, so a sequence's blocks never change under a running step
and the event loop never waits for one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fireflyer.workloads.serve.engine import LLMEngine, StepEvent
from fireflyer.workloads.serve.eplb_load import LoadWindow
from fireflyer.workloads.serve.handoff import DecodeFetcher, KVHandoff, KVTarget
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import (
    EngineStoppedError,
    FinishReason,
    QueueFullError,
    SamplingParams,
    Sequence,
    TokenEvent,
)
from fireflyer.workloads.serve.unit.leader import UnitEngine

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestStream:
    seq: Sequence
    engine: AsyncEngine
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    last_token_time: float | None = None
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None:
        """Stop generating; `reason` is what the request is counted as (STOP for a stop string)."""
        if not self.done:
            self.engine.abort(self.request_id, reason)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine | UnitEngine,
        tokenizer: ServeTokenizer,
        model_name: str,
        metrics: EngineMetrics,
        on_failure: Callable[[], None] | None = None,
        fetcher: DecodeFetcher | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        self.on_failure = on_failure  # e.g. stop the server so that the pod restarts
        self.fetcher = fetcher  # decode role: where prefilled KV blocks come from
        # Guards the hand-over lists and the stream table only: the engine thread alone touches
        # the scheduler, so the event loop never waits for a step (or its disk I/O).
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[Sequence] = []
        self._aborts: list[str] = []
        self._abort_reasons: dict[str, FinishReason] = {}
        self._streams: dict[str, RequestStream] = {}
        self._stop = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._reported_queried = self._reported_hits = self._reported_tier_hits = 0
        metrics.set_kv_blocks(0, engine.block_manager.num_blocks)
        # The expert load window (None for a dense model): the engine thread fills it, the API
        # reads its host copies (GET /v1/eplb/load).
        self.eplb_window: LoadWindow | None = engine.eplb_load
        if self.eplb_window is not None:
            self.eplb_window.on_bucket = self._on_bucket
            metrics.set_eplb_balancedness(self.eplb_window.balancedness())
        if self.gpu_tokens() is not None:  # a unit with the experts split over its ranks
            metrics.set_gpu_tokens_source(self.gpu_tokens)
        if isinstance(engine, UnitEngine):
            metrics.set_unit_ranks(engine.world)
            engine.on_collective_error = metrics.record_collective_error

    @property
    def placement_generation(self) -> int | None:
        """The EPLB placement generation the unit runs (None: the even split, or one rank)."""
        return self.engine.placement_generation if isinstance(self.engine, UnitEngine) else None

    def gpu_tokens(self) -> list[list[int]] | None:
        """Units with the experts split: [MoE layer][rank] (token, expert) pairs computed since start."""
        return self.engine.gpu_tokens() if isinstance(self.engine, UnitEngine) else None

    @property
    def placement_error(self) -> str | None:
        return self.engine.placement_error if isinstance(self.engine, UnitEngine) else None

    def _on_bucket(self, window: LoadWindow) -> None:
        """A load-window bucket closed (engine thread): the balancedness gauges follow."""
        self.metrics.set_eplb_balancedness(window.balancedness())
        self.metrics.record_gpu_tokens(self.gpu_tokens())

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._fail_all()  # streams still open end now rather than never
        if not self._thread.is_alive():  # a step still running may be using the store
            self.engine.close()

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._failed is None

    async def fetch_kv(self, prompt_ids: list[int], prefill_url: str) -> KVHandoff | None:
        """Decode role: the prompt's KV blocks from the prefill unit at `prefill_url` (None when
        this engine takes no hand-offs, or nothing arrived: the request is then computed here)."""
        if self.fetcher is None:
            return None
        result = await self.fetcher.fetch(prompt_ids, prefill_url)
        self.metrics.record_kv_handoff(result.blocks, result.wanted, result.seconds, result.failure)
        return result.handoff

    def submit_prefill(self, prompt_ids: list[int], target: KVTarget) -> RequestStream:
        """Prefill role: compute `prompt_ids` and send its first `target.num_blocks` full KV
        blocks to `target` as they fill; the stream ends when the prompt is computed."""
        return self.submit(
            prompt_ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), kv_target=target
        )

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        handoff: KVHandoff | None = None,
        kv_target: KVTarget | None = None,
    ) -> RequestStream:
        """Raises QueueFullError when the waiting queue is full, ValueError for a request that
        can never run (the message says why), EngineStoppedError once the engine has stopped."""
        seq = Sequence(prompt_ids=list(prompt_ids), params=params)
        seq.handoff, seq.kv_target = handoff, kv_target
        self.engine.validate(seq)
        stream = RequestStream(seq, self, asyncio.get_running_loop())
        with self._lock:
            if self._failed is not None or self._stop:
                reason = f"after an internal error: {self._failed}" if self._failed else "for shutdown"
                raise EngineStoppedError(f"The engine stopped {reason}")
            waiting = self.engine.scheduler.num_waiting + len(self._adds)
            if waiting >= self.engine.config.max_waiting:
                raise QueueFullError(
                    f"{waiting} requests are waiting (max_waiting {self.engine.config.max_waiting})"
                )
            self._adds.append(seq)
            self._streams[seq.request_id] = stream
        self.metrics.record_prompt_tokens(len(prompt_ids))
        self._wake.set()
        return stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._abort_reasons[request_id] = reason
        self._wake.set()

    # -- the loop (engine thread) ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._take_requests()
                if not self.engine.has_work:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    self.engine.idle()
                    continue
                started = time.perf_counter()
                events, preempted = self.engine.step()
                self.metrics.record_step(time.perf_counter() - started)
                self._deliver(events)
                self._observe(preempted)
        except BaseException as error:  # the model failed: end every stream, report unhealthy
            log.exception("the engine loop failed")
            self._failed = error
            if self.on_failure is not None:
                self.on_failure()
            self._fail_all()

    def _take_requests(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for seq in adds:
            try:
                self.engine.add(seq)
            except (QueueFullError, ValueError) as error:  # raced past submit's checks
                log.warning("request %s not admitted: %s", seq.request_id, error)
                self._end(seq.request_id, seq)
        for request_id in aborts:
            if not self.engine.abort(request_id):
                pending = next((s for s in adds if s.request_id == request_id), None)
                if pending is not None:
                    self._end(request_id, pending)

    def _end(self, request_id: str, seq: Sequence) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            self._abort_reasons.pop(request_id, None)
        if stream is not None:
            stream.done = True
            self._emit(stream, TokenEvent(None, FinishReason.ABORT, seq.num_prompt_tokens, 0))

    def _deliver(self, events: list[StepEvent]) -> None:
        now = time.monotonic()
        generated = 0
        for event in events:
            stream = self._streams.get(event.seq.request_id)
            if stream is None:
                continue
            seq = event.seq
            if event.token is not None:
                generated += 1
                if stream.last_token_time is None:
                    self.metrics.record_first_token(now - seq.arrival_time)
                else:
                    self.metrics.record_inter_token(now - stream.last_token_time)
                stream.last_token_time = now
            reason = seq.finish_reason if event.finished else None
            self._emit(stream, TokenEvent(event.token, reason, seq.num_prompt_tokens, seq.num_cached_tokens))
            if event.finished:
                stream.done = True
                with self._lock:
                    self._streams.pop(seq.request_id, None)
                    counted = self._abort_reasons.pop(seq.request_id, None)
                if reason == FinishReason.ABORT and counted is not None:
                    reason = counted
                self.metrics.record_request_finished(reason or FinishReason.ABORT, now - seq.arrival_time)
        if generated:
            self.metrics.record_generated_tokens(generated)

    def _emit(self, stream: RequestStream, event: TokenEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is closed (shutdown)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)

    def _observe(self, preempted: int) -> None:
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        self.metrics.set_scheduler_state(scheduler.num_running, scheduler.num_waiting)
        self.metrics.set_kv_blocks(bm.num_used_blocks, bm.num_blocks)
        if bm.queried_tokens != self._reported_queried:
            self.metrics.record_prefix_cache(
                bm.queried_tokens - self._reported_queried, bm.hit_tokens - self._reported_hits
            )
        if bm.tier_hit_tokens != self._reported_tier_hits:
            self.metrics.record_kv_tier_hit(bm.tier_hit_tokens - self._reported_tier_hits)
        self._reported_queried, self._reported_hits = bm.queried_tokens, bm.hit_tokens
        self._reported_tier_hits = bm.tier_hit_tokens
        if preempted:
            self.metrics.record_preemptions(preempted)
        if isinstance(self.engine, UnitEngine):
            self.metrics.record_rank_steps(self.engine.step_seconds())
            for rank, count in enumerate(self.engine.take_assigned()):
                if count:
                    self.metrics.record_rank_requests(rank, count)

    def _fail_all(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            seq = stream.seq
            self._emit(
                stream, TokenEvent(None, FinishReason.ABORT, seq.num_prompt_tokens, seq.num_cached_tokens)
            )


__all__ = ["AsyncEngine", "QueueFullError", "RequestStream"]
