"""A request as the engine worker sees it, its limits, and how it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from engine.decode.policy import MODES, preset
from engine.model.config import SamplingParams

MAX_IMAGES = 16  # images per request
MAX_STEPS = 256
ANONYMOUS = "anonymous"  # the tenant of requests with no API key and no OpenAI `user`
MAX_PRIORITY = 10  # priorities run from -10 (first) to 10; bounded, as a metric label
MAX_SEED = 2**53 - 1  # exact in a JSON number (an IEEE double): schema-valid seeds stay valid
Mode = Literal[MODES]  # the engine's presets: mar, marche, turbo, quality, fast


class QueueFull(Exception):
    """The waiting queue is at capacity (or the engine is stopping): answer 503 with
    Retry-After = `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # keeps retry_after across processes (Ray)
        return (QueueFull, (str(self), self.retry_after))


class TenantBusy(QueueFull):
    """The request's tenant has `tenant_queue_size` requests waiting: answer 429 with
    Retry-After (a `QueueFull`, so the Ray ingress tries another replica first)."""

    def __reduce__(self):
        return (TenantBusy, (str(self), self.retry_after))


class JobCancelled(Exception):
    """The job was dropped before finishing; `reason` is "disconnected" or "deadline"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request cancelled: {reason}")
        self.reason = reason

    def __reduce__(self):  # keeps reason across processes (Ray)
        return (JobCancelled, (self.reason,))


class EngineError(Exception):
    """The batch this job ran in failed."""


@dataclass
class JobResult:
    images: np.ndarray  # uint8 (n, H, W, C)
    seeds: list[int]
    queue_s: float
    generation_s: float
    batch_size: int  # images in the engine batch


@dataclass(eq=False)
class Job:
    """One HTTP request: `len(seeds)` images of one class with shared sampling params."""

    class_id: int
    seeds: list[int]
    params: SamplingParams
    mode: str
    deadline: float  # time.monotonic() after which the job is dropped
    request_id: str = ""
    tenant: str = ANONYMOUS  # the fairness key above requests: a hashed key or OpenAI user
    priority: int = 0  # lower runs first under the deadline policy (vLLM's convention)
    # called from the worker thread with progress/preview events (streaming requests)
    on_event: Callable[[dict[str, Any]], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancel_reason: str | None = None
    started_at: float | None = None  # when its first image was admitted (continuous)
    image_steps_done: int = 0  # decoding steps taken, summed over its images
    admitted: int = 0  # continuous: its images admitted so far (seeds[:admitted])
    position: int | None = None  # its place in the queue, as last told to its stream
    images: dict[int, np.ndarray] = field(default_factory=dict)  # finished, by image index
    closed: bool = False  # answered or dropped (counted once, whatever the future's state)

    @property
    def steps(self) -> int:
        """AR steps each of its images takes (its mode may take fewer than `num_iter`: GtR)."""
        return preset(self.mode).num_steps(self.params.num_iter)

    @property
    def work_left(self) -> int:
        """Image-steps still to run: images × steps not yet taken (the unit of engine work)."""
        return max(0, len(self.seeds) * self.steps - self.image_steps_done)

    @property
    def key(self) -> tuple[int, str]:
        """Jobs with equal keys can share a batch."""
        return (self.params.num_iter, self.mode)

    def fail(self, exc: Exception) -> bool:
        """Close the job with `exc`; False if it was closed already. The future may already
        be cancelled by its awaiting side (asyncio cancels it when the client goes away)."""
        if self.closed:
            return False
        self.closed = True
        if not self.future.done():
            self.future.set_exception(exc)
        return True

    def succeed(self, result: JobResult) -> bool:
        if self.closed:
            return False
        self.closed = True
        if not self.future.done():
            self.future.set_result(result)
        return True

    def report(
        self,
        step: int,
        total: int,
        tokens_done: int,
        seq_len: int,
        preview: Callable[[], np.ndarray] | None,
        preview_every: int,
    ) -> None:
        """Tell a streaming job about a step (with a small preview every `preview_every`)."""
        if self.on_event is None:
            return
        event: dict[str, Any] = {
            "step": step,
            "total": total,
            "tokens_done": tokens_done,
            "seq_len": seq_len,
        }
        if preview is not None and step < total and step % preview_every == 0:
            event["preview"] = preview()
        self.on_event(event)
