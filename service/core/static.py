"""Run-to-completion batches: the `static` scheduler (`MARCHE_SCHEDULER=static`).

`StaticScheduler` gathers a batch of compatible jobs (same steps and mode), runs the batch
sampler on it to the end, and only then looks at the queue again. It shares the worker's
`JobQueue` with the HTTP side, as the continuous scheduler does.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, make_policy
from engine.decode.sampler import StepInfo
from engine.images import images_to_uint8
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.core.jobs import EngineError, Job, JobResult
from service.core.queue import JobQueue
from service.core.rows import preview

log = logging.getLogger("marche.worker")


class StaticScheduler:
    def __init__(
        self, queue: JobQueue, pipeline: Pipeline, marche: MarcheConfig, preview_every: int = 4
    ) -> None:
        self.queue, self.pipeline, self.marche = queue, pipeline, marche
        self.preview_every = preview_every

    def warmup(self, params: SamplingParams, steps: int | None = 3) -> None:
        """One small generation per mode (allocates, and on CUDA picks kernels), then the
        first `steps` steps of a `max_batch_size` batch of `params` in exact MAR (the costliest
        mode: a cautious first step-time estimate for the queue). Each static batch runs in a
        step engine of its own, so a whole run (`steps` None) would build nothing a batch
        keeps: None means 3 here."""
        steps = 3 if steps is None else steps
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
        for job in batch:
            q.record_wait(job, started - job.enqueued_at)
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
                job.image_steps_done = len(job.seeds) * (info.step + 1)
                tokens = info.tokens[row : row + 1]
                job.report(info.step + 1, info.num_steps, info.tokens_done, info.seq_len,
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
