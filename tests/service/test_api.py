"""Every endpoint and every error path, with the real digits engine."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.scheduler import ContinuousScheduler
from service.metrics import METRIC_NAMES
from tests.service.conftest import FAST, make_client

PNG = b"\x89PNG\r\n\x1a\n"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def wait_ready(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.05)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_info_classes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    wait_ready(client)
    info = client.get("/info").json()
    assert info["model"] == "digits" and info["num_classes"] == 10 and info["ready"]
    assert info["defaults"]["mode"] == "marche" and info["marche"]["budget"] == 64
    off = {"mode": "off"}
    assert info["units"] == {"head": off, "full": off, "lazy": off}  # CPU: auto
    classes = client.get("/classes").json()["classes"]
    assert [c["id"] for c in classes] == list(range(10))
    assert client.get("/docs").status_code == 200
    assert "/generate" in client.get("/openapi.json").json()["paths"]


def test_generate_png_with_headers(client):
    r = client.post("/generate", json={"class_id": 3, "cfg": 3.0, "seed": 5, **FAST})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content.startswith(PNG)
    assert r.headers["x-seed"] == "5" and r.headers["x-mode"] == "marche"
    assert r.headers["x-request-id"] and float(r.headers["x-generation-seconds"]) > 0
    assert pixels(r.content).shape == (32, 32)


def test_grid_json_and_formats(client):
    r = client.post("/generate", json={"class_id": 1, "seed": 0, "num_images": 4, **FAST})
    assert r.headers["x-seed"] == "0,1,2,3" and pixels(r.content).shape == (70, 70)
    body = {"class_id": 1, "seed": 0, "num_images": 2, "mode": "mar", **FAST}
    j = client.post("/generate", json=body, headers={"Accept": "application/json"}).json()
    assert [im["seed"] for im in j["images"]] == [0, 1] and j["mode"] == "mar"
    assert base64.b64decode(j["images"][0]["b64"]).startswith(PNG)
    assert set(j["timings"]) == {"queue_s", "generation_s", "total_s"}
    j2 = client.post("/generate", json={**body, "response": "json"}).json()
    assert j2["images"] == j["images"]  # same seeds, same images
    for fmt, media in [("jpeg", "image/jpeg"), ("webp", "image/webp")]:
        r = client.post("/generate", json={"class_id": 2, "format": fmt, **FAST})
        assert r.headers["content-type"] == media and Image.open(io.BytesIO(r.content)).size


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"class_id": 10}, "class_id", "0..9"),
        ({"class_id": -1}, "class_id", "0..9"),
        ({"class_id": 1, "cfg": -1}, "cfg", "greater than or equal to 0"),
        ({"class_id": 1, "steps": 0}, "steps", "greater than or equal to 1"),
        ({"class_id": 1, "steps": 1000}, "steps", "less than or equal to 256"),
        ({"class_id": 1, "num_images": 17}, "num_images", "less than or equal to 16"),
        ({"class_id": 1, "temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"class_id": 1, "mode": "warp"}, "mode", "'mar', 'marche', 'turbo', 'quality' or 'fast'"),
        ({"class_id": 1, "format": "gif"}, "format", "'png', 'jpeg' or 'webp'"),
        ({"class_id": 1, "cfg_schedule": "cosine"}, "cfg_schedule", "'linear' or 'constant'"),
        ({"class_id": 1, "prompt": "a cat"}, "prompt", "Extra inputs are not permitted"),
        ({"cfg": 3.0}, "class_id", "Field required"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, body, field, reason):
    r = client.post("/generate", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field and reason in detail["msg"]


def test_nan_cfg_and_bad_timeout_header_are_422(client):
    raw = '{"class_id": 1, "cfg": NaN}'
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "cfg"
    r = client.post("/generate", json={"class_id": 1}, headers={"x-request-timeout-seconds": "-1"})
    assert r.status_code == 422 and "positive" in r.json()["detail"][0]["msg"]


def test_same_seed_same_image_alone_or_in_a_batch():
    body = {"class_id": 4, "seed": 123, "cfg": 2.0, **FAST}
    # longer requests: still decoding when `body` arrives, whatever the threads' timing
    # (continuous batching admits it mid-flight; a static batch waits up to 2 s for 4 images)
    others = [{"class_id": c, "seed": c, "cfg": 3.0 + c, "steps": 48} for c in (0, 7, 9)]
    with make_client(max_batch_size=4, max_wait_ms=2000.0) as client:
        wait_ready(client)
        alone = client.post("/generate", json=body).content
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, "/generate", json=b) for b in [*others, body]]
            responses = [f.result() for f in futures]
    mine = responses[-1]
    assert int(mine.headers["x-batch-size"]) > 1  # it did share a batch
    assert np.array_equal(pixels(mine.content), pixels(alone))


def test_concurrent_requests_are_batched_and_metered(client):
    worker = client.app.state.client.worker
    queue = worker.queue
    knobs = {"max_batch_size": queue.max_batch_size, "max_wait_ms": queue.max_wait_s * 1000}
    worker.configure(max_batch_size=3, max_wait_ms=2000.0)
    try:  # at most 3 rows per step; 6 concurrent requests share steps
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(client.post, "/generate", json={"class_id": i, "seed": i, **FAST})
                for i in range(6)
            ]
            responses = [f.result() for f in futures]
    finally:
        worker.configure(**knobs)
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    text = client.get("/metrics").text
    count = metric_value(text, "marche_step_rows_count")
    single = metric_value(text, "marche_step_rows_bucket", le="1.0")
    assert count > single  # some steps held more than one image
    assert metric_value(text, "marche_step_rows_bucket", le="4.0") == count  # never over 3
    assert metric_value(text, "marche_requests_total", status="200") >= 6
    assert metric_value(text, "marche_images_generated_total") >= 6
    assert metric_value(text, "marche_step_latency_seconds_count") > 0
    assert metric_value(text, "marche_active_token_fraction_count", mode="marche") > 0
    for name in METRIC_NAMES:
        base = name.removesuffix("_total")
        assert re.search(rf"^# TYPE {base}(_total)? ", text, re.M), name


def test_stream_reports_every_step_then_the_image(client):
    body = {"class_id": 6, "seed": 3, "steps": 8, "num_images": 2}
    with client.stream("POST", "/generate/stream", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [
        (m.group(1), json.loads(m.group(2)))
        for m in re.finditer(r"event: (\w+)\ndata: (.*)\n\n", text)
    ]
    progress = [d for e, d in events if e == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert progress[-1]["tokens_done"] == 256 and all(p["total"] == 8 for p in progress)
    assert any("preview_png_b64" in p for p in progress)
    images = [d for e, d in events if e == "image"]
    assert [d["seed"] for d in images] == [3, 4]
    assert base64.b64decode(images[0]["b64"]).startswith(PNG)
    assert events[-1][0] == "done"


def test_deadline_passed_is_504_and_counted(client):
    body = {"class_id": 8, "steps": 64, "num_images": 4}
    r = client.post("/generate", json=body, headers={"x-request-timeout-seconds": "0.2"})
    assert r.status_code == 504 and "deadline" in r.json()["detail"]
    text = client.get("/metrics").text
    assert metric_value(text, "marche_cancellations_total", reason="deadline") >= 1
    assert client.post("/generate", json={"class_id": 8, **FAST}).status_code == 200


def wait_for_counts(worker, running: int, waiting: int) -> None:
    """Poll the worker until it runs `running` jobs and queues `waiting` (or fail after 30 s)."""
    deadline = time.monotonic() + 30
    while worker.counts() != (running, waiting):
        assert time.monotonic() < deadline, worker.counts()
        time.sleep(0.01)


@contextmanager
def full_queue() -> Iterator[tuple[TestClient, list[Future]]]:
    """A client whose one-slot queue is full (one slow job running, one waiting), and the
    futures of those two accepted requests."""
    slow = {"class_id": 2, "steps": 128, "num_images": 2}
    with make_client(queue_size=1, max_batch_size=1, max_wait_ms=0.0) as c:
        wait_ready(c)
        worker = c.app.state.client.worker
        with ThreadPoolExecutor(2) as pool:
            accepted = [pool.submit(c.post, "/generate", json=slow)]
            wait_for_counts(worker, 1, 0)  # the first one runs ...
            accepted.append(pool.submit(c.post, "/generate", json=slow))
            wait_for_counts(worker, 1, 1)  # ... and the second fills the queue
            yield c, accepted


def test_full_queue_is_503_with_retry_after_and_nothing_accepted_is_lost():
    with full_queue() as (c, accepted):
        shed = c.post("/generate", json={"class_id": 5, **FAST})
        codes = [f.result().status_code for f in accepted]
        assert shed.status_code == 503 and codes == [200, 200]
        # a cold server (nothing completed yet) still estimates the real wait, not 1 s
        # (the formula is checked exactly in test_retry_after.py)
        assert 1 < int(shed.headers["retry-after"]) <= 600 and "queue full" in shed.json()["detail"]
        assert metric_value(c.get("/metrics").text, "marche_rejections_total") == 1


def test_engine_error_fails_its_batch_with_500_and_the_loop_keeps_serving(monkeypatch):
    with make_client() as c:
        wait_ready(c)
        pipeline = c.app.state.client.pipeline
        original = pipeline.step

        def flaky(engine, rows):  # the continuous scheduler's step
            if any(int(row.label) == 7 for row in rows):
                raise RuntimeError("injected failure")
            return original(engine, rows)

        monkeypatch.setattr(pipeline, "step", flaky)
        r = c.post("/generate", json={"class_id": 7, **FAST})
        assert r.status_code == 500 and "injected failure" in r.json()["detail"]
        assert c.post("/generate", json={"class_id": 3, **FAST}).status_code == 200
        assert c.get("/readyz").status_code == 200


def test_readiness_is_503_until_warmup_finishes(monkeypatch):
    gate = threading.Event()
    original = ContinuousScheduler.warmup

    def gated(self, *args, **kwargs):
        gate.wait(30)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ContinuousScheduler, "warmup", gated)
    with make_client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "warming up"
        assert c.get("/healthz").status_code == 200
        gate.set()
        wait_ready(c)


def test_stream_with_a_full_queue_is_a_plain_503():
    with full_queue() as (c, accepted):
        r = c.post("/generate/stream", json={"class_id": 1, **FAST})
        assert r.status_code == 503 and 1 < int(r.headers["retry-after"]) <= 600
        assert all(f.result().status_code == 200 for f in accepted)


def test_units_serve_the_same_image_and_are_reported():
    """MARCHE_UNITS=static: the head and the transformer's passes run as padded units (what
    CUDA graphs replay), exact MAR's built at start-up, MARché's lazy ones on first use (the
    warm-up's first), all reported in /info; the images are eager's."""
    bodies = [{"class_id": 3, "cfg": 3.0, "seed": 5, "mode": m, **FAST} for m in ("mar", "marche")]
    with make_client() as eager:
        wait_ready(eager)
        expected = [pixels(eager.post("/generate", json=b).content) for b in bodies]
    with make_client(units="static", head_buckets="1,2,4,8,16,32,64") as units:
        wait_ready(units)
        before = units.get("/info").json()["units"]
        for body, want in zip(bodies, expected, strict=True):
            image = pixels(units.post("/generate", json=body).content).astype(int)
            assert abs(image - want.astype(int)).max() <= 1  # 8-bit pixels: rounding at most
        after = units.get("/info").json()["units"]
    assert before["head"]["mode"] == "static" and before["head"]["built"] >= 7 * 2
    assert before["full"]["built"] >= 6 * 8  # calls 1..32 x every L/8 known tokens, + fills
    assert before["lazy"]["built"] > 0  # by the warm-up's MARché rows, in the serving pool
    assert after["head"]["hits"] > before["head"]["hits"]
    lazy_steps = FAST["steps"] - -(-FAST["steps"] // 3)  # MARché: every third step is full
    full_passes = 2 * FAST["steps"] - lazy_steps  # mar's every step, MARché's full ones
    assert after["full"]["hits"] == before["full"]["hits"] + full_passes
    assert after["lazy"]["hits"] == before["lazy"]["hits"] + lazy_steps
    assert after["lazy"]["misses"] == before["lazy"]["misses"] == 0
