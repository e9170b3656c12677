"""An engine client that answers at once: the HTTP layer's tests without a model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from service.core.client import EngineRequest
from service.core.jobs import JobResult


class StubEngine:
    """A model's facts and instant answers; `fail` makes every job raise it."""

    def __init__(self, model: str = "digits", size: int = 32, classes: int = 10) -> None:
        self.model, self.size, self.classes = model, size, classes
        self.fail: Exception | None = None
        self.requests: list[EngineRequest] = []

    async def info(self) -> dict[str, Any]:
        return {"model": self.model, "num_classes": self.classes, "image_size": self.size,
                "labels": [str(i) for i in range(self.classes)],
                "defaults": {"steps": 8, "cfg": 3.0, "cfg_schedule": "linear",
                             "temperature": 1.0}}  # fmt: skip

    async def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    async def generate(self, request: EngineRequest) -> JobResult:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        images = np.full((len(request.seeds), self.size, self.size, 3), 7, np.uint8)
        return JobResult(images, request.seeds, 0.01, 0.02, len(request.seeds))

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        yield {"accepted": True}
        yield {"step": 1, "total": 1, "tokens_done": 64, "seq_len": 64}
        yield {"result": await self.generate(request)}
