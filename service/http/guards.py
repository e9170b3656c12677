"""Request guards shared by every route: the body check in front of the app (415, 413), and
`invalid`, the 422 a route raises for a field it refuses."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from service.http.errors import error_answer


def invalid(field: str, message: str, value: Any, where: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, field), "msg": message, "input": value}]
    )


BODY_PATHS = ("/generate", "/generate/stream", "/v1/images/generations")  # take a body


class BodyGuard:
    """ASGI middleware in front of the POST endpoints with a body: a JSON content type
    (else 415) and a body of at most `limit` bytes (else 413), checked before anything parses
    it. A declared Content-Length over the limit is refused without reading; otherwise at
    most limit + 1 bytes are read, then replayed to the app."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in BODY_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            detail = f"Content-Type must be application/json, not {media or 'missing'!r}"
            return await error_answer(scope["path"], 415, detail)(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        detail = f"request body over {self.limit} bytes"
        await error_answer(scope["path"], 413, detail)(scope, receive, send)
