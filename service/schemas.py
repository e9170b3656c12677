"""The HTTP contract: request and response bodies (pydantic v2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.decode.policy import MODES

MAX_IMAGES = 16
MAX_STEPS = 256
MAX_SEED = 2**63 - 1

ImageFormat = Literal["png", "jpeg", "webp"]
Mode = Literal[MODES]  # the engine's presets: mar, marche, turbo
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class GenerateRequest(BaseModel):
    """One generation request; unset fields take the model's defaults."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field is an error, not silently ignored
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"class_id": 3, "cfg": 3.0, "seed": 0}]},
    )

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
