"""The engine worker on its own: cancellation mid-generation, batching by compatibility."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.decode.policy import preset
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.core import client as engine_client
from service.core.worker import EngineWorker, Job, JobCancelled
from service.metrics import Metrics, PrometheusBackend
from service.settings import ServiceSettings
from tests.service.test_api import metric_value

PARAMS = SamplingParams(num_iter=8, cfg=3.0)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load("digits", device="cpu")


def job(class_id: int, seeds: list[int], params: SamplingParams = PARAMS, **kw) -> Job:
    return Job(class_id, seeds, params, kw.pop("mode", "marche"), time.monotonic() + 60, **kw)


def started_worker(pipeline: Pipeline, **kw) -> tuple[EngineWorker, PrometheusBackend]:
    backend = PrometheusBackend()
    worker = EngineWorker(pipeline, metrics=Metrics(backend, "digits"), **kw)
    worker.start(warmup=False)
    return worker, backend


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
@pytest.mark.parametrize("mode", ["marche", "mar"])
def test_cancel_mid_generation_leaves_batch_mates_untouched(pipeline, mode, scheduler):
    worker, backend = started_worker(pipeline, max_wait_ms=200, scheduler=scheduler)
    try:
        alone = job(5, [11], mode=mode)
        worker.submit(alone)
        expected = alone.future.result(60).images

        steps_seen: list[int] = []
        victim = job(2, [1, 2], mode=mode)

        def on_event(event):  # runs on the worker thread, between steps
            if "step" not in event:
                return  # queued
            steps_seen.append(event["step"])
            if event["step"] == 3:
                worker.cancel(victim, "disconnected")

        victim.on_event = on_event
        mate = job(5, [11], mode=mode)
        worker.submit(victim)
        worker.submit(mate)
        result = mate.future.result(60)
        assert result.batch_size == 1  # the victim's two rows left after step 3
        with pytest.raises(JobCancelled) as info:
            victim.future.result(1)
        assert info.value.reason == "disconnected"
        assert steps_seen == [1, 2, 3]  # it got no further steps
        assert np.array_equal(result.images, expected)
        text = backend.render().decode()
        assert metric_value(text, "marche_cancellations_total", reason="disconnected") == 1
    finally:
        worker.stop()


def test_static_scheduler_batches_only_compatible_jobs(pipeline):
    worker, _ = started_worker(pipeline, max_wait_ms=300, max_batch_size=4, scheduler="static")
    try:
        jobs = [
            job(1, [0]),
            job(2, [1], SamplingParams(num_iter=4, cfg=3.0)),  # other steps
            job(3, [2], mode="mar"),  # other mode
            job(4, [3, 4], SamplingParams(num_iter=8, cfg=1.0, temperature=0.5)),  # compatible
            job(5, [5, 6]),  # would overflow max_batch_size=4 after the first three rows
        ]
        for j in jobs:
            worker.submit(j)
        sizes = [j.future.result(60).batch_size for j in jobs]
        assert sizes == [3, 1, 1, 3, 2]
    finally:
        worker.stop()


def test_queued_jobs_are_cancelled_at_once_and_stop_fails_leftovers(pipeline):
    worker = EngineWorker(pipeline, queue_size=2)  # not started: jobs stay queued
    queued = job(1, [0])
    worker.submit(queued)
    worker.cancel(queued, "disconnected")
    with pytest.raises(JobCancelled):
        queued.future.result(1)
    assert worker.counts() == (0, 0)


@pytest.mark.parametrize("mode", ["mar", "marche", "turbo", "quality", "fast"])
def test_continuous_a_request_joining_mid_way_gets_the_image_it_gets_alone(pipeline, mode):
    """The real digits engine: a request admitted while others are mid-run (other steps,
    cfg, classes and modes) returns the same image as on an idle server, and as the static
    scheduler gives it."""
    static, _ = started_worker(pipeline, scheduler="static", max_wait_ms=0)
    try:
        ours = job(7, [42], SamplingParams(num_iter=10, cfg=2.5), mode=mode)
        static.submit(ours)
        expected = ours.future.result(60).images
    finally:
        static.stop()
    worker, backend = started_worker(pipeline)
    try:
        joined = job(7, [42], SamplingParams(num_iter=10, cfg=2.5), mode=mode)
        first = job(1, [1, 2], SamplingParams(num_iter=16, cfg=4.0), mode="turbo")

        def on_event(event):  # between steps 3 and 4 of the first request, ours arrives
            if event.get("step") == 3:
                worker.submit(joined)

        first.on_event = on_event
        worker.submit(first)
        worker.submit(job(3, [5], SamplingParams(num_iter=12, cfg=1.0), mode="mar"))
        result = joined.future.result(60)
        assert first.future.result(60).images.shape[0] == 2
        # tokens agree to fp32 rounding (tests/engine/test_step.py); pixels to 1 level
        assert np.abs(result.images.astype(int) - expected).max() <= 1
        text = backend.render().decode()
        assert metric_value(text, "marche_admissions_total", mode=mode, mid_flight="true") >= 1
    finally:
        worker.stop()


def test_the_service_loads_the_model_off_the_long_lived_threads(monkeypatch):
    """A thread that ran a parallel op slows every other thread's (see load_pipeline): the
    model is loaded on a thread of its own, which ends, never on the caller's."""
    seen: list[str] = []
    monkeypatch.setattr(
        engine_client, "_load", lambda settings: seen.append(threading.current_thread().name)
    )
    engine_client.load_pipeline(ServiceSettings(device="cpu"))
    assert seen == ["model-load"] and threading.current_thread().name != "model-load"

    def fail(settings):
        raise ValueError("no such checkpoint")

    monkeypatch.setattr(engine_client, "_load", fail)
    with pytest.raises(ValueError, match="no such checkpoint"):  # raised on the caller's thread
        engine_client.load_pipeline(ServiceSettings(device="cpu"))


@pytest.mark.parametrize("policy", ["fair", "deadline"])
@pytest.mark.parametrize("mode", ["mar", "marche", "turbo", "fast"])
def test_a_paused_image_is_bit_identical_to_the_image_never_paused(pipeline, mode, policy):
    """The real digits engine, one row a step: our request runs alone, then again while
    another shares the rows (fair: two tenants, they alternate; deadline: a higher priority
    one arrives at our step 3 and runs first). Paused for half its steps or for a whole
    other run, it keeps its slot, caches and generator: the same bytes."""
    params = SamplingParams(num_iter=10, cfg=2.5)
    worker, _ = started_worker(pipeline, max_batch_size=1, policy=policy)
    try:
        alone = job(7, [42], params, mode=mode)
        worker.submit(alone)
        expected = alone.future.result(60).images
        order: list[str] = []
        # two tenants: fair alternates them on the one row
        ours = job(7, [42], params, mode=mode, priority=1, tenant="ours")
        other = job(3, [5], SamplingParams(num_iter=6, cfg=1.0), mode="turbo", priority=0,
                    tenant="other")  # fmt: skip
        ours.on_event = lambda e: "step" in e and order.append("ours")
        other.on_event = lambda e: "step" in e and order.append("other")
        if policy == "deadline":  # the other request arrives at our step 3
            ours.on_event = lambda e: "step" in e and (
                order.append("ours"), e["step"] == 3 and worker.submit(other))  # fmt: skip
            worker.submit(ours)
        else:
            worker.submit(ours)
            worker.submit(other)
        result = ours.future.result(60)
        other.future.result(60)
        assert np.array_equal(result.images, expected)
        first = order.index("other")
        assert "ours" in order[first:] and first > 0  # paused in the middle, then resumed
        if policy == "deadline":
            steps = preset(mode).num_steps(params.num_iter)  # GtR's modes take fewer
            assert order == ["ours"] * 3 + ["other"] * 6 + ["ours"] * (steps - 3)
    finally:
        worker.stop()


def test_the_warm_up_runs_to_the_end_where_units_are_cuda_graphs(monkeypatch):
    """`warmup_steps` "auto": a whole run where any family is CUDA graphs (their captures on
    first use then happen before the first request, not in it), else 3 steps; "all" and a
    number as said; 0 is refused, naming the field."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from engine.decode.units.common import DecodeUnits

    eager = SimpleNamespace(units=DecodeUnits())
    static = SimpleNamespace(units=DecodeUnits(head=SimpleNamespace(mode="static")))
    graphs = SimpleNamespace(units=DecodeUnits(lazy=SimpleNamespace(mode="cuda-graphs")))
    steps = engine_client.warmup_steps
    assert [steps("auto", p) for p in (eager, static, graphs)] == [3, 3, None]
    assert steps("all", eager) is None and steps(5, graphs) == 5
    monkeypatch.setenv("MARCHE_WARMUP_STEPS", "all")
    assert ServiceSettings().warmup_steps == "all"
    monkeypatch.setenv("MARCHE_WARMUP_STEPS", "7")
    assert ServiceSettings().warmup_steps == 7
    monkeypatch.setenv("MARCHE_WARMUP_STEPS", "0")
    with pytest.raises(ValidationError, match="warmup_steps"):
        ServiceSettings()
