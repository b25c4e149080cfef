"""The engine behind the HTTP API: a thread runs the step loop; requests enter through `submit`
and leave as per-token events on an asyncio queue. Aborts are applied between steps, so a
sequence's blocks never change under a running step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fireflyer.workloads.serve.engine import LLMEngine, StepEvent
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

    def abort(self) -> None:
        if not self.done:
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, tokenizer: ServeTokenizer, model_name: str, metrics: EngineMetrics
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._stop = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._hits = (0, 0, 0)  # queried, hit, tier-hit tokens already reported to metrics
        metrics.set_kv_blocks(0, engine.block_manager.num_blocks)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.engine.close()

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._failed is None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Raises QueueFullError when the waiting queue is full, ValueError for a request that
        can never run (the message says why)."""
        if self._failed is not None:
            raise EngineStoppedError(f"The engine stopped after an internal error: {self._failed}")
        seq = Sequence(prompt_ids=list(prompt_ids), params=params)
        stream = RequestStream(seq, self, asyncio.get_running_loop())
        with self._lock:
            self.engine.add(seq)  # QueueFullError / ValueError propagate to the API
            self._streams[seq.request_id] = stream
        self.metrics.record_prompt_tokens(len(prompt_ids))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    # -- the loop (engine thread) ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                with self._lock:
                    for request_id in self._aborts:
                        self.engine.abort(request_id)
                    self._aborts.clear()
                    busy = self.engine.has_work
                if not busy:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                events, preempted = self.engine.step(self._lock)
                self._deliver(events)
                self._observe(preempted)
        except BaseException as error:  # the model failed: end every stream, report unhealthy
            log.exception("the engine loop failed")
            self._failed = error
            self._fail_all()

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
                del self._streams[seq.request_id]
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
        queried, hit, tier = bm.queried_tokens, bm.hit_tokens, bm.tier_hit_tokens
        if queried != self._hits[0]:
            self.metrics.record_prefix_cache(queried - self._hits[0], hit - self._hits[1])
        if tier != self._hits[2]:
            self.metrics.record_kv_tier_hit(tier - self._hits[2])
        self._hits = (queried, hit, tier)
        if preempted:
            self.metrics.record_preemptions(preempted)

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
