"""The optional API key: with `MARCHE_API_KEY` set, generation routes want
`Authorization: Bearer <key>`. Health, readiness, metrics and the web page stay open (probes
and scrapers send no key; none of them starts work)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import ServiceSettings

bearer = HTTPBearer(auto_error=False)  # our own 401 (OpenAI's shape on /v1), not FastAPI's


class Unauthorized(Exception):
    """A generation request without the server's key: 401."""


def key_check(settings: ServiceSettings) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that raises `Unauthorized` unless the request has the key. The
    key is compared as bytes in constant time and never logged or echoed."""
    key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if key is None:
            return
        sent = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(sent, key):
            raise Unauthorized("missing API key" if credentials is None else "wrong API key")

    return require_key
