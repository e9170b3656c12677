"""The continuous scheduler with a fake engine: fifo's admission order, slot reuse,
cancellation mid-run, deadlines, a failing step failing only its rows, occupancy metrics
(every policy where it applies; the policies' own behaviour: test_policies.py)."""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from engine.model.config import SamplingParams
from service.core.policies import POLICIES
from service.core.worker import EngineError, EngineWorker, Job, JobCancelled
from service.metrics import Metrics, PrometheusBackend
from tests.service.test_api import metric_value


@dataclass(eq=False)
class FakeRow:
    job: Job
    seed: int
    steps: int
    done: int = 0


class FakeRows:
    """A `RowEngine` whose rows count steps; `gate` (if set) holds each step until opened."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.live = 0
        self.admitted: list[int] = []  # class ids, in admission order
        self.steps: list[list[int]] = []  # class ids of the rows of each step
        self.fail_when = lambda rows: False
        self.gate: threading.Event | None = None
        self.delay = 0.0  # seconds per step

    def admit(self, job: Job, images) -> list[FakeRow]:
        self.admitted.append(job.class_id)
        self.live += len(images)
        assert self.live <= self.capacity, "admitted past the pool"
        return [FakeRow(job, job.seeds[i], job.params.num_iter) for i in images]

    def step(self, rows) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.delay)
        self.steps.append([r.job.class_id for r in rows])
        if self.fail_when(rows):
            raise RuntimeError("boom")
        for r in rows:
            r.done += 1

    def release(self, rows) -> None:
        self.live -= len(rows)

    def finished(self, row: FakeRow) -> bool:
        return row.done == row.steps

    def progress(self, row: FakeRow):
        return row.done, row.steps, row.done, row.steps

    def active_fraction(self, row: FakeRow) -> float:
        return 1.0

    def images(self, rows) -> np.ndarray:
        return np.stack([np.full((2, 2, 1), r.seed, np.uint8) for r in rows])

    def preview(self, row: FakeRow) -> np.ndarray:
        return np.zeros((2, 2, 1), np.uint8)


def job(class_id: int, seeds: list[int], steps: int = 3, timeout: float = 30, **kw) -> Job:
    params = SamplingParams(num_iter=steps, cfg=1.0)
    return Job(class_id, seeds, params, "marche", time.monotonic() + timeout, **kw)


@pytest.fixture(params=["fifo"])
def fake(request):
    """A worker on 4 fake rows per step; fifo unless parametrized (`indirect`) with another
    policy, which gets 4 more slots for paused rows."""
    policy = request.param
    rows = FakeRows(capacity=4 if policy == "fifo" else 8)
    backend = PrometheusBackend()
    worker = EngineWorker(None, rows=rows, max_batch_size=4, metrics=Metrics(backend, "fake"),
                          policy=policy)  # fmt: skip
    worker.start(warmup=False)
    yield worker, rows, backend
    if rows.gate is not None:
        rows.gate.set()
    worker.stop(5)


def test_fifo_requests_join_at_step_boundaries_in_arrival_order(fake):
    worker, rows, backend = fake
    rows.gate = threading.Event()
    first = job(1, [10], steps=4)
    worker.submit(first)
    time.sleep(0.1)  # the first step of job 1 is being held
    later = [job(2, [20], steps=2), job(3, [30, 31], steps=1), job(4, [40, 41], steps=1)]
    for j in later:
        worker.submit(j)
    rows.gate.set()
    results = [j.future.result(5) for j in [first, *later]]
    assert rows.admitted == [1, 2, 3, 4]
    # step 1: job 1 alone; step 2: 2 and 3 joined (4 rows, the limit), job 4 waits; after
    # job 3 finishes, job 4 takes its two slots
    assert rows.steps[:3] == [[1], [1, 2, 3, 3], [1, 2, 4, 4]]
    assert [r.images[:, 0, 0, 0].tolist() for r in results] == [[10], [20], [30, 31], [40, 41]]
    assert all(max(len(s) for s in rows.steps) <= 4 for s in rows.steps)
    text = backend.render().decode()
    assert metric_value(text, "marche_admissions_total", mid_flight="true") == 3
    assert metric_value(text, "marche_step_rows_count") == len(rows.steps)
    assert rows.live == 0 and worker.counts() == (0, 0)


def test_fifo_a_large_request_is_not_starved_by_small_ones(fake):
    worker, rows, _ = fake
    rows.gate = threading.Event()
    worker.submit(job(1, [0, 1, 2], steps=3))
    time.sleep(0.1)
    big = job(2, [0, 1, 2, 3], steps=1)  # needs the whole pool
    small = [job(3 + i, [0], steps=1) for i in range(3)]
    worker.submit(big)
    for j in small:
        worker.submit(j)
    rows.gate.set()
    big.future.result(5)
    for j in small:
        j.future.result(5)
    assert rows.admitted == [1, 2, 3, 4, 5]  # the small ones did not overtake it


@pytest.mark.parametrize("fake", POLICIES, indirect=True)
def test_cancel_mid_run_frees_the_rows_before_the_next_step(fake):
    worker, rows, backend = fake
    victim = job(1, [0, 1], steps=6)
    mate = job(2, [5], steps=6)

    def on_event(event):
        if event.get("step") == 2:
            worker.cancel(victim, "disconnected")

    victim.on_event = on_event
    worker.submit(victim)
    worker.submit(mate)
    assert mate.future.result(5).images.shape[0] == 1
    with pytest.raises(JobCancelled):
        victim.future.result(1)
    victim_steps = [s.count(1) for s in rows.steps]
    assert victim_steps[:2] == [2, 2] and not any(victim_steps[2:])
    text = backend.render().decode()
    assert metric_value(text, "marche_cancellations_total", reason="disconnected") == 1
    assert rows.live == 0


@pytest.mark.parametrize("fake", POLICIES, indirect=True)
def test_a_deadline_drops_a_running_request(fake):
    worker, rows, backend = fake
    rows.delay = 0.02
    late = job(1, [0], steps=100, timeout=0.3)  # needs 2 s
    on_time = job(2, [0], steps=5)
    worker.submit(late)
    worker.submit(on_time)
    with pytest.raises(JobCancelled) as info:
        late.future.result(5)
    assert on_time.future.result(5).images.shape[0] == 1
    assert info.value.reason == "deadline" and 5 <= len(rows.steps) < 50
    time.sleep(0.1)
    assert rows.live == 0
    text = backend.render().decode()
    assert metric_value(text, "marche_cancellations_total", reason="deadline") == 1


@pytest.mark.parametrize("fake", POLICIES, indirect=True)
def test_a_failing_step_fails_only_the_requests_in_it(fake):
    worker, rows, _ = fake
    rows.fail_when = lambda batch: any(r.job.class_id == 9 for r in batch)
    doomed = [job(9, [0]), job(1, [1])]  # in the same step as the failing row
    for j in doomed:
        worker.submit(j)
    for j in doomed:
        with pytest.raises(EngineError):
            j.future.result(5)
    rows.fail_when = lambda batch: False
    after = job(2, [7])
    worker.submit(after)
    assert after.future.result(5).images[0, 0, 0, 0] == 7
    assert after.closed and rows.live == 0 and worker.alive


def test_fifo_a_request_larger_than_the_engine_fails_instead_of_blocking_the_queue(fake):
    worker, rows, _ = fake
    too_big = job(1, [0, 1, 2, 3, 4])  # 5 images, 4 rows
    after = job(2, [3])
    worker.submit(too_big)
    worker.submit(after)
    with pytest.raises(EngineError, match="exceed"):
        too_big.future.result(5)
    assert after.future.result(5).images.shape[0] == 1


def test_an_idle_engine_trims_the_heap_once_after_work(monkeypatch):
    trims: list[float] = []
    monkeypatch.setattr("service.core.queue.trim_heap", lambda: trims.append(time.monotonic()))
    worker = EngineWorker(None, rows=FakeRows(8), max_batch_size=4, idle_trim_s=0.05)
    worker.start(warmup=False)
    try:
        time.sleep(0.2)
        assert trims == []  # nothing was done yet: nothing to give back
        first = job(1, [0], steps=2)
        worker.submit(first)
        first.future.result(5)
        done = time.monotonic()
        time.sleep(0.3)
        assert len(trims) == 1 and trims[0] >= done  # after the work, once, while idle
        worker.submit(second := job(2, [0], steps=2))
        second.future.result(5)
        time.sleep(0.3)
        assert len(trims) == 2
    finally:
        worker.stop(5)


def test_trim_heap_runs_here():
    from service.core.memory import trim_heap

    assert trim_heap() is (platform.libc_ver()[0] == "glibc")  # glibc has malloc_trim


class ModeRows(FakeRows):
    """GtR's modes (quality, fast) take 2 steps fewer, as they take fewer."""

    def admit(self, job: Job, images) -> list[FakeRow]:
        rows = super().admit(job, images)
        for row in rows:
            row.steps -= 2 if job.mode in ("quality", "fast") else 0
        return rows


@pytest.mark.parametrize(("steps", "widths"), [(3, [5] * 3), (None, [5] * 4 + [3] * 2)])
def test_the_warm_up_takes_its_steps_or_runs_every_row_to_its_end(steps, widths):
    """`warmup_steps` None (the setting "all"; "auto" on CUDA graphs): every row of the
    full-width batch, one per mode, runs to its end, finished rows leaving, so what units
    build on first use is built before the first request; the queue's first step time is a
    full-width step's. 3: the first 3 steps."""
    rows = ModeRows(capacity=5)
    rows.delay = 0.01
    worker = EngineWorker(None, rows=rows, max_batch_size=5, warmup_steps=steps,
                          warmup_params=SamplingParams(num_iter=6, cfg=1.0))  # fmt: skip
    worker.start(warmup=True)
    deadline = time.monotonic() + 10
    while not worker.ready:
        assert time.monotonic() < deadline and worker.last_error is None, worker.last_error
        time.sleep(0.01)
    worker.stop(1.0)
    assert [len(s) for s in rows.steps] == widths and rows.live == 0
    assert worker.queue.step_time.seconds >= 0.01
