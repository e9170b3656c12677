"""The HTTP contract: request and response bodies (pydantic v2)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from service.core.jobs import MAX_IMAGES, MAX_PRIORITY, MAX_SEED, MAX_STEPS, Mode


def number_only(value: Any) -> Any:
    """JSON numbers only: true and "3" are not numbers (pydantic's lax mode would take them);
    3.0 is an integer, as JSON Schema says."""
    if isinstance(value, bool | str):
        raise PydanticCustomError("number_type", "Input should be a JSON number, not {kind}",
                                  {"kind": type(value).__name__})  # fmt: skip
    return value


MAX_NAME_CHARS = 100  # the longest ImageNet synonym has 30
ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GenerateRequest(BaseModel):
    """One generation request; unset fields take the model's defaults."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field is an error, not silently ignored
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [{"class_id": 3, "cfg": 3.0, "seed": 0}, {"class_name": "seven"}],
            "oneOf": [  # exactly one of class_id and class_name (null: not given)
                {"properties": {"class_id": {"type": "integer"}}, "required": ["class_id"]},
                {"properties": {"class_name": {"type": "string"}}, "required": ["class_name"]},
            ],
        },
    )

    # exactly one of class_id and class_name; the id's range depends on the served model:
    # checked (and put in the OpenAPI schema) by the app, as is the name
    class_id: int | None = Field(None, description="class id (digits: 0..9; ImageNet: 0..999)")
    class_name: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_CHARS,
        description="class name or synonym, any case (see GET /classes): 'seven', 'tabby cat'",
    )  # fmt: skip
    cfg: float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale")
    seed: int | None = Field(  # every image's seed (seed + i) stays <= MAX_SEED
        None, ge=0, le=MAX_SEED - MAX_IMAGES + 1,
        description="seed of the first image (image i uses seed + i)",
    )  # fmt: skip
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="autoregressive steps")
    temperature: float | None = Field(None, ge=0, le=10, description="diffusion temperature")
    cfg_schedule: Literal["linear", "constant"] | None = None
    mode: Mode | None = Field(
        None,
        description=(
            "decoding: mar (exact), marche (cache-aware), turbo (every cache), quality and "
            "fast (turbo + GtR's two-stage order)"
        ),
    )
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images; >1 returns a grid")
    priority: int = Field(
        0, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
        description="lower runs first under the deadline scheduling policy (vLLM's convention)",
    )  # fmt: skip
    user: str | None = Field(
        None, min_length=1, max_length=256,
        description="the tenant fair scheduling shares rows by, when the server has no API keys",
    )  # fmt: skip
    format: ImageFormat = "png"
    response: Literal["image", "json"] | None = Field(
        None, description="'json' returns base64 images (same as Accept: application/json)"
    )

    _numbers = field_validator(
        "class_id",
        "cfg",
        "seed",
        "steps",
        "temperature",
        "num_images",
        "priority",
        mode="before",
    )(number_only)


class ImageOut(BaseModel):
    b64: str
    seed: int


class Timings(BaseModel):
    queue_s: float
    generation_s: float
    total_s: float


class GenerateResponse(BaseModel):
    request_id: str
    model: str
    mode: str
    class_id: int
    class_name: str
    steps: int
    format: ImageFormat
    images: list[ImageOut]
    timings: Timings
    batch_size: int = Field(description="images in the engine batch this request ran in")


class ErrorOut(BaseModel):
    """Every error answer: what went wrong (for 422, a list naming each field)."""

    detail: str | list[dict]


_ERROR_DESCRIPTIONS = {
    400: "the body cannot be decoded as JSON text",
    401: "the server wants an API key (Authorization: Bearer <key>)",
    404: "the model is not served here",
    413: "request body too large",
    415: "Content-Type is not application/json",
    422: "a field is invalid (named in `detail`)",
    429: "this tenant (API key or user) has too many requests waiting; see Retry-After",
    500: "the engine step this request ran in failed",
    503: "queue full or shutting down; see Retry-After",
    504: "the request's deadline passed",
}


def error_responses(*codes: int, body: type[BaseModel] = ErrorOut) -> dict[int | str, dict]:
    """OpenAPI entries for error answers: JSON `ErrorOut` bodies (also on the event-stream
    route, whose errors come before any event), Retry-After on 503."""
    out: dict[int | str, dict] = {}
    for code in codes:
        entry: dict = {
            "description": _ERROR_DESCRIPTIONS[code],
            "content": {"application/json": {"schema": body.model_json_schema()}},
        }
        if code in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "schema": {"type": "integer"},
                    "description": "seconds to wait before retrying",
                }
            }
        out[code] = entry
    return out
