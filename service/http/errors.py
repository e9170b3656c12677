"""Error answers: `{"detail": ...}` on the native API, OpenAI's shape on /v1; what an error may
echo of its input; and the app's exception handlers (`register_handlers`), which read the
settings and metrics from `app.state`."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.http.auth import Unauthorized

# OpenAI's error `type` by status (anything else: invalid_request_error)
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error", 504: "timeout"}  # fmt: skip
# the openai client retries 5xx twice by default: a failed step or a passed deadline would
# run again, so those say not to (a 503 is worth retrying, after its Retry-After)
NO_RETRY = {500, 504}
ROUTES = {"/generate": "generate", "/generate/stream": "stream",
          "/v1/images/generations": "openai"}  # fmt: skip  # path -> the metrics' route label


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:  # fmt: skip
    """An error in OpenAI's shape (the openai client reads `error.message` into its exception)."""
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param, "code": code}  # fmt: skip
    headers = dict(headers or {})
    if status in NO_RETRY:
        headers["x-should-retry"] = "false"
    return JSONResponse({"error": body}, status, headers=headers)


def error_answer(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error body a route's clients expect: OpenAI's on /v1, `{"detail"}` elsewhere."""
    if path.startswith("/v1/"):
        return openai_error(status, message, headers=headers)
    return JSONResponse({"detail": message}, status, headers=headers)


ECHO_CHARS, ECHO_ITEMS = 64, 8  # what a 422 echoes of an input at most


def json_safe(value: Any, depth: int = 0) -> Any:
    """Errors echo the input, briefly: non-finite floats and other non-JSON values become
    strings; long strings and large or deep containers are cut (never echo a big input)."""
    if isinstance(value, dict):
        if depth > 3:
            return f"<object of {len(value)} keys>"
        items = list(value.items())
        out = {str(k)[:ECHO_CHARS]: json_safe(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
        if len(items) > ECHO_ITEMS:
            out["..."] = f"{len(items) - ECHO_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple):
        if depth > 3:
            return f"<array of {len(value)} items>"
        out_list = [json_safe(v, depth + 1) for v in value[:ECHO_ITEMS]]
        if len(value) > ECHO_ITEMS:
            out_list.append(f"... {len(value) - ECHO_ITEMS} more items")
        return out_list
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]}... ({len(value)} chars)"
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json_safe(str(value), depth)


def _count(request: Request, status: int) -> None:
    """A generation route's request refused before it ran, counted under the default mode."""
    if (route := ROUTES.get(request.url.path)) is not None:
        state = request.app.state
        state.metrics.request_finished(state.settings.default_mode, status, route=route)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field and the reason (a NaN input must not turn it into a 500);
    OpenAI's error shape on /v1."""
    errors = json_safe(exc.errors())
    _count(request, 422)
    if request.url.path.startswith("/v1/"):
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]  # without "body"
        message = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())[1:])) or 'body'}: {e.get('msg')}"
            for e in errors if isinstance(e, dict)
        )  # fmt: skip
        return openai_error(422, message, ".".join(loc) or None, first.get("type"))
    return JSONResponse({"detail": errors}, 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own errors (an undecodable body: 400; unknown route: 404), in OpenAI's
    shape on /v1."""
    if request.url.path.startswith("/v1/"):
        return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
    return await http_exception_handler(request, exc)


async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    """401 (with the reason, never the key), counted under the default mode."""
    _count(request, 401)
    message = f"{exc}: send Authorization: Bearer <key>"
    headers = {"WWW-Authenticate": "Bearer"}
    if request.url.path.startswith("/v1/"):
        return openai_error(401, message, code="invalid_api_key", headers=headers)
    return JSONResponse({"detail": message}, 401, headers=headers)


def register_handlers(app: FastAPI) -> None:
    """The app's exception handlers: 422, FastAPI's own HTTP errors, and 401."""
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Unauthorized, unauthorized)  # type: ignore[arg-type]
