"""The worker's two schedulers: step-level continuous batching, and run-to-completion batches.

Both run on the worker thread and share its `JobQueue` (waiting and running jobs,
cancellation, metrics) with the HTTP side.

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
from functools import partial
from typing import Any

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, make_policy
from engine.decode.sampler import StepInfo
from engine.images import images_to_uint8
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.core.jobs import EngineError, Job, JobResult
from service.core.queue import JobQueue
from service.core.rows import RowEngine, preview

log = logging.getLogger("marche.worker")


class ContinuousScheduler:
    def __init__(self, queue: JobQueue, rows: RowEngine, preview_every: int = 4) -> None:
        self.queue, self.rows, self.preview_every = queue, rows, preview_every

    def warmup(self, params: SamplingParams, steps: int = 3) -> None:
        """The first `steps` steps of `max_batch_size` rows of `params` (the model's defaults),
        the modes in turn, then one image decoded: allocates the cache pool, picks kernels and
        times a full-width serving step, the queue's first step-time estimate. (A 2-step run
        would predict every token in two steps: far heavier steps than serving ones.)"""
        width = min(self.queue.max_batch_size, self.rows.capacity)
        jobs = [Job(0, [i], params, MODES[i % len(MODES)], float("inf")) for i in range(width)]
        rows = [row for job in jobs for row in self.rows.admit(job)]
        for _ in range(max(1, min(steps, params.num_iter))):
            started = time.monotonic()
            self.rows.step(rows)
            seconds = time.monotonic() - started
        self.queue.step_time.observe(seconds)  # the last one: kernels picked, pool warm
        self.rows.images(rows[:1])
        self.rows.release(rows)

    def run(self) -> None:
        q = self.queue
        running: dict[Job, list[Any]] = q.running  # job -> its rows, in admission order
        while True:
            # 1. schedule: retire cancelled / expired jobs, admit waiting ones into free rows
            with q.cond:
                now = time.monotonic()
                for job in [j for j in running if not q.wanted(j, now)]:
                    self.rows.release(running.pop(job))
                    q.drop(job)
                if q.stopping and not running:
                    return
                q.expire_waiting()
                self._admit(running, now)
                q.publish_state()
                if not running:
                    q.wait_for_work()
                    continue
            # 2. execute: one step for every running row
            batch = [row for rows in running.values() for row in rows]
            started = time.monotonic()
            try:
                self.rows.step(batch)
            except Exception as exc:  # noqa: BLE001 - fail the step's jobs, keep serving
                log.exception("a step of %d rows failed", len(batch))
                with q.cond:
                    for job, rows in list(running.items()):
                        self.rows.release(rows)
                        job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                    running.clear()
                continue
            # 3. update: metrics, finished jobs, progress
            seconds = time.monotonic() - started
            q.step_time.observe(seconds)
            self._observe_step(running, batch, seconds)
            for job, rows in list(running.items()):
                job.steps_done += 1
                if job.on_event is not None:
                    step, total, done, seq_len = self.rows.progress(rows[0])
                    preview = partial(self.rows.preview, rows[0])
                    job.report(step, total, done, seq_len, preview, self.preview_every)
                if all(self.rows.finished(r) for r in rows):
                    self._finish(job, rows, len(batch))
                    with q.cond:
                        running.pop(job)
                        self.rows.release(rows)

    def _admit(self, running: dict[Job, list[Any]], now: float) -> None:
        """FIFO: the head of the queue joins while its images fit (never overtaken)."""
        q = self.queue
        in_flight = sum(len(rows) for rows in running.values())
        mid_flight = bool(running)  # joining rows that are already decoding
        limit = min(q.max_batch_size, self.rows.capacity)
        while q.waiting and not q.stopping:
            job = q.waiting[0]
            if len(job.seeds) > self.rows.capacity:  # can never fit: say so, don't block
                q.waiting.popleft()
                job.fail(EngineError(f"{len(job.seeds)} images exceed the engine's "
                                     f"{self.rows.capacity} rows"))  # fmt: skip
                continue
            if in_flight + len(job.seeds) > limit and running:
                break  # FIFO: wait for rows to free up (an idle engine takes it anyway)
            q.waiting.popleft()
            try:
                rows = self.rows.admit(job)
            except Exception as exc:  # noqa: BLE001 - e.g. a class id this model lacks
                job.fail(EngineError(f"admission failed: {type(exc).__name__}: {exc}"))
                continue
            job.started_at = now
            if q.metrics:
                q.metrics.admitted(job.mode, len(rows), now - job.enqueued_at, mid_flight)
            running[job] = rows
            in_flight += len(rows)

    def _observe_step(self, running: dict[Job, list[Any]], batch: list[Any], seconds: float):
        metrics = self.queue.metrics
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
        if job.succeed(result) and self.queue.metrics:
            self.queue.metrics.images(job.mode, len(rows))


class StaticScheduler:
    def __init__(
        self, queue: JobQueue, pipeline: Pipeline, marche: MarcheConfig, preview_every: int = 4
    ) -> None:
        self.queue, self.pipeline, self.marche = queue, pipeline, marche
        self.preview_every = preview_every

    def warmup(self, params: SamplingParams, steps: int = 3) -> None:
        """One small generation per mode (allocates, and on CUDA picks kernels), then the
        first `steps` steps of a `max_batch_size` batch of `params` in exact MAR (the costliest
        mode: a cautious first step-time estimate for the queue)."""
        for mode in MODES:
            policy = make_policy(mode, self.marche)
            self.pipeline.generate([0], [0], params=SamplingParams(num_iter=2, cfg=2.0),
                                   policy=policy)  # fmt: skip
        width, times, last = self.queue.max_batch_size, [], time.monotonic()

        def on_step(info: StepInfo) -> list[bool] | None:
            nonlocal last
            now = time.monotonic()
            times.append(now - last)
            last = now
            return [False] * width if len(times) >= steps else None

        policy = make_policy("mar", self.marche)
        classes, seeds = [0] * width, list(range(width))
        self.pipeline.generate_tokens(classes, seeds, params=params, policy=policy, on_step=on_step)
        self.queue.step_time.observe(times[-1])

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready: full, or the oldest job waited max_wait."""
        q = self.queue
        with q.cond:
            while True:
                if q.stopping:
                    return None
                q.expire_waiting()
                if not q.waiting:
                    q.wait_for_work()
                    continue
                batch = self._compatible(q.waiting[0])
                size = sum(len(j.seeds) for j in batch)
                wait = q.waiting[0].enqueued_at + q.max_wait_s - time.monotonic()
                if size >= q.max_batch_size or wait <= 0:
                    for job in batch:
                        q.waiting.remove(job)
                    q.running.update((job, None) for job in batch)
                    q.publish_state()
                    return batch
                q.cond.wait(timeout=wait)

    def _compatible(self, first: Job) -> list[Job]:
        """First-come jobs sharing `first`'s key, up to max_batch_size images."""
        batch, size = [first], len(first.seeds)
        for job in self.queue.waiting:
            if job is not first and job.key == first.key:
                if size + len(job.seeds) > self.queue.max_batch_size:
                    break
                batch.append(job)
                size += len(job.seeds)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        q = self.queue
        mode, started = batch[0].mode, time.monotonic()
        owners = [job for job in batch for _ in job.seeds]  # row -> job
        if q.metrics:
            q.metrics.batch_started(mode, len(owners), [started - j.enqueued_at for j in batch])
        policy = make_policy(mode, self.marche)
        last = started

        def on_step(info: StepInfo) -> list[bool] | None:
            nonlocal last, owners
            now = time.monotonic()
            q.step_time.observe(now - last)
            if q.metrics:
                q.metrics.step(mode, now - last)
                q.metrics.occupancy(len(owners))
            last = now
            row = 0
            for job in dict.fromkeys(owners):
                job.steps_done = info.step + 1
                tokens = info.tokens[row : row + 1]
                job.report(info.step + 1, info.num_iter, info.tokens_done, info.seq_len,
                           partial(preview, self.pipeline, tokens), self.preview_every)  # fmt: skip
                row += len(job.seeds)
            keep = [q.wanted(job, now) for job in owners]
            if all(keep):
                return None
            for job in {j for j, k in zip(owners, keep, strict=True) if not k}:
                q.drop(job)
            owners = [j for j, k in zip(owners, keep, strict=True) if k]
            return keep

        try:
            tokens = self.pipeline.generate_tokens(
                [j.class_id for j in owners],
                [s for j in batch for s in j.seeds],
                params=[j.params for j in owners],
                policy=policy,
                on_step=on_step,
            )
            images = images_to_uint8(self.pipeline.decode(tokens)) if len(owners) else None
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            log.exception("batch of %d images failed", len(owners))
            for job in batch:
                job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            self._finish_batch()
            return
        elapsed = time.monotonic() - started
        if q.metrics:
            q.metrics.active_fractions(mode, policy.stats)
        row = 0
        for job in dict.fromkeys(owners):  # surviving jobs, in row order
            n = len(job.seeds)
            result = JobResult(
                images[row : row + n], job.seeds, started - job.enqueued_at, elapsed, len(owners)
            )
            row += n
            if job.succeed(result) and q.metrics:
                q.metrics.images(mode, n)
        self._finish_batch()

    def _finish_batch(self) -> None:
        with self.queue.cond:
            self.queue.running.clear()
            self.queue.publish_state()
