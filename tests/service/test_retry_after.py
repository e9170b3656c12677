"""Retry-After tells the truth from the first second: a 503's Retry-After is the wait a request
accepted now would see, step time × ceil(image-steps ahead / rows per step), from the warm-up's
step time when nothing has completed yet (cold), then from a moving average of the steps (warm).
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from engine.model.config import SamplingParams
from service.core.jobs import Job, QueueFull
from service.core.queue import JobQueue, StepTime
from service.core.worker import EngineWorker
from tests.service.test_scheduler import FakeRows

WARMUP = SamplingParams(num_iter=8, cfg=1.0)


def job(images: int, steps: int) -> Job:
    params = SamplingParams(num_iter=steps, cfg=1.0)
    return Job(1, list(range(images)), params, "marche", time.monotonic() + 60)


def test_step_time_is_the_first_measurement_then_a_moving_average():
    clock = StepTime(alpha=0.5)
    assert clock.seconds is None
    clock.observe(2.0)
    assert clock.seconds == 2.0
    clock.observe(1.0)
    assert clock.seconds == 1.5
    clock.observe(1.0)
    assert clock.seconds == 1.25


def test_the_queue_counts_work_in_image_steps_and_estimates_the_wait():
    queue = JobQueue(queue_size=2, max_batch_size=4, max_wait_s=0.0, retry_after_s=1)
    assert queue.expected_wait_s() is None and queue.retry_after_s() == 1  # nothing timed yet
    running, waiting = job(4, 32), job(2, 16)
    running.image_steps_done = 4 * 8
    queue.running[running] = None
    queue.submit(waiting)
    assert queue.image_steps() == 4 * (32 - 8) + 2 * 16  # 128 image-steps ahead
    queue.step_time.observe(0.5)
    assert queue.expected_wait_s() == 0.5 * math.ceil(128 / 4)  # 32 steps of 0.5 s
    assert queue.retry_after_s() == 16
    queue.step_time.observe(0.5 + 100 * 5)  # a huge step: the answer stays within 10 minutes
    assert queue.retry_after_s() == 600
    queue.submit(job(1, 1))
    with pytest.raises(QueueFull) as refused:
        queue.submit(job(1, 1))
    assert refused.value.retry_after == 600


def started_worker(delay: float, policy: str = "fifo") -> tuple[EngineWorker, FakeRows]:
    rows = FakeRows(capacity=4)  # fair: no room for paused rows
    rows.delay = delay
    worker = EngineWorker(
        None, rows=rows, max_batch_size=4, queue_size=2, retry_after_s=1, warmup_params=WARMUP,
        policy=policy, pause_rows=0,
    )  # fmt: skip
    worker.start(warmup=True)
    deadline = time.monotonic() + 10
    while not worker.ready:
        assert time.monotonic() < deadline and worker.last_error is None, worker.last_error
        time.sleep(0.01)
    return worker, rows


def refuse(worker: EngineWorker) -> QueueFull:
    with pytest.raises(QueueFull) as refused:
        worker.submit(job(1, 1))
    return refused.value


def test_a_cold_server_answers_the_real_wait_not_one_second():
    """Nothing has completed yet: the estimate comes from the warm-up's full-width step."""
    worker, rows = started_worker(delay=0.2)
    try:
        step_s = worker.queue.step_time.seconds
        assert step_s is not None and step_s >= 0.2  # timed at warm-up
        rows.gate = threading.Event()  # hold the engine in the first step of the first job
        first = job(4, 32)
        worker.submit(first)
        time.sleep(0.1)  # admitted: running, its first step held
        for _ in range(2):
            worker.submit(job(4, 32))
        ahead = 3 * 4 * 32  # 384 image-steps, 4 rows per step: 96 steps
        retry = refuse(worker).retry_after
        assert retry == math.ceil(step_s * math.ceil(ahead / 4))
        assert retry >= 20  # 96 steps of at least 0.2 s; the old estimate said 1 s here
        rows.gate.set()
        assert first.future.result(60).images.shape[0] == 4
    finally:
        if rows.gate is not None:
            rows.gate.set()
        worker.stop(60)


def test_fair_retry_after_is_the_wait_for_a_slot_not_for_all_the_work():
    """Fair: a request starts once it has a slot, whatever the work of the others; with the
    pool full (4 rows of 32 steps) and two requests waiting, the third one's slot frees when
    the running rows finish: 32 steps, not fifo's 96."""
    worker, rows = started_worker(delay=0.2, policy="fair")
    try:
        step_s = worker.queue.step_time.seconds
        rows.gate = threading.Event()
        first = job(4, 32)
        worker.submit(first)
        time.sleep(0.1)
        for _ in range(2):
            worker.submit(job(4, 32))
        retry = refuse(worker).retry_after
        assert retry == math.ceil(step_s * 32)
        assert worker.queue.expected_wait_s(worker.queue.waiting[0]) == pytest.approx(step_s * 32)
    finally:
        if rows.gate is not None:
            rows.gate.set()
        worker.stop(60)


def test_a_warm_server_follows_the_steps_it_measured():
    """After steps faster than the warm-up's, the moving average and Retry-After follow them."""
    worker, rows = started_worker(delay=0.2)
    try:
        cold = worker.queue.step_time.seconds
        rows.delay = 0.01
        done = job(1, 30)
        worker.submit(done)
        done.future.result(30)
        warm = worker.queue.step_time.seconds
        assert warm < cold / 4  # 30 steps of ~0.01 s pulled the average down from >= 0.2 s
        rows.gate = threading.Event()
        worker.submit(job(4, 32))
        time.sleep(0.1)
        for _ in range(2):
            worker.submit(job(4, 32))
        step_s = worker.queue.step_time.seconds  # no step ends while the gate is shut
        assert refuse(worker).retry_after == max(1, math.ceil(step_s * 96))
    finally:
        if rows.gate is not None:
            rows.gate.set()
        worker.stop(60)
