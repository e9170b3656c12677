"""`POST /generate` (a class's images, as image bytes or JSON) and `POST /generate/stream` (the
same as server-sent events, with progress and previews)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.images import encode_image, make_grid
from service.core.client import EngineRequest
from service.core.jobs import JobResult
from service.http.deps import ClientDep, GatewayDep, MetricsDep
from service.http.gateway import CLIENT_CLOSED, Gateway
from service.http.schemas import MEDIA_TYPES, GenerateRequest, GenerateResponse, error_responses
from service.metrics import Metrics

router = APIRouter()


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


def engine_error(gateway: Gateway, exc: Exception, req: EngineRequest, route: str) -> JSONResponse:
    status, message, headers = gateway.failure(exc, req, route)
    return JSONResponse(
        {"detail": message}, status, headers={"X-Request-ID": req.request_id, **headers}
    )


async def engine_request(
    gateway: Gateway, body: GenerateRequest, request: Request
) -> EngineRequest:
    class_id = await gateway.class_id(body.class_id, body.class_name, "class_name")
    return await gateway.engine_request(body, class_id, request)


@router.post("/generate", response_model=GenerateResponse, responses={
    200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
    **error_responses(400, 401, 413, 415, 422, 429, 500, 503, 504)})  # fmt: skip
async def generate(
    body: GenerateRequest, request: Request, gateway: GatewayDep, metrics: MetricsDep
) -> Response:
    """Generate `num_images` images of a class (`class_id` or `class_name`): image bytes
    (a grid if > 1) or JSON."""
    started = time.monotonic()
    req = await engine_request(gateway, body, request)
    try:
        result = await gateway.run(req, request)
    except Exception as exc:  # noqa: BLE001 - QueueFull, JobCancelled, EngineError, ...
        return engine_error(gateway, exc, req, "generate")
    if result is None:
        metrics.request_finished(req.mode, CLIENT_CLOSED, route="generate")
        return Response(status_code=CLIENT_CLOSED)
    total = time.monotonic() - started
    metrics.request_finished(req.mode, 200, total, route="generate")
    headers = _headers(req, result)
    accept = request.headers.get("accept", "")
    if body.response == "json" or (body.response is None and "application/json" in accept):
        payload = await json_answer(gateway, body, req, result, total)
        return JSONResponse(payload.model_dump(), headers=headers)
    data = await asyncio.to_thread(_encode, result.images, body.format)
    return Response(data, media_type=MEDIA_TYPES[body.format], headers=headers)


def _headers(req: EngineRequest, result: JobResult) -> dict[str, str]:
    return {
        "X-Request-ID": req.request_id,
        "X-Seed": ",".join(map(str, result.seeds)),
        "X-Mode": req.mode,
        "X-Steps": str(req.params.num_iter),
        "X-Queue-Seconds": f"{result.queue_s:.4f}",
        "X-Generation-Seconds": f"{result.generation_s:.4f}",
        "X-Batch-Size": str(result.batch_size),
    }


async def json_answer(
    gateway: Gateway, body: GenerateRequest, req: EngineRequest, result: JobResult, total: float
) -> GenerateResponse:
    """`/generate`'s JSON answer: each image base64-encoded, with its seed; the timings."""
    images = await asyncio.to_thread(
        lambda: [_b64(encode_image(im, body.format)) for im in result.images]
    )
    return GenerateResponse(
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


@router.post("/generate/stream", response_class=EventStream, responses={
    200: {"description": "server-sent events: queued, progress, image, done or error",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "description": "each event's data: a JSON object"}}}},
    **error_responses(400, 401, 413, 415, 422, 429, 503, 504)})  # fmt: skip
async def generate_stream(
    body: GenerateRequest,
    request: Request,
    gateway: GatewayDep,
    client: ClientDep,
    metrics: MetricsDep,
) -> Response:
    """Server-sent events: `queued` while waiting (place and expected start), `progress` per
    step (with a small `preview` now and then), one `image` per image, then `done`."""
    req = await engine_request(gateway, body, request)
    started = time.monotonic()
    stream = client.stream(req)
    try:  # admission first, so a full queue is a plain 503 rather than an event
        await anext(stream)
    except Exception as exc:  # noqa: BLE001 - as in /generate
        return engine_error(gateway, exc, req, "stream")
    name = (await gateway.classes())[req.class_id].name
    events = _events(stream, body, req, name, gateway, metrics, started)
    return EventStream(events, headers={"X-Request-ID": req.request_id})


async def _events(
    stream: AsyncIterator[dict[str, Any]], body: GenerateRequest, req: EngineRequest, name: str,
    gateway: Gateway, metrics: Metrics, started: float,
) -> AsyncIterator[str]:  # fmt: skip
    """The stream's events after admission: `queued`, `progress`, `image`s and `done`, or
    `error`."""
    try:
        async for event in stream:
            if event.pop("queued", False):
                yield _sse("queued", event)
                continue
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(images: np.ndarray, fmt: str) -> bytes:
    image = images[0] if len(images) == 1 else make_grid(images)
    return encode_image(image, fmt)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
