"""OpenAI-compatible Images API: `POST /v1/images/generations` and `GET /v1/models`.

Any OpenAI client talks to the service: `prompt` is a class name (or id), `n` the number of
images, `size` the model's native size; `seed`, `mode`, `cfg`, `steps` and `temperature` are
extensions (the openai client sends them with `extra_body=`). The request runs through the
same gateway, worker, limits and metrics as `/generate` (route label `openai`). Errors come in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the native API's status
codes; the client raises its matching exception types.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.images import encode_image
from service.core.client import EngineRequest
from service.core.jobs import MAX_IMAGES, MAX_PRIORITY, MAX_SEED, MAX_STEPS, JobResult, Mode
from service.http.deps import GatewayDep
from service.http.errors import openai_error
from service.http.gateway import CLIENT_CLOSED, Gateway
from service.http.guards import invalid
from service.http.schemas import MAX_NAME_CHARS, GenerateRequest, error_responses, number_only

ERROR_CODES = (400, 401, 404, 413, 415, 422, 429, 500, 503, 504)


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Every /v1 error answer."""

    error: OpenAIErrorBody


def not_served(model: str, served: str) -> JSONResponse:
    message = f"model {model!r} is not served here; this server serves {served!r}"
    return openai_error(404, message, "model", "model_not_found")


class ImagesRequest(BaseModel):
    """OpenAI's image generation request; fields it has that do not apply here are refused
    by name (`extra="forbid"`), so a typo in an extension is never silently ignored."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"prompt": "golden retriever", "n": 1, "seed": 0}]},
    )

    prompt: str = Field(
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="a class name or synonym (see /classes), or a class id",
    )
    model: str | None = Field(None, description="the served model's id (see /v1/models)")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images to generate")
    size: str | None = Field(None, description="the model's native size, e.g. '256x256'")
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="only b64_json: the service hosts no image URLs"
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(
        None, max_length=256,
        description="the tenant fair scheduling shares rows by, when the server has no API keys",
    )  # fmt: skip
    # extensions (vLLM-Omni style): the native API's knobs
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED - MAX_IMAGES + 1,
        description="seed of the first image (image i uses seed + i)",
    )
    mode: Mode | None = Field(None, description="decoding: mar, marche, turbo, quality or fast")
    cfg: float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="autoregressive steps")
    temperature: float | None = Field(None, ge=0, le=10, description="diffusion temperature")
    priority: int = Field(
        0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
        description="lower runs first under the deadline scheduling policy (vLLM's convention)",
    )  # fmt: skip

    _numbers = field_validator(
        "n", "seed", "cfg", "steps", "temperature", "priority", mode="before"
    )(number_only)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str = Field(description="the class the prompt resolved to")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "marche"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# the API-key check, when a key is set, comes with `include_router` (`deps.keyed`)
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@router.post("/images/generations", response_model=ImagesResponse,
             responses=error_responses(*ERROR_CODES, body=OpenAIError))  # fmt: skip
async def images_generations(
    body: ImagesRequest, request: Request, gateway: GatewayDep
) -> JSONResponse:
    """Generate `n` images of the class `prompt` names (OpenAI's Images API)."""
    started = time.monotonic()
    info = await gateway.info()
    if body.model is not None and body.model != info["model"]:
        gateway.metrics.request_finished(gateway.settings.default_mode, 404, route="openai")
        return not_served(body.model, info["model"])
    native = f"{info['image_size']}x{info['image_size']}"
    if body.size is not None and body.size not in (native, "auto"):
        raise invalid("size", f"size must be {native!r} (the model's native size)", body.size)
    req = await engine_request(gateway, body, request)
    try:
        result = await gateway.run(req, request)
    except Exception as exc:  # noqa: BLE001 - QueueFull, JobCancelled, EngineError, ...
        status, message, headers = gateway.failure(exc, req, "openai")
        return openai_error(status, message, headers=headers | {"X-Request-ID": req.request_id})
    if result is None:
        gateway.metrics.request_finished(req.mode, CLIENT_CLOSED, route="openai")
        return JSONResponse(None, CLIENT_CLOSED)
    return await answer(gateway, body, req, result, native, started)


async def engine_request(gateway: Gateway, body: ImagesRequest, request: Request) -> EngineRequest:
    """The engine's request for `body`: its prompt a class name, or a class id that is no
    class's name."""
    prompt = body.prompt.strip()
    numeral = prompt.isascii() and prompt.isdigit()  # int() refuses other digits ('²')
    by_id = numeral and not (await gateway.classes()).known(prompt)
    class_id = await gateway.class_id(
        int(prompt) if by_id else None, None if by_id else prompt, "prompt", "prompt"
    )
    native_request = GenerateRequest(
        class_id=class_id, seed=body.seed, mode=body.mode, cfg=body.cfg, steps=body.steps,
        temperature=body.temperature, num_images=body.n, priority=body.priority,
        user=body.user or None,
    )  # fmt: skip
    return await gateway.engine_request(native_request, class_id, request)


async def answer(
    gateway: Gateway, body: ImagesRequest, req: EngineRequest, result: JobResult, native: str,
    started: float,
) -> JSONResponse:  # fmt: skip
    """The images, base64-encoded, each with the class the prompt resolved to."""
    images = await asyncio.to_thread(
        lambda: [encode_image(im, body.output_format) for im in result.images]
    )
    name = (await gateway.classes())[req.class_id].name
    gateway.metrics.request_finished(req.mode, 200, time.monotonic() - started, route="openai")
    payload = ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=base64.b64encode(data).decode("ascii"),
                        revised_prompt=name) for data in images],
        size=native,
        output_format=body.output_format,
    )  # fmt: skip
    headers = {"X-Request-ID": req.request_id, "X-Seed": ",".join(map(str, result.seeds)),
               "X-Mode": req.mode, "X-Generation-Seconds": f"{result.generation_s:.4f}",
               "X-Queue-Seconds": f"{result.queue_s:.4f}"}  # fmt: skip
    return JSONResponse(payload.model_dump(), headers=headers)


@router.get("/models", response_model=ModelList, responses=error_responses(401, body=OpenAIError))
async def models(gateway: GatewayDep) -> ModelList:
    """The served model (one per server)."""
    return ModelList(data=[ModelCard(id=(await gateway.info())["model"])])


@router.get("/models/{model_id}", response_model=ModelCard,
            responses=error_responses(401, 404, body=OpenAIError))  # fmt: skip
async def model(model_id: str, gateway: GatewayDep) -> Any:
    """One model: the served one, or 404."""
    served = (await gateway.info())["model"]
    if model_id != served:
        return not_served(model_id, served)
    return ModelCard(id=served)
