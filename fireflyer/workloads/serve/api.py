"""The OpenAI-compatible HTTP API of `fireflyer serve` (FastAPI).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /v1/models/{id}, GET /health, GET /metrics, and GET /v1/eplb/load (the expert load window,
docs/eplb.md's load contract). Every error is answered in OpenAI's shape
{"error": {message, type, param, code}}; see protocol.py for what is accepted.

/v1/completions takes one prompt per request: a string, a list of token ids, or a list holding
exactly one of those. A batch of several prompts is rejected with 400 (send them as concurrent
requests; the engine batches them anyway).

A request whose client goes away is aborted in the engine, streaming or not.

With API keys (`api_keys`), every route but /health, /metrics and /v1/eplb/load needs a key: the
operator's EPLB controller reads the load window, which holds token counts per expert and nothing
of any request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fireflyer.workloads.api_keys import KeyFile, RequireApiKey
from fireflyer.workloads.serve import protocol as p
from fireflyer.workloads.serve.api_errors import error_response, install_error_handlers
from fireflyer.workloads.serve.api_stream import (
    Disconnected,
    ResponseMeta,
    chat_chunks,
    completion_chunks,
    json_response,
    sse,
    until_disconnect,
)
from fireflyer.workloads.serve.handoff import (
    PREFILL_HEADER,
    PREFILL_PATH,
    KVHandoff,
    KVTarget,
    handoff_blocks,
)
from fireflyer.workloads.serve.kv_transfer import TransferTarget
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.text_output import Generation
from fireflyer.workloads.serve.tokenizer import ChatTemplateError, ServeTokenizer
from fireflyer.workloads.serve.types import (
    EngineStoppedError,
    FinishReason,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics", "/v1/eplb/load")  # probes, scrapes and the EPLB controller
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class EngineStream(Protocol):
    """One request in the engine (async_engine.RequestStream)."""

    @property
    def request_id(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None: ...


class LoadSource(Protocol):
    """The expert load window (eplb_load.LoadWindow)."""

    @property
    def window_seconds(self) -> float: ...

    def report(self, seconds: float | None = None) -> dict[str, Any]: ...


class Engine(Protocol):
    """What the API needs of the engine (async_engine.AsyncEngine)."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> ServeTokenizer: ...

    @property
    def metrics(self) -> EngineMetrics: ...

    @property
    def eplb_window(self) -> LoadSource | None: ...  # None: a model without MoE layers

    @property
    def placement_generation(self) -> int | None: ...  # the EPLB placement the unit runs

    @property
    def placement_error(self) -> str | None: ...  # why the newest placement was refused

    def gpu_tokens(self) -> list[list[int]] | None: ...  # per MoE layer and rank, since start

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        handoff: KVHandoff | None = None,
        kv_target: KVTarget | None = None,
    ) -> EngineStream: ...

    def submit_prefill(self, prompt_ids: list[int], target: KVTarget) -> EngineStream: ...

    async def fetch_kv(self, prompt_ids: list[int], prefill_url: str) -> KVHandoff | None: ...

    def is_healthy(self) -> bool: ...


def create_app(engine: Engine, lifespan: Lifespan | None = None, api_keys: KeyFile | None = None) -> FastAPI:
    """The API over `engine`; `lifespan` (optional) starts and stops what the server owns,
    such as the engine's step loop; `api_keys` (optional) the keys requests must carry."""
    app = FastAPI(title="fireflyer serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    created = p.now()
    install_error_handlers(app)
    if api_keys is not None:
        app.add_middleware(RequireApiKey, keys=api_keys, open_paths=OPEN_PATHS)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy():
            return Response(status_code=200)
        error = p.ApiError(503, "The engine is not running.", type="service_unavailable_error")
        return error_response(error)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(content=engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/eplb/load")
    async def eplb_load(request: Request) -> Response:
        window = engine.eplb_window
        if window is None:
            raise p.ApiError(
                404,
                "This model has no MoE layers: there is no expert load to report.",
                code="no_moe_layers",
            )
        seconds = _window_seconds(request.query_params.get("windowSeconds"), window.window_seconds)
        report = window.report(seconds)
        report["generation"] = engine.placement_generation
        gpu_tokens = engine.gpu_tokens()
        if gpu_tokens is not None:
            report["gpuTokens"] = gpu_tokens
        if engine.placement_error:
            report["placementError"] = engine.placement_error
        return JSONResponse(report)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[_model_card(engine, created)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> p.ModelCard:
        if model_id != engine.model_name:
            raise p.model_not_found(model_id)
        return _model_card(engine, created)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        with _unexpected_errors():
            _check_model(engine, body.model)
            p.check_completion(body)
            prompt_ids, prompt_text = _completion_prompt(engine.tokenizer, body.prompt)
            max_tokens = _max_tokens(engine, body.max_tokens, len(prompt_ids), "prompt")
            echo = ""
            if body.echo:
                echo = prompt_text if prompt_text is not None else engine.tokenizer.decode(prompt_ids)
            meta = ResponseMeta(p.new_id("cmpl"), p.now(), engine.model_name)
            handoff = await _handoff(engine, request, prompt_ids)
            generation = _start(engine, prompt_ids, body, max_tokens, handoff)  # must be closed from here
            if body.stream:
                chunks = completion_chunks(generation, meta, echo, body.include_usage)
                return sse(request, generation, chunks)
            text, finish = await _collect(request, generation, engine)
            return json_response(
                p.CompletionResponse(
                    id=meta.id,
                    created=meta.created,
                    model=meta.model,
                    choices=[p.CompletionChoice(text=echo + text, finish_reason=finish)],
                    usage=generation.usage(),
                )
            )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        with _unexpected_errors():
            _check_model(engine, body.model)
            p.check_chat(body)
            prompt_ids = _chat_prompt(engine.tokenizer, body)
            max_tokens = _max_tokens(engine, body.requested_max_tokens, len(prompt_ids), "messages")
            meta = ResponseMeta(p.new_id("chatcmpl"), p.now(), engine.model_name)
            handoff = await _handoff(engine, request, prompt_ids)
            generation = _start(engine, prompt_ids, body, max_tokens, handoff)  # must be closed from here
            if body.stream:
                return sse(request, generation, chat_chunks(generation, meta, body.include_usage))
            text, finish = await _collect(request, generation, engine)
            return json_response(
                p.ChatCompletionResponse(
                    id=meta.id,
                    created=meta.created,
                    model=meta.model,
                    choices=[p.ChatChoice(message=p.ChatResponseMessage(content=text), finish_reason=finish)],
                    usage=generation.usage(),
                )
            )

    @app.post(PREFILL_PATH, response_model=None)
    async def kv_prefill(body: p.KVPrefillRequest) -> Response:
        """A decode unit's request: compute the prompt, push its first `blocks` full KV blocks
        to `transfer` (they leave as they fill); answers once the prompt is computed."""
        with _unexpected_errors():
            try:
                target = TransferTarget.from_json(body.transfer)
            except ValueError as exc:
                raise p.invalid(f"transfer: {exc}", param="transfer") from exc
            if body.blocks > handoff_blocks(len(body.prompt_token_ids)):
                raise p.invalid(
                    "blocks: more than the prompt's full blocks before its last token", param="blocks"
                )
            _max_tokens(engine, 1, len(body.prompt_token_ids), "prompt_token_ids")
            started = time.monotonic()
            try:
                stream = engine.submit_prefill(body.prompt_token_ids, KVTarget(target, body.blocks))
            except QueueFullError as exc:
                raise p.overloaded() from exc
            except ValueError as exc:
                raise p.invalid(str(exc)) from exc
            reason = None
            async for event in stream:
                reason = event.finish_reason
            if reason == FinishReason.ABORT:
                raise p.ApiError(503, "the prefill was cancelled", type="service_unavailable_error")
            return JSONResponse({"blocks": body.blocks, "seconds": round(time.monotonic() - started, 6)})

    return app


# -- request handling --------------------------------------------------------------------------


def _model_card(engine: Engine, created: int) -> p.ModelCard:
    name = engine.model_name
    return p.ModelCard(id=name, created=created, root=name, max_model_len=engine.max_model_len)


def _window_seconds(raw: str | None, limit: float) -> float | None:
    """`?windowSeconds=N`: a number of seconds in (0, the configured window]; None when absent."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= limit):
        raise p.invalid(
            f"windowSeconds must be a number of seconds in (0, {limit:g}], not {raw!r}.",
            param="windowSeconds",
        )
    return seconds


def _check_model(engine: Engine, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise p.model_not_found(model)


def _completion_prompt(tokenizer: ServeTokenizer, prompt: p.PromptType) -> tuple[list[int], str | None]:
    """The prompt's token ids, and its text when it came as text."""
    item: Any = prompt  # a string or a list of token ids, once unwrapped
    if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
        pass
    elif len(prompt) == 1:
        item = prompt[0]
    else:
        raise p.invalid(
            f"Batched prompts are not supported: got {len(prompt)} prompts, send one prompt per request.",
            param="prompt",
        )
    if isinstance(item, str):
        if not item:
            raise p.invalid("prompt must not be empty.", param="prompt")
        return tokenizer.encode(item), item
    if not item:
        raise p.invalid("prompt must not be empty.", param="prompt")
    vocab = tokenizer.vocab_size
    bad = [t for t in item if not 0 <= t < vocab]
    if bad:
        message = f"prompt holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}."
        raise p.invalid(message, param="prompt")
    return list(item), None


def _chat_prompt(tokenizer: ServeTokenizer, body: p.ChatCompletionRequest) -> list[int]:
    variables = dict(body.chat_template_kwargs or {})
    variables.pop("messages", None)
    add_generation_prompt = bool(variables.pop("add_generation_prompt", body.add_generation_prompt))
    try:
        return tokenizer.encode_chat(
            p.message_dicts(body.messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except ChatTemplateError as exc:
        raise p.invalid(str(exc), param="messages") from exc


def _max_tokens(engine: Engine, requested: int | None, prompt_tokens: int, where: str) -> int:
    limit = engine.max_model_len
    if prompt_tokens >= limit:
        raise p.invalid(
            f"This model's maximum context length is {limit} tokens. However, your {where} resulted in "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length of "
            f"the {where}.",
            param=where,
            code="context_length_exceeded",
        )
    if requested is None:
        return limit - prompt_tokens
    if prompt_tokens + requested > limit:
        raise p.context_length_exceeded(limit, prompt_tokens, requested, where)
    return requested


def _start(
    engine: Engine,
    prompt_ids: list[int],
    body: p.CompletionRequest | p.ChatCompletionRequest,
    max_tokens: int,
    handoff: KVHandoff | None = None,
) -> Generation:
    params = p.sampling_params(body, max_tokens)
    try:
        stream = engine.submit(prompt_ids, params, handoff=handoff)
    except QueueFullError as exc:
        raise p.overloaded() from exc
    except EngineStoppedError as exc:
        raise p.ApiError(503, str(exc), type="service_unavailable_error", code="engine_stopped") from exc
    except ValueError as exc:
        raise p.invalid(str(exc)) from exc
    return Generation(
        stream,
        engine.tokenizer,
        prompt_ids,
        p.stop_strings(body),
        skip_special_tokens=body.skip_special_tokens,
    )


async def _handoff(engine: Engine, request: Request, prompt_ids: list[int]) -> KVHandoff | None:
    """The prompt's KV from the prefill unit the router named, if it named one."""
    prefill_url = request.headers.get(PREFILL_HEADER)
    if not prefill_url:
        return None
    return await engine.fetch_kv(prompt_ids, prefill_url)


@contextmanager
def _unexpected_errors() -> Iterator[None]:
    """Anything but an ApiError becomes a 500 in OpenAI's shape (logged); the server goes on."""
    try:
        yield
    except (p.ApiError, Disconnected):
        raise
    except Exception as exc:
        log.exception("request failed")
        raise p.internal_error() from exc


async def _collect(
    request: Request, generation: Generation, engine: Engine
) -> tuple[str, p.FinishReasonText]:
    parts: list[str] = []
    finish: p.FinishReasonText = None
    try:
        async for delta in until_disconnect(request, generation.deltas()):
            parts.append(delta.text)
            finish = delta.finish_reason
    except Disconnected:
        log.info("client went away: aborting %s", generation.request_id)
        raise
    finally:
        generation.close()
    if finish == "abort" and not engine.is_healthy():  # cut off by an engine failure, not by us
        raise p.ApiError(
            503,
            "The engine stopped while generating this answer.",
            type="service_unavailable_error",
            code="engine_stopped",
        )
    return "".join(parts), finish
