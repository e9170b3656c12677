"""Typed dependencies: what a route takes, read from `app.state` (set by `build_app`), and
the API-key check the generation routers are included with."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from service.core.client import EngineClient
from service.http.auth import key_check
from service.http.gateway import Gateway
from service.metrics import Metrics, PrometheusBackend
from service.settings import ServiceSettings

# async, so FastAPI runs them on the event loop rather than in its thread pool


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_backend(request: Request) -> PrometheusBackend | None:
    """Prometheus' registry under uvicorn; None under Ray Serve (Ray's exporter has them)."""
    return request.app.state.backend


async def get_client(request: Request) -> EngineClient:
    """The engine client (under uvicorn: set by the lifespan hook at start-up)."""
    return request.app.state.client


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BackendDep = Annotated[PrometheusBackend | None, Depends(get_backend)]
ClientDep = Annotated[EngineClient, Depends(get_client)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def keyed(settings: ServiceSettings) -> list[Any]:
    """The generation routers' dependencies: the key check of `auth` when a key is set, and
    nothing otherwise (so the schema asks for a key only then)."""
    return [Depends(key_check(settings))] if settings.keys() else []
