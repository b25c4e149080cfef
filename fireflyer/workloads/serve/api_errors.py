"""OpenAI-shaped errors for the API (`api`): {"error": {message, type, param, code}} for every
failure, request validation included."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fireflyer.workloads.serve import protocol as p
from fireflyer.workloads.serve.api_stream import Disconnected

log = logging.getLogger(__name__)

# Field types whose validation errors are clearer described than listed member by member.
FIELD_SHAPES = {
    "prompt": "a string, a list of token ids, or a list holding one of those",
    "stop": "a string or a list of strings",
    "messages": "a non-empty list of {role, content} objects",
}
UNION_FIELDS = {"prompt", "stop"}


def error_response(error: p.ApiError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.body().model_dump())


def from_validation(exc: RequestValidationError) -> p.ApiError:
    """The first validation error of a request body, in OpenAI's words."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return p.invalid(f"The request body is not valid JSON ({detail}).".replace(" ()", ""))
    if not loc or not isinstance(loc[0], str):
        return p.invalid("The request body must be a JSON object.")
    field = loc[0]
    where = ".".join(str(x) for x in loc)
    # Union-typed fields report one error per member; their shape says it better.
    if field in FIELD_SHAPES and (len(loc) == 1 or field in UNION_FIELDS):
        if kind == "missing":
            return p.invalid(f"`{field}` is required.", param=field)
        return p.invalid(f"`{field}` must be {FIELD_SHAPES[field]}.", param=field)
    if kind == "missing":
        return p.invalid(f"`{where}` is required.", param=field)
    return p.invalid(f"Invalid value for `{where}`: {first.get('msg', 'invalid')}.", param=field)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, p.ApiError)
        return error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(p.ApiError(exc.status_code, message, type=kind))

    async def disconnected(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client is gone

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(p.internal_error())

    app.add_exception_handler(p.ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Disconnected, disconnected)
    app.add_exception_handler(Exception, unexpected)
