"""API keys and tenants. With `MARCHE_API_KEY` (or `MARCHE_API_KEYS`, comma-separated) set,
generation routes want `Authorization: Bearer <key>`. Health, readiness, metrics and the web
page stay open (probes and scrapers send no key; none of them starts work).

Each key is a **tenant**: the fairness key above requests (service/core/policies.py). Without
keys, OpenAI's `user` field names the tenant, and requests without one share the anonymous
tenant. A tenant is known by a hash (`tenant_name`), never by its key or user in clear: the
name is what logs, metrics and /info show."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.jobs import ANONYMOUS
from service.settings import ServiceSettings

bearer = HTTPBearer(auto_error=False)  # our own 401 (OpenAI's shape on /v1), not FastAPI's


class Unauthorized(Exception):
    """A generation request without one of the server's keys: 401."""


def tenant_name(kind: str, secret: str) -> str:
    """`key-…` or `user-…`: the first 12 hex digits of the secret's SHA-256."""
    return f"{kind}-{hashlib.sha256(secret.encode()).hexdigest()[:12]}"


def request_tenant(request: Request, user: str | None) -> str:
    """The tenant of a request: its key's (set by the key check), else its `user`'s."""
    if (tenant := getattr(request.state, "tenant", None)) is not None:
        return tenant
    return tenant_name("user", user) if user else ANONYMOUS


def key_check(settings: ServiceSettings) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that raises `Unauthorized` unless the request has one of the
    keys, and records its tenant. Keys are compared as bytes in constant time (every key, so
    the time does not tell which matched) and never logged or echoed."""
    keys = {key.encode(): tenant_name("key", key) for key in settings.keys()}

    async def require_key(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if not keys:
            return
        sent = credentials.credentials.encode() if credentials else b""
        matches = [tenant for key, tenant in keys.items() if hmac.compare_digest(sent, key)]
        if not matches:
            raise Unauthorized("missing API key" if credentials is None else "wrong API key")
        request.state.tenant = matches[0]

    return require_key
