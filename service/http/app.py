"""The FastAPI app: `build_app(settings, client)`; the same app runs under uvicorn and Ray Serve.

No Ray import here. Under uvicorn `client` is a `LocalEngineClient` started by the lifespan
hook; under Ray Serve, `service.ray_serve.app` passes a client that calls the engine deployment.
`build_app` composes the app: the routers of `routes/` (the native API in `generate` and
`system`, `/v1` (OpenAI's Images API) in `openai`, the web page in `web`), the exception
handlers of `errors`, and the body guard of `guards`. Routes read what they need from
`app.state` through the typed dependencies of `deps`; generation routes go through the
`Gateway` and, with `MARCHE_API_KEY` set, the key check of `auth`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from engine.decode.policy import MODES
from engine.pipeline import MODELS
from service.core.client import EngineClient, LocalEngineClient
from service.core.rows import RowEngine
from service.http.deps import keyed
from service.http.errors import register_handlers
from service.http.gateway import Gateway
from service.http.guards import BodyGuard
from service.http.routes import generate, openai, system, web
from service.metrics import Metrics, PrometheusBackend
from service.settings import ServiceSettings


def build_app(
    settings: ServiceSettings | None = None,
    client: EngineClient | None = None,
    metrics: Metrics | None = None,
    rows: RowEngine | None = None,
) -> FastAPI:
    """The app. Without `client`, it loads the model and runs the engine in-process (on `rows`
    when given: the load bench's synthetic engine)."""
    settings = settings or ServiceSettings()
    backend = PrometheusBackend() if metrics is None else None
    metrics = metrics or Metrics(backend, settings.model, MODES)
    app = FastAPIOffline(  # /docs and /redoc with their assets served from the package (no CDN)
        title="MARché Serve",
        description="Class-conditional image generation with MAR and MARché decoding.",
        version="0.1.0",
        lifespan=lifespan(settings, metrics, rows, local=client is None),
    )
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes)
    app.openapi = served_model_openapi(app, settings)  # type: ignore[method-assign]
    app.state.client, app.state.settings, app.state.metrics = client, settings, metrics
    app.state.backend = backend  # Prometheus' registry for /metrics; None under Ray Serve
    app.state.gateway = Gateway(app.state, settings, metrics)
    app.include_router(web.router)  # the page at / and its /static files (not in the schema)
    # every generation route wants the key when one is set (and the schema says so then)
    app.include_router(generate.router, dependencies=keyed(settings))
    app.include_router(openai.router, dependencies=keyed(settings))
    app.include_router(system.router)
    register_handlers(app)
    return app


def lifespan(
    settings: ServiceSettings, metrics: Metrics, rows: RowEngine | None, local: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start-up and shut-down: with no client given, the in-process engine's."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        if local:
            engine = LocalEngineClient(settings, metrics, rows)
            engine.start()
            app.state.client = engine
        yield
        if local:
            await asyncio.to_thread(engine.stop)

    return run


def served_model_openapi(app: FastAPI, settings: ServiceSettings) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: the generated schema, with the served model's class-id range and image
    size."""
    spec = MODELS.get(settings.model)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            if spec is not None:
                models = schema["components"]["schemas"]
                class_id = models["GenerateRequest"]["properties"]["class_id"]["anyOf"][0]
                class_id |= {"minimum": 0, "maximum": spec.config.class_num - 1}
                native = f"{spec.config.img_size}x{spec.config.img_size}"
                models["ImagesRequest"]["properties"]["size"]["anyOf"][0]["enum"] = [native, "auto"]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
