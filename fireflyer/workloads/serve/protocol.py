"""The OpenAI-compatible wire format: request and response models, errors in OpenAI's shape,
and the checks that turn a request's sampling fields into `SamplingParams`.

Besides OpenAI's fields, requests accept the vLLM extensions users rely on: `top_k`,
`stop_token_ids`, `ignore_eos`, `skip_special_tokens`, and for chat `add_generation_prompt` and
`chat_template_kwargs`. Fields we cannot honour (logprobs, n > 1, penalties, tools, ...) are
rejected with 400 instead of being silently ignored; unknown fields are ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fireflyer.workloads.serve.types import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit

# -- errors ------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """An error the API answers in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(
        400, f"{what} is not supported by this server.", param=param, code="unsupported_parameter"
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded() -> ApiError:
    return ApiError(
        503,
        "The server is overloaded: its request queue is full. Please retry later.",
        type="service_unavailable_error",
        code="server_overloaded",
    )


def internal_error() -> ApiError:
    return ApiError(
        500, "The server had an internal error while processing the request.", type="server_error"
    )


def context_length_exceeded(max_model_len: int, prompt_tokens: int, max_tokens: int, where: str) -> ApiError:
    return invalid(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the "
        f"completion). Please reduce the length of the {where} or completion.",
        param=where,
        code="context_length_exceeded",
    )


# -- requests ----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    skip_special_tokens: bool = True  # vLLM extension
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


PromptType = str | list[int] | list[str] | list[list[int]]


class KVPrefillRequest(_Request):
    """From a decode unit to a prefill unit (POST /v1/kv/prefill): compute the prompt and send
    its first `blocks` full KV blocks to `transfer` ({"host", "port", "transfer_id"})."""

    prompt_token_ids: list[int] = Field(min_length=1)
    transfer: dict[str, Any]
    blocks: int = Field(ge=0)


class CompletionRequest(_SamplingRequest):
    prompt: PromptType
    max_tokens: int | None = 16  # OpenAI's default; null = up to the context length
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, ... reach the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


# -- request checks ----------------------------------------------------------------------------


def _check_common(req: _SamplingRequest) -> None:
    if req.n is not None and req.n != 1:
        raise invalid("Only n=1 is supported: send one request per completion.", param="n")
    if req.temperature is not None and (math.isnan(req.temperature) or req.temperature < 0):
        raise invalid(f"temperature must be >= 0 (0 = greedy), got {req.temperature}.", param="temperature")
    if req.top_p is not None and not (0 < req.top_p <= 1):
        raise invalid(f"top_p must be in (0, 1], got {req.top_p}.", param="top_p")
    if req.top_k is not None and req.top_k < -1:
        raise invalid(f"top_k must be -1 or 0 (off) or a positive number, got {req.top_k}.", param="top_k")
    if req.seed is not None and not -(2**63) <= req.seed < 2**64:
        raise invalid("seed must fit in 64 bits.", param="seed")
    if req.stop_token_ids is not None and any(t < 0 for t in req.stop_token_ids):
        raise invalid("stop_token_ids must be non-negative token ids.", param="stop_token_ids")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise unsupported(name, name)
    if req.repetition_penalty is not None and req.repetition_penalty != 1:
        raise unsupported("repetition_penalty", "repetition_penalty")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit_bias")


def _check_max_tokens(value: int | None, param: str) -> None:
    if value is not None and value < 1:
        raise invalid(f"{param} must be at least 1, got {value}.", param=param)


def check_completion(req: CompletionRequest) -> None:
    _check_common(req)
    _check_max_tokens(req.max_tokens, "max_tokens")
    if req.logprobs is not None:
        raise unsupported("logprobs", "logprobs")
    if req.best_of is not None and req.best_of != 1:
        raise unsupported("best_of", "best_of > 1")
    if req.suffix:
        raise unsupported("suffix", "suffix")


def check_chat(req: ChatCompletionRequest) -> None:
    _check_common(req)
    _check_max_tokens(req.max_tokens, "max_tokens")
    _check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    if req.logprobs or req.top_logprobs is not None:
        raise unsupported("logprobs", "logprobs")
    if req.tools:
        raise unsupported("tools", "tools (function calling)")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "response_format other than text")


def stop_strings(req: _SamplingRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return [s for s in stops if s]  # an empty stop string would stop before any text


def sampling_params(req: _SamplingRequest, max_tokens: int) -> SamplingParams:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=top_k,
        seed=req.seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
    )


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: content as one string (text parts joined)."""
    result = []
    for i, message in enumerate(messages):
        data = message.model_dump(exclude_none=True)
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise unsupported(f"messages[{i}].content", f"content part of type {part.get('type')!r}")
                texts.append(part["text"])
            data["content"] = "\n".join(texts)
        elif content is None:
            data["content"] = ""
        result.append(data)
    return result


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


FinishReasonText = Literal["stop", "length", "abort"] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReasonText


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReasonText


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonText = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fireflyer"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
