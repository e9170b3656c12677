"""The engine as the continuous scheduler sees it: rows that join, step and leave.

`RowEngine` is the interface (tests drive the scheduler with a fake); `PipelineRows` is the
real one, over a pipeline's step engine and its cache slot pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch.nn.functional as F

from engine.decode.marche import MarcheConfig
from engine.decode.policy import preset
from engine.images import images_to_uint8
from engine.pipeline import Pipeline
from service.core.jobs import Job


class RowEngine(Protocol):
    """The engine as the continuous scheduler sees it: rows that join, step and leave."""

    capacity: int  # rows that fit at once

    def admit(self, job: Job, images: Sequence[int]) -> list[Any]:
        """One new row (at its step 0) per image of `job` in `images` (indices into
        `job.seeds`), each in a slot of its own."""
        ...

    def step(self, rows: Sequence[Any]) -> None:
        """Advance every row one step of its own run."""
        ...

    def release(self, rows: Sequence[Any]) -> None: ...

    def finished(self, row: Any) -> bool: ...

    def progress(self, row: Any) -> tuple[int, int, int, int]:
        """(step, total steps, tokens done, tokens) of a row."""
        ...

    def active_fraction(self, row: Any) -> float:
        """The row's active-token fraction in its last step (1.0 on full steps)."""
        ...

    def images(self, rows: Sequence[Any]) -> np.ndarray:
        """uint8 (n, H, W, C) images of finished rows."""
        ...

    def preview(self, row: Any) -> np.ndarray:
        """uint8 (h, w, C) partial image, at most 64 px."""
        ...


class PipelineRows:
    """`RowEngine` over a pipeline's step engine: the cache pool is allocated once here."""

    def __init__(self, pipeline: Pipeline, capacity: int, marche: MarcheConfig) -> None:
        self.pipeline, self.capacity, self.marche = pipeline, capacity, marche
        self.engine = pipeline.step_engine(capacity)

    def admit(self, job: Job, images: Sequence[int]) -> list[Any]:
        config = preset(job.mode, self.marche)
        return [
            self.pipeline.admit(self.engine, job.class_id, job.seeds[i], job.params, config)
            for i in images
        ]

    def step(self, rows: Sequence[Any]) -> None:
        self.pipeline.step(self.engine, rows)

    def release(self, rows: Sequence[Any]) -> None:
        for row in rows:
            self.engine.release(row)

    def finished(self, row: Any) -> bool:
        return row.finished

    def progress(self, row: Any) -> tuple[int, int, int, int]:
        step = row.steps[row.done - 1].index + 1 if row.done else 0
        return step, row.num_steps, row.tokens_done, len(row.order)

    def active_fraction(self, row: Any) -> float:
        return row.active[-1]

    def images(self, rows: Sequence[Any]) -> np.ndarray:
        return images_to_uint8(self.pipeline.decode(self.engine.tokens(rows)))

    def preview(self, row: Any) -> np.ndarray:
        return preview(self.pipeline, self.engine.tokens([row]))


def preview(pipeline: Pipeline, tokens) -> np.ndarray:
    """uint8 (h, w, C) of a partial image (1, L, C), at most 64 px (unknown tokens are 0)."""
    image = pipeline.decode(tokens)  # (1, C, H, W)
    if image.shape[-1] > 64:
        image = F.interpolate(image, size=(64, 64), mode="area")
    return images_to_uint8(image)[0]
