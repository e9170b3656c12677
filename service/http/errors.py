"""Error answers: `{"detail": ...}` on the native API, OpenAI's shape on /v1."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# OpenAI's error `type` by status (anything else: invalid_request_error)
ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error",
               504: "timeout"}  # fmt: skip
# the openai client retries 5xx twice by default: a failed step or a passed deadline would
# run again, so those say not to (a 503 is worth retrying, after its Retry-After)
NO_RETRY = {500, 504}


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
