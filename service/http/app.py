"""The FastAPI app: `build_app(settings, client)`; the same app runs under uvicorn and Ray Serve.

No Ray import here. Under uvicorn `client` is a `LocalEngineClient` started by the lifespan
hook; under Ray Serve, `service.ray_serve.app` passes a client that calls the engine deployment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline

from engine.decode.policy import MODES
from engine.images import encode_image, make_grid
from engine.model.config import SamplingParams
from engine.pipeline import MODELS
from service.core.client import EngineClient, EngineRequest, LocalEngineClient
from service.core.jobs import EngineError, JobCancelled, JobResult, QueueFull
from service.core.rows import RowEngine
from service.http.schemas import (
    MEDIA_TYPES,
    GenerateRequest,
    GenerateResponse,
    error_responses,
)
from service.metrics import Metrics, PrometheusBackend
from service.settings import ServiceSettings

TIMEOUT_HEADER = "x-request-timeout-seconds"
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent
log = logging.getLogger("marche.app")


def _invalid(field: str, message: str, value: Any, where: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, field), "msg": message, "input": value}]
    )


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


BODY_PATHS = ("/generate", "/generate/stream")  # the endpoints that take a body


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
            return await JSONResponse({"detail": detail}, 415)(scope, receive, send)
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
        await JSONResponse({"detail": detail}, 413)(scope, receive, send)


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
    num_classes = MODELS[settings.model].config.class_num if settings.model in MODELS else None
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated schema, with the served model's class-id range."""
        if app.openapi_schema is None:
            schema = default_openapi()
            if num_classes is not None:
                field = schema["components"]["schemas"]["GenerateRequest"]["properties"]
                field["class_id"] |= {"minimum": 0, "maximum": num_classes - 1}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.client, app.state.settings, app.state.metrics = client, settings, metrics
    app.state.info = None

    async def model_info() -> dict[str, Any]:
        """The model's static facts, fetched from the engine once."""
        if app.state.info is None:
            app.state.info = await app.state.client.info()
        return app.state.info

    async def engine_request(body: GenerateRequest, request: Request) -> EngineRequest:
        info = await model_info()
        if not 0 <= body.class_id < info["num_classes"]:
            raise _invalid(
                "class_id",
                f"class_id must be in 0..{info['num_classes'] - 1} for model {info['model']}",
                body.class_id,
            )
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        timeout = settings.request_timeout_s
        if (header := request.headers.get(TIMEOUT_HEADER)) is not None:
            try:
                requested = float(header)
            except ValueError:
                requested = float("nan")
            if not requested > 0:  # also NaN
                raise _invalid(TIMEOUT_HEADER, "must be a positive number of seconds", header,
                               where="header")  # fmt: skip
            timeout = min(timeout, requested)
        d = info["defaults"]
        params = SamplingParams(
            num_iter=body.steps or d["steps"],
            cfg=d["cfg"] if body.cfg is None else body.cfg,
            cfg_schedule=body.cfg_schedule or d["cfg_schedule"],
            temperature=d["temperature"] if body.temperature is None else body.temperature,
        )
        return EngineRequest(
            class_id=body.class_id,
            seeds=[seed + i for i in range(body.num_images)],
            params=params,
            mode=body.mode or settings.default_mode,
            timeout_s=timeout,
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming the field and the reason (a NaN input must not turn it into a 500)."""
        if request.url.path.startswith("/generate"):  # counted under the server's default mode
            metrics.request_finished(settings.default_mode, 422)
        return JSONResponse({"detail": _json_safe(exc.errors())}, 422)

    def error(status: int, message: str, request_id: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            {"detail": message}, status, headers={"X-Request-ID": request_id, **headers}
        )

    def failure(exc: Exception, req: EngineRequest) -> tuple[int, str, dict[str, str]]:
        """Status, message and headers for an engine-side failure; its request metric."""
        headers: dict[str, str] = {}
        if isinstance(exc, QueueFull):
            status, message = 503, str(exc)
            retry = max(settings.retry_after_s, int(getattr(exc, "retry_after", 1)))
            headers["Retry-After"] = str(retry)
        elif isinstance(exc, JobCancelled):
            status = 504 if exc.reason == "deadline" else CLIENT_CLOSED
            message = f"deadline of {req.timeout_s:g} s passed"
        else:  # a failed step, a dead replica, or a bug: JSON all the same, and counted
            status, message = 500, str(exc)
            if not isinstance(exc, EngineError):
                log.error("request %s failed", req.request_id, exc_info=exc)
                message = f"internal error ({type(exc).__name__})"
        metrics.request_finished(req.mode, status)
        return status, message, headers

    def engine_error(exc: Exception, req: EngineRequest) -> JSONResponse:
        status, message, headers = failure(exc, req)
        return error(status, message, req.request_id, **headers)

    @app.post("/generate", response_model=GenerateResponse, responses={200: {"content": {
        "image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(400, 413, 415, 422, 500, 503, 504)})  # fmt: skip
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate `num_images` images of `class_id`: image bytes (a grid if > 1) or JSON."""
        started = time.monotonic()
        req = await engine_request(body, request)
        task = asyncio.ensure_future(app.state.client.generate(req))
        try:
            while not task.done():  # notice a client that goes away, and drop its job
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    metrics.request_finished(req.mode, CLIENT_CLOSED)
                    return Response(status_code=CLIENT_CLOSED)
            result: JobResult = task.result()
        except Exception as exc:  # noqa: BLE001 - QueueFull, JobCancelled, EngineError, ...
            return engine_error(exc, req)
        finally:
            task.cancel()
        total = time.monotonic() - started
        metrics.request_finished(req.mode, 200, total)
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
                model=(await model_info())["model"],
                mode=req.mode,
                class_id=req.class_id,
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

    @app.post("/generate/stream", response_class=EventStream, responses={
        200: {"description": "server-sent events: progress, image, done or error",
              "content": {"text/event-stream": {"schema": {
                  "type": "object", "description": "each event's data: a JSON object"}}}},
        **error_responses(400, 413, 415, 422, 503, 504)})  # fmt: skip
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        """Server-sent events: `progress` per step (with a small `preview` now and then),
        one `image` per image, then `done`."""
        req = await engine_request(body, request)
        started = time.monotonic()
        stream = app.state.client.stream(req)
        try:  # admission first, so a full queue is a plain 503 rather than an event
            await anext(stream)
        except Exception as exc:  # noqa: BLE001 - as in /generate
            return engine_error(exc, req)

        async def events() -> AsyncIterator[str]:
            try:
                async for event in stream:
                    if "result" in event:
                        result: JobResult = event["result"]
                        for image, seed in zip(result.images, result.seeds, strict=True):
                            data = {"seed": seed, "b64": _b64(encode_image(image, body.format))}
                            yield _sse("image", data)
                        yield _sse("done", {"request_id": req.request_id, "seeds": result.seeds,
                                            "generation_s": result.generation_s})  # fmt: skip
                        continue
                    if (preview := event.pop("preview", None)) is not None:
                        event["preview_png_b64"] = _b64(encode_image(preview, "png"))
                    yield _sse("progress", event)
            except Exception as exc:  # noqa: BLE001 - the stream ends with an error event
                status, message, _ = failure(exc, req)
                yield _sse("error", {"status": status, "detail": message})
                return
            except asyncio.CancelledError:  # the client went away mid-stream
                metrics.request_finished(req.mode, CLIENT_CLOSED)
                raise
            metrics.request_finished(req.mode, 200, time.monotonic() - started)

        return EventStream(events(), headers={"X-Request-ID": req.request_id})

    @app.get("/classes")
    async def classes() -> dict[str, Any]:
        """Class ids and labels of the loaded model."""
        info = await model_info()
        labels = info["labels"]
        return {"model": info["model"], "classes": [
            {"id": i, "label": label} for i, label in enumerate(labels)]}  # fmt: skip

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
        """The model, device, defaults, MARché and batching settings, queue state."""
        return await app.state.client.info()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        """Prometheus metrics (under Ray Serve: Ray's exporter, port 8080, `ray_` prefix)."""
        if backend is None:
            return PlainTextResponse(
                "# metrics are exported by Ray's metrics exporter (ray_marche_*)\n"
            )
        return Response(backend.render(), media_type="text/plain; version=0.0.4")

    return app


ECHO_CHARS, ECHO_ITEMS = 64, 8  # what a 422 echoes of an input at most


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Errors echo the input, briefly: non-finite floats and other non-JSON values become
    strings; long strings and large or deep containers are cut (never echo a big input)."""
    if isinstance(value, dict):
        if depth > 3:
            return f"<object of {len(value)} keys>"
        items = list(value.items())
        out = {str(k)[:ECHO_CHARS]: _json_safe(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
        if len(items) > ECHO_ITEMS:
            out["..."] = f"{len(items) - ECHO_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple):
        if depth > 3:
            return f"<array of {len(value)} items>"
        out_list = [_json_safe(v, depth + 1) for v in value[:ECHO_ITEMS]]
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
    return _json_safe(str(value), depth)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(images: np.ndarray, fmt: str) -> bytes:
    image = images[0] if len(images) == 1 else make_grid(images)
    return encode_image(image, fmt)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
