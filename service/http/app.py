"""The FastAPI app: `build_app(settings, client)`; the same app runs under uvicorn and Ray Serve.

No Ray import here. Under uvicorn `client` is a `LocalEngineClient` started by the lifespan
hook; under Ray Serve, `service.ray_serve.app` passes a client that calls the engine deployment.
The native routes live here; `/v1` (OpenAI's Images API) in `openai_api`; both go through the
`Gateway` and, with `MARCHE_API_KEY` set, the key check of `auth`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.decode.policy import MODES
from engine.images import encode_image, make_grid
from engine.pipeline import MODELS
from service.core.client import EngineClient, EngineRequest, LocalEngineClient
from service.core.jobs import JobResult
from service.core.rows import RowEngine
from service.http.auth import Unauthorized, key_check
from service.http.errors import openai_error
from service.http.gateway import CLIENT_CLOSED, ROUTES, Gateway
from service.http.guards import BodyGuard, json_safe
from service.http.openai_api import openai_router
from service.http.schemas import MEDIA_TYPES, GenerateRequest, GenerateResponse, error_responses
from service.http.web import router as web_router
from service.metrics import Metrics, PrometheusBackend
from service.settings import ServiceSettings


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


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
    local = client is None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if local:
            engine = LocalEngineClient(settings, metrics, rows)
            engine.start()
            app.state.client = engine
        yield
        if local:
            await asyncio.to_thread(engine.stop)

    app = FastAPIOffline(  # /docs and /redoc with their assets served from the package (no CDN)
        title="MARché Serve",
        description="Class-conditional image generation with MAR and MARché decoding.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes)
    app.include_router(web_router)  # the page at / and its /static files (not in the schema)
    spec = MODELS.get(settings.model)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated schema, with the served model's class-id range and image size."""
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

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.client, app.state.settings, app.state.metrics = client, settings, metrics
    gateway = Gateway(app.state, settings, metrics)
    # every generation route wants the key when one is set (and the schema says so then)
    keyed = [Depends(key_check(settings))] if settings.api_key else []

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming the field and the reason (a NaN input must not turn it into a 500);
        OpenAI's error shape on /v1."""
        errors = json_safe(exc.errors())
        if (route := ROUTES.get(request.url.path)) is not None:  # under the default mode
            metrics.request_finished(settings.default_mode, 422, route=route)
        if request.url.path.startswith("/v1/"):
            first = errors[0] if errors else {}
            loc = [str(p) for p in first.get("loc", ())[1:]]  # without "body"
            message = "; ".join(
                f"{'.'.join(map(str, e.get('loc', ())[1:])) or 'body'}: {e.get('msg')}"
                for e in errors if isinstance(e, dict)
            )  # fmt: skip
            return openai_error(422, message, ".".join(loc) or None, first.get("type"))
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own errors (an undecodable body: 400; unknown route: 404), in OpenAI's
        shape on /v1."""
        if request.url.path.startswith("/v1/"):
            return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        """401 (with the reason, never the key), counted under the default mode."""
        if (route := ROUTES.get(request.url.path)) is not None:
            metrics.request_finished(settings.default_mode, 401, route=route)
        message = f"{exc}: send Authorization: Bearer <key>"
        headers = {"WWW-Authenticate": "Bearer"}
        if request.url.path.startswith("/v1/"):
            return openai_error(401, message, code="invalid_api_key", headers=headers)
        return JSONResponse({"detail": message}, 401, headers=headers)

    def engine_error(exc: Exception, req: EngineRequest, route: str) -> JSONResponse:
        status, message, headers = gateway.failure(exc, req, route)
        return JSONResponse(
            {"detail": message}, status, headers={"X-Request-ID": req.request_id, **headers}
        )

    async def engine_request(body: GenerateRequest, request: Request) -> EngineRequest:
        class_id = await gateway.class_id(body.class_id, body.class_name, "class_name")
        return await gateway.engine_request(body, class_id, request)

    @app.post("/generate", response_model=GenerateResponse, dependencies=keyed, responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(400, 401, 413, 415, 422, 500, 503, 504)})  # fmt: skip
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate `num_images` images of a class (`class_id` or `class_name`): image bytes
        (a grid if > 1) or JSON."""
        started = time.monotonic()
        req = await engine_request(body, request)
        try:
            result = await gateway.run(req, request)
        except Exception as exc:  # noqa: BLE001 - QueueFull, JobCancelled, EngineError, ...
            return engine_error(exc, req, "generate")
        if result is None:
            metrics.request_finished(req.mode, CLIENT_CLOSED, route="generate")
            return Response(status_code=CLIENT_CLOSED)
        total = time.monotonic() - started
        metrics.request_finished(req.mode, 200, total, route="generate")
        headers = {
            "X-Request-ID": req.request_id,
            "X-Seed": ",".join(map(str, result.seeds)),
            "X-Mode": req.mode,
            "X-Steps": str(req.params.num_iter),
            "X-Queue-Seconds": f"{result.queue_s:.4f}",
            "X-Generation-Seconds": f"{result.generation_s:.4f}",
            "X-Batch-Size": str(result.batch_size),
        }
        accept = request.headers.get("accept", "")
        if body.response == "json" or (body.response is None and "application/json" in accept):
            images = await asyncio.to_thread(
                lambda: [_b64(encode_image(im, body.format)) for im in result.images]
            )
            payload = GenerateResponse(
                request_id=req.request_id,
                model=(await gateway.info())["model"],
                mode=req.mode,
                class_id=req.class_id,
                class_name=(await gateway.classes())[req.class_id].name,
                steps=req.params.num_iter,
                format=body.format,
                images=[{"b64": b, "seed": s} for b, s in zip(images, result.seeds, strict=True)],
                timings={"queue_s": result.queue_s, "generation_s": result.generation_s,
                         "total_s": total},
                batch_size=result.batch_size,
            )  # fmt: skip
            return JSONResponse(payload.model_dump(), headers=headers)
        data = await asyncio.to_thread(_encode, result.images, body.format)
        return Response(data, media_type=MEDIA_TYPES[body.format], headers=headers)

    @app.post("/generate/stream", response_class=EventStream, dependencies=keyed, responses={
        200: {"description": "server-sent events: progress, image, done or error",
              "content": {"text/event-stream": {"schema": {
                  "type": "object", "description": "each event's data: a JSON object"}}}},
        **error_responses(400, 401, 413, 415, 422, 503, 504)})  # fmt: skip
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        """Server-sent events: `progress` per step (with a small `preview` now and then),
        one `image` per image, then `done`."""
        req = await engine_request(body, request)
        started = time.monotonic()
        stream = app.state.client.stream(req)
        try:  # admission first, so a full queue is a plain 503 rather than an event
            await anext(stream)
        except Exception as exc:  # noqa: BLE001 - as in /generate
            return engine_error(exc, req, "stream")
        name = (await gateway.classes())[req.class_id].name

        async def events() -> AsyncIterator[str]:
            try:
                async for event in stream:
                    if "result" in event:
                        result: JobResult = event["result"]
                        for image, seed in zip(result.images, result.seeds, strict=True):
                            data = {"seed": seed, "b64": _b64(encode_image(image, body.format))}
                            yield _sse("image", data)
                        yield _sse("done", {
                            "request_id": req.request_id, "seeds": result.seeds,
                            "class_id": req.class_id, "class_name": name, "mode": req.mode,
                            "steps": req.params.num_iter, "queue_s": result.queue_s,
                            "generation_s": result.generation_s})  # fmt: skip
                        continue
                    if (preview := event.pop("preview", None)) is not None:
                        event["preview_png_b64"] = _b64(encode_image(preview, "png"))
                    yield _sse("progress", event)
            except Exception as exc:  # noqa: BLE001 - the stream ends with an error event
                status, message, _ = gateway.failure(exc, req, "stream")
                yield _sse("error", {"status": status, "detail": message})
                return
            except asyncio.CancelledError:  # the client went away mid-stream
                metrics.request_finished(req.mode, CLIENT_CLOSED, route="stream")
                raise
            metrics.request_finished(req.mode, 200, time.monotonic() - started, route="stream")

        return EventStream(events(), headers={"X-Request-ID": req.request_id})

    app.include_router(openai_router(gateway, keyed))

    @app.get("/classes")
    async def classes() -> dict[str, Any]:
        """The served model's classes: id, display name and every synonym `class_name` takes."""
        info, names = await gateway.info(), await gateway.classes()
        return {"model": info["model"], "classes": [
            {"id": c.id, "name": c.name, "synonyms": list(c.synonyms)} for c in names]}  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready (the reason is given)"}})
    async def readyz() -> JSONResponse:
        """Model loaded, warmed up (a probe generation ran) and the engine loop alive."""
        ok, reason = await app.state.client.readiness()
        return JSONResponse({"ready": ok, "reason": reason}, 200 if ok else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The model, device, defaults, MARché and batching settings, queue state, and
        whether generation routes want an API key."""
        return {**await app.state.client.info(), "api_key_required": settings.api_key is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics (under Ray Serve: Ray's exporter, port 8080, `ray_` prefix)."""
        if backend is None:
            return PlainTextResponse(
                "# metrics are exported by Ray's metrics exporter (ray_marche_*)\n"
            )
        return Response(backend.render(), media_type="text/plain; version=0.0.4")

    return app


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(images: np.ndarray, fmt: str) -> bytes:
    image = images[0] if len(images) == 1 else make_grid(images)
    return encode_image(image, fmt)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
