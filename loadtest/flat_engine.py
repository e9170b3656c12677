"""The service on a synthetic engine whose step time is flat in rows (a GPU at moderate batch):
the real HTTP app, worker and continuous scheduler, only the engine's arithmetic replaced by a
sleep, so the scheduler is measured in the regime it was built for (`loadbench --engine flat`).

    python -m loadtest.flat_engine --port 8123 [--base-ms 57 --per-row-ms 0.89]

The curve, t(rows) = base + per_row × (rows − 1), comes from the H200 measurement of MAR-B
(docs/BENCHMARKS.md, bf16, 64 steps): with CUDA graphs a batch-1 step takes 3.67 s / 64 = 57 ms;
eager, a step takes 13.38 s / 64 = 0.209 s at batch 1 and 0.161 s/image × 128 / 64 = 0.322 s at
batch 128, i.e. 0.89 ms more per extra row. At 16 rows: 57 → 70 ms, nearly flat. (On this CPU a
digits step grows about linearly with its rows instead.) Images are blank, of the served
model's size; progress events and previews are real.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.pipeline import MODELS
from service.core.jobs import Job
from service.core.policies import make_policy, pool_rows


@dataclass(eq=False)
class FlatRow:
    steps: int
    done: int = 0


class FlatRows:
    """A `RowEngine` whose step sleeps t(rows) (the module's curve)."""

    def __init__(
        self, capacity: int, base_s: float, per_row_s: float, shape: tuple[int, int, int]
    ) -> None:
        self.capacity, self.base_s, self.per_row_s, self.shape = capacity, base_s, per_row_s, shape

    def step_s(self, rows: int) -> float:
        return self.base_s + self.per_row_s * max(0, rows - 1)

    def admit(self, job: Job, images: Sequence[int]) -> list[FlatRow]:
        return [FlatRow(job.params.num_iter) for _ in images]

    def step(self, rows: Sequence[FlatRow]) -> None:
        time.sleep(self.step_s(len(rows)))
        for row in rows:
            row.done += 1

    def release(self, rows: Sequence[FlatRow]) -> None:
        pass

    def finished(self, row: FlatRow) -> bool:
        return row.done >= row.steps

    def progress(self, row: FlatRow) -> tuple[int, int, int, int]:
        return row.done, row.steps, row.done, row.steps

    def active_fraction(self, row: FlatRow) -> float:
        return 1.0

    def images(self, rows: Sequence[FlatRow]) -> np.ndarray:
        return np.zeros((len(rows), *self.shape), np.uint8)

    def preview(self, row: FlatRow) -> np.ndarray:
        return np.zeros(self.shape, np.uint8)


def image_shape(model: str) -> tuple[int, int, int]:
    config = MODELS[model].config
    channels = config.vae_embed_dim if config.tokenizer == "pixels" else 3
    return config.img_size, config.img_size, channels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--base-ms", type=float, default=57.0)
    parser.add_argument("--per-row-ms", type=float, default=0.89)
    args = parser.parse_args(argv)
    import uvicorn

    from service.http.app import build_app
    from service.settings import ServiceSettings

    settings = ServiceSettings()  # MARCHE_* as for `marche serve` (the loadbench sets them)
    policy = make_policy(settings.scheduling_policy, settings.aging_s)
    capacity = pool_rows(settings.max_batch_size, policy, settings.pause_rows)
    rows: Any = FlatRows(capacity, args.base_ms / 1000, args.per_row_ms / 1000,
                         image_shape(settings.model))  # fmt: skip
    app = build_app(settings, rows=rows)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
