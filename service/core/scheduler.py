"""The worker's two schedulers: step-level continuous batching, and run-to-completion batches.

Both run on the worker thread and share its queue, cancellation and metrics (`EngineWorker`).

`ContinuousScheduler` is the per-step core, as vLLM v1's: **schedule** (retire finished and
cancelled jobs, free their slots, admit waiting jobs FIFO while their images fit), **execute**
(one engine step over every running row, wherever each row is), **update** (resolve finished
jobs, report progress). A job waiting at the head of the queue is never overtaken, so a large
`num_images` request is not starved by small ones: it waits for enough free rows. It talks to
the engine through `RowEngine` (the real one: `PipelineRows`), so it is tested with a fake.

`StaticScheduler` gathers a batch of compatible jobs (same steps and mode), runs the batch
sampler on it to the end, and only then looks at the queue again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch.nn.functional as F

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, make_policy, preset
from engine.decode.sampler import StepInfo
from engine.images import images_to_uint8
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.jobs import EngineError, Job, JobResult

if TYPE_CHECKING:
    from service.worker import EngineWorker

log = logging.getLogger("marche.worker")


class RowEngine(Protocol):
    """The engine as the continuous scheduler sees it: rows that join, step and leave."""

    capacity: int  # rows that fit at once

    def admit(self, job: Job) -> list[Any]:
        """One new row per image of `job` (at its step 0)."""
        ...

    def step(self, rows: Sequence[Any]) -> None:
        """Advance every row one step of its own plan."""
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

    def admit(self, job: Job) -> list[Any]:
        config = preset(job.mode, self.marche)
        return [
            self.pipeline.admit(self.engine, job.class_id, seed, job.params, config)
            for seed in job.seeds
        ]

    def step(self, rows: Sequence[Any]) -> None:
        self.pipeline.step(self.engine, rows)

    def release(self, rows: Sequence[Any]) -> None:
        for row in rows:
            self.engine.release(row)

    def finished(self, row: Any) -> bool:
        return row.finished

    def progress(self, row: Any) -> tuple[int, int, int, int]:
        step = row.plan[row.done - 1].index + 1 if row.done else 0
        return step, row.params.num_iter, row.tokens_done, len(row.order)

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


class ContinuousScheduler:
    def __init__(self, worker: EngineWorker, rows: RowEngine) -> None:
        self.worker, self.rows = worker, rows

    def warmup(self) -> None:
        """One 2-step row per mode in one batch: allocates the cache pool, picks kernels."""
        params = SamplingParams(num_iter=2, cfg=2.0)
        jobs = [Job(0, [0], params, mode, float("inf")) for mode in MODES]
        rows = [row for job in jobs for row in self.rows.admit(job)]
        while not all(self.rows.finished(r) for r in rows):
            self.rows.step(rows)
        self.rows.images(rows)
        self.rows.release(rows)

    def run(self) -> None:
        w = self.worker
        running: dict[Job, list[Any]] = w._running  # job -> its rows, in admission order
        while True:
            # 1. schedule: retire cancelled / expired jobs, admit waiting ones into free rows
            with w._cond:
                now = time.monotonic()
                for job in [j for j in running if not w._wanted(j, now)]:
                    self.rows.release(running.pop(job))
                    w._drop(job)
                if w._stopping and not running:
                    return
                w._expire_waiting()
                self._admit(running, now)
                w._publish_state()
                if not running:
                    w._wait_for_work()
                    continue
            # 2. execute: one step for every running row
            batch = [row for rows in running.values() for row in rows]
            started = time.monotonic()
            try:
                self.rows.step(batch)
            except Exception as exc:  # noqa: BLE001 - fail the step's jobs, keep serving
                log.exception("a step of %d rows failed", len(batch))
                with w._cond:
                    for job, rows in list(running.items()):
                        self.rows.release(rows)
                        job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                    running.clear()
                continue
            # 3. update: metrics, finished jobs, progress
            self._observe_step(running, batch, time.monotonic() - started)
            for job, rows in list(running.items()):
                if job.on_event is not None:
                    step, total, done, seq_len = self.rows.progress(rows[0])
                    w.progress(
                        job, step, total, done, seq_len, lambda r=rows[0]: self.rows.preview(r)
                    )
                if all(self.rows.finished(r) for r in rows):
                    self._finish(job, rows, len(batch))
                    with w._cond:
                        running.pop(job)
                        self.rows.release(rows)

    def _admit(self, running: dict[Job, list[Any]], now: float) -> None:
        """FIFO: the head of the queue joins while its images fit (never overtaken)."""
        w = self.worker
        in_flight = sum(len(rows) for rows in running.values())
        mid_flight = bool(running)  # joining rows that are already decoding
        limit = min(w.max_batch_size, self.rows.capacity)
        while w._waiting and not w._stopping:
            job = w._waiting[0]
            if len(job.seeds) > self.rows.capacity:  # can never fit: say so, don't block
                w._waiting.popleft()
                job.fail(EngineError(f"{len(job.seeds)} images exceed the engine's "
                                     f"{self.rows.capacity} rows"))  # fmt: skip
                continue
            if in_flight + len(job.seeds) > limit and running:
                break  # FIFO: wait for rows to free up (an idle engine takes it anyway)
            w._waiting.popleft()
            try:
                rows = self.rows.admit(job)
            except Exception as exc:  # noqa: BLE001 - e.g. a class id this model lacks
                job.fail(EngineError(f"admission failed: {type(exc).__name__}: {exc}"))
                continue
            job.started_at = now
            if w.metrics:
                w.metrics.admitted(job.mode, len(rows), now - job.enqueued_at, mid_flight)
            running[job] = rows
            in_flight += len(rows)

    def _observe_step(self, running: dict[Job, list[Any]], batch: list[Any], seconds: float):
        metrics = self.worker.metrics
        if metrics is None:
            return
        metrics.occupancy(len(batch))
        by_mode: dict[str, list[float]] = {}
        for job, rows in running.items():
            by_mode.setdefault(job.mode, []).extend(self.rows.active_fraction(r) for r in rows)
        for mode, fractions in by_mode.items():
            metrics.step(mode, seconds)
            metrics.batch_size(mode, len(fractions))
            metrics.active_fractions(mode, [sum(fractions) / len(fractions)])

    def _finish(self, job: Job, rows: list[Any], batch_size: int) -> None:
        try:
            images = self.rows.images(rows)
        except Exception as exc:  # noqa: BLE001 - the VAE failed for this job only
            log.exception("decoding %d images failed", len(rows))
            job.fail(EngineError(f"decoding failed: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        started = job.started_at or job.enqueued_at
        result = JobResult(images, job.seeds, started - job.enqueued_at, now - started, batch_size)
        if job.succeed(result):
            self.worker.note_images(len(rows))
            if self.worker.metrics:
                self.worker.metrics.images(job.mode, len(rows))


class StaticScheduler:
    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def warmup(self) -> None:
        """One small generation per mode (allocates, and on CUDA picks kernels)."""
        params = SamplingParams(num_iter=2, cfg=2.0)
        for mode in MODES:
            policy = make_policy(mode, self.worker.marche)
            self.worker.pipeline.generate([0], [0], params=params, policy=policy)

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready: full, or the oldest job waited max_wait."""
        w = self.worker
        with w._cond:
            while True:
                if w._stopping:
                    return None
                w._expire_waiting()
                if not w._waiting:
                    w._wait_for_work()
                    continue
                batch = self._compatible(w._waiting[0])
                size = sum(len(j.seeds) for j in batch)
                wait = w._waiting[0].enqueued_at + w.max_wait_s - time.monotonic()
                if size >= w.max_batch_size or wait <= 0:
                    for job in batch:
                        w._waiting.remove(job)
                    w._running.update((job, None) for job in batch)
                    w._publish_state()
                    return batch
                w._cond.wait(timeout=wait)

    def _compatible(self, first: Job) -> list[Job]:
        """First-come jobs sharing `first`'s key, up to max_batch_size images."""
        batch, size = [first], len(first.seeds)
        for job in self.worker._waiting:
            if job is not first and job.key == first.key:
                if size + len(job.seeds) > self.worker.max_batch_size:
                    break
                batch.append(job)
                size += len(job.seeds)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        w = self.worker
        mode, started = batch[0].mode, time.monotonic()
        owners = [job for job in batch for _ in job.seeds]  # row -> job
        if w.metrics:
            w.metrics.batch_started(mode, len(owners), [started - j.enqueued_at for j in batch])
        policy = make_policy(mode, w.marche)
        last = started

        def on_step(info: StepInfo) -> list[bool] | None:
            nonlocal last, owners
            now = time.monotonic()
            if w.metrics:
                w.metrics.step(mode, now - last)
                w.metrics.occupancy(len(owners))
            last = now
            row = 0
            for job in dict.fromkeys(owners):
                tokens = info.tokens[row : row + 1]
                w.progress(job, info.step + 1, info.num_iter, info.tokens_done, info.seq_len,
                           lambda t=tokens: preview(w.pipeline, t))  # fmt: skip
                row += len(job.seeds)
            keep = [w._wanted(job, now) for job in owners]
            if all(keep):
                return None
            for job in {j for j, k in zip(owners, keep, strict=True) if not k}:
                w._drop(job)
            owners = [j for j, k in zip(owners, keep, strict=True) if k]
            return keep

        try:
            tokens = w.pipeline.generate_tokens(
                [j.class_id for j in owners],
                [s for j in batch for s in j.seeds],
                params=[j.params for j in owners],
                policy=policy,
                on_step=on_step,
            )
            images = images_to_uint8(w.pipeline.decode(tokens)) if len(owners) else None
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            log.exception("batch of %d images failed", len(owners))
            for job in batch:
                job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            self._finish_batch()
            return
        elapsed = time.monotonic() - started
        if w.metrics:
            w.metrics.active_fractions(mode, policy.stats)
        row = 0
        for job in dict.fromkeys(owners):  # surviving jobs, in row order
            n = len(job.seeds)
            result = JobResult(
                images[row : row + n], job.seeds, started - job.enqueued_at, elapsed, len(owners)
            )
            row += n
            if job.succeed(result):
                w.note_images(n)
                if w.metrics:
                    w.metrics.images(mode, n)
        self._finish_batch()

    def _finish_batch(self) -> None:
        with self.worker._cond:
            self.worker._running.clear()
            self.worker._publish_state()
