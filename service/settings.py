"""Service knobs: one settings object, read from `MARCHE_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES
from engine.decode.units.common import parse_buckets


class ServiceSettings(BaseSettings):
    """Everything an operator can set; `MARCHE_MAX_BATCH_SIZE=32` sets `max_batch_size`."""

    model_config = SettingsConfigDict(env_prefix="MARCHE_", extra="ignore")

    # the model
    model: str = "digits"
    checkpoint: str | None = None  # official checkpoint-last.pth or .safetensors
    vae: str | None = None  # kl16.ckpt, for the ImageNet models
    random_weights: bool = False  # time official sizes without a checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    # the head and the transformer's passes as units per bucket: CUDA graphs, inductor, or
    # eager; auto: CUDA graphs where they measure faster than eager, else eager
    # (engine/decode/units/)
    units: Literal["off", "static", "compile", "cuda-graphs", "auto"] = "auto"
    # "auto": sized so every call of a max_batch_size batch fits (engine/decode/units/build.py)
    head_buckets: str = Field("auto", description="head tokens per unit, or auto")
    pass_buckets: str = Field("auto", description="transformer calls per unit, or auto")
    torch_threads: int | None = Field(None, ge=1, description="torch threads (default: torch's)")

    # Ray Serve: how the ingress picks an engine replica (work: least outstanding image-steps;
    # default: Ray's power of two choices on request counts)
    router: Literal["work", "default"] = "work"
    # Ray Serve: a fixed number of engine replicas (default: autoscale on work up to the GPUs)
    replicas: int | None = Field(None, ge=1, description="engine replicas (Ray runtime)")

    # an API key for the generation routes (`Authorization: Bearer <key>`); unset: open
    api_key: SecretStr | None = None
    # more keys, comma-separated: each key is a tenant, the fairness key above requests
    # (without keys: OpenAI's `user` field, else one anonymous tenant)
    api_keys: SecretStr | None = None

    # the engine worker
    scheduler: Literal["continuous", "static"] = "continuous"  # step-level or whole batches
    max_batch_size: int = Field(16, ge=1, description="images per batch")
    # continuous: who runs each step (service/core/policies.py, docs/SERVING.md#fairness)
    scheduling_policy: Literal["fifo", "fair", "deadline"] = "fair"
    pause_rows: int | None = Field(
        None, ge=0, description="pool slots for paused rows beyond max_batch_size "
        "(default: max_batch_size; fifo: 0, it never pauses)")  # fmt: skip
    aging_s: float = Field(10.0, gt=0, description="deadline: a waiting request's priority "
                           "improves by one every aging_s seconds")  # fmt: skip
    max_wait_ms: float = Field(10.0, ge=0, description="static: how long a batch waits to fill")
    queue_size: int = Field(64, ge=1, description="waiting requests before 503")
    tenant_queue_size: int | None = Field(
        None, ge=1, description="waiting requests per tenant before 429 (default: no limit "
        "beyond queue_size)")  # fmt: skip
    request_timeout_s: float = Field(120.0, gt=0, description="deadline per request")
    retry_after_s: int = Field(1, ge=1, description="least Retry-After on 503")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM: queued requests get 503, running ones this long"
    )
    max_body_bytes: int = Field(16384, ge=256, description="largest POST body (else 413)")
    warmup: bool = True  # a probe generation before /readyz turns 200
    warmup_steps: int | Literal["auto", "all"] = Field(
        "auto", description="steps of the warm-up batch: 'all' runs every row to its end, so "
        "units built on first use (CUDA graphs of the pool's passes, annealed head plans) "
        "are built before the first request; 'auto': 'all' where units are CUDA graphs, "
        "else 3")  # fmt: skip
    preview_every: int = Field(4, ge=1, description="stream a preview every N steps")

    # decoding defaults (a request may choose mode; the MARché knobs are per server)
    default_mode: Literal[MODES] = "marche"
    marche_budget: int = Field(64, ge=1)
    marche_selection_layer: int = Field(2, ge=1)
    marche_refresh_period: int = Field(3, ge=1)
    marche_encoder: Literal["cache", "full"] = "cache"

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_steps(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("warmup_steps is 'auto', 'all' or at least 1")
        return value

    @field_validator("head_buckets", "pass_buckets")
    @classmethod
    def _buckets(cls, value: str) -> str:
        return value if value == "auto" else ",".join(map(str, parse_buckets(value)))

    @field_validator("api_key", "api_keys", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def keys(self) -> list[str]:
        """Every key the generation routes accept (`api_key`, then `api_keys`)."""
        keys = [self.api_key.get_secret_value()] if self.api_key else []
        more = self.api_keys.get_secret_value().split(",") if self.api_keys else []
        return keys + [k.strip() for k in more if k.strip()]

    def marche_config(self) -> MarcheConfig:
        return MarcheConfig(
            budget=self.marche_budget,
            selection_layer=self.marche_selection_layer,
            refresh_period=self.marche_refresh_period,
            encoder=self.marche_encoder,
        )
