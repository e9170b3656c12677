"""The HTTP contract: request and response bodies (pydantic v2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.decode.policy import MODES

MAX_IMAGES = 16
MAX_STEPS = 256
MAX_SEED = 2**53 - 1  # exact in a JSON number (an IEEE double): schema-valid seeds stay valid

ImageFormat = Literal["png", "jpeg", "webp"]
Mode = Literal[MODES]  # the engine's presets: mar, marche, turbo
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GenerateRequest(BaseModel):
    """One generation request; unset fields take the model's defaults."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field is an error, not silently ignored
        strict=True,  # "3", true and 3.0 are not class ids; false is not a temperature
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"class_id": 3, "cfg": 3.0, "seed": 0}]},
    )

    # its range depends on the served model: checked (and put in the OpenAPI schema) by the app
    class_id: int = Field(description="class label (digits: 0..9; ImageNet: 0..999)")
    cfg: float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="seed of the first image (image i uses seed + i)"
    )
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="autoregressive steps")
    temperature: float | None = Field(None, ge=0, le=10, description="diffusion temperature")
    cfg_schedule: Literal["linear", "constant"] | None = None
    mode: Mode | None = Field(
        None, description="decoding: mar (exact), marche (cache-aware), turbo (every cache)"
    )
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images; >1 returns a grid")
    format: ImageFormat = "png"
    response: Literal["image", "json"] | None = Field(
        None, description="'json' returns base64 images (same as Accept: application/json)"
    )


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
    steps: int
    format: ImageFormat
    images: list[ImageOut]
    timings: Timings
    batch_size: int = Field(description="images in the engine batch this request ran in")


class ErrorOut(BaseModel):
    """Every error answer: what went wrong (for 422, a list naming each field)."""

    detail: str | list[dict]


ERRORS: dict[int | str, dict] = {
    413: {"model": ErrorOut, "description": "request body too large"},
    415: {"model": ErrorOut, "description": "Content-Type is not application/json"},
    422: {"model": ErrorOut, "description": "a field is invalid (named in `detail`)"},
    500: {"model": ErrorOut, "description": "the engine step this request ran in failed"},
    503: {"model": ErrorOut, "description": "queue full or shutting down; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"},
                                      "description": "seconds to wait before retrying"}}},
    504: {"model": ErrorOut, "description": "the request's deadline passed"},
}  # fmt: skip
