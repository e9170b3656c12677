"""Defects found by probing the running service (issue 13), each pinned by a test."""

from __future__ import annotations

import gc
import logging
import time

import pytest

from engine.model.config import SamplingParams
from service.core.worker import EngineWorker, Job
from service.metrics import Metrics, PrometheusBackend
from tests.service.conftest import FAST, make_client
from tests.service.test_api import metric_value, wait_ready


def test_an_oversized_body_is_413_before_parsing_and_health_stays_fast(client):
    big = b'{"class_id": 1, "pad": "' + b"x" * 5_000_000 + b'"}'
    started = time.monotonic()
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    assert len(r.content) < 200 and time.monotonic() - started < 2.0

    def chunks():  # no Content-Length: counted while read
        yield b'{"class_id": 1, "pad": "'
        for _ in range(100):
            yield b"x" * 100_000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_a_422_does_not_echo_a_large_input(client):
    r = client.post("/generate", json={"class_id": "7" * 6_000, "steps": list(range(1000))})
    assert r.status_code == 422
    assert len(r.content) < 2_000
    assert {tuple(e["loc"]) for e in r.json()["detail"]} >= {("body", "class_id")}


def test_a_wrong_content_type_is_415(client):
    r = client.post("/generate", content=b"class_id=3", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    assert client.post("/generate/stream", content=b"{}").status_code == 415


def test_a_bad_timeout_header_is_reported_as_a_header(client):
    r = client.post("/generate", json={"class_id": 1}, headers={"x-request-timeout-seconds": "x"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", "x-request-timeout-seconds"]


@pytest.mark.parametrize(
    "body",
    [
        {"class_id": True},
        {"class_id": "3"},
        {"class_id": 3.5},
        {"class_id": 1, "temperature": False},
    ],
    ids=["bool-class", "string-class", "fractional-class", "bool-temperature"],
)
def test_numbers_must_be_json_numbers(client, body):
    """true and "3" are not numbers (pydantic's lax mode took them); 3.0 is an integer in
    JSON Schema, so it stays a valid class id."""
    r = client.post("/generate", json=body)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] in ("class_id", "temperature")


def test_the_openapi_contract_matches_the_server(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    stream = paths["/generate/stream"]["post"]["responses"]
    assert list(stream["200"]["content"]) == ["text/event-stream"]
    assert {"413", "415", "422", "500", "503", "504"} <= set(
        paths["/generate"]["post"]["responses"]
    )
    assert "503" in paths["/readyz"]["get"]["responses"]
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    class_id = props["class_id"]["anyOf"][0]  # an integer, or null when class_name is given
    assert class_id["minimum"] == 0 and class_id["maximum"] == 9
    assert props["class_name"]["anyOf"][0]["type"] == "string"
    seed_max = props["seed"]["anyOf"][0]["maximum"]
    assert float(seed_max) == int(seed_max) and seed_max <= 2**53  # exact as a JSON number
    top = {"class_id": 0, "seed": int(seed_max), **FAST}
    assert client.post("/generate", json=top).status_code == 200  # the documented maximum


def test_known_series_exist_at_zero_from_the_start_and_422s_are_counted():
    with make_client(warmup=False) as c:
        text = c.get("/metrics").text
        for status in ("200", "422", "499", "500", "503", "504"):
            assert f'status="{status}"' in text
        assert 'marche_rejections_total{model="digits",reason="queue_full"} 0.0' in text
        assert metric_value(text, "marche_requests_total", status="422") == 0
        c.post("/generate", json={"class_id": -1})
        text = c.get("/metrics").text
        assert metric_value(text, "marche_requests_total", status="422") == 1


def test_a_dropped_request_whose_future_was_cancelled_is_counted_once():
    """asyncio cancels the job's future when the awaiting handler goes away; the drop that
    follows must still be counted (it was not: the future was already done)."""
    backend = PrometheusBackend()
    worker = EngineWorker(None, metrics=Metrics(backend, "digits"), scheduler="static")
    job = Job(1, [0], SamplingParams(4, 1.0), "marche", time.monotonic() + 60)
    worker.submit(job)
    assert job.future.cancel()  # what asyncio.wrap_future does on cancellation
    worker.cancel(job, "disconnected")
    worker.cancel(job, "disconnected")
    text = backend.render().decode()
    assert metric_value(text, "marche_cancellations_total", reason="disconnected") == 1


def test_a_stream_closed_early_logs_no_unretrieved_exception(caplog):
    with make_client() as c:
        wait_ready(c)
        with c.stream("POST", "/generate/stream", json={"class_id": 3, "steps": 64}) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break  # hang up mid-stream
        worker = c.app.state.client.worker
        deadline = time.monotonic() + 30
        while worker.counts() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with caplog.at_level(logging.ERROR):
            gc.collect()
            time.sleep(0.2)
        text = c.get("/metrics").text
    assert "never retrieved" not in caplog.text
    assert metric_value(text, "marche_cancellations_total", reason="disconnected") == 1


def test_docs_load_their_assets_from_the_server_not_a_cdn(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/static-offline-docs/{asset}" in page.text
        assert client.get(f"/static-offline-docs/{asset}").status_code == 200


class DyingEngine:
    """An engine client whose calls fail the way a dead replica or a bug does: not with one
    of the service's own exceptions."""

    async def info(self):
        defaults = {"steps": 8, "cfg": 1.0, "cfg_schedule": "linear", "temperature": 1.0}
        return {"model": "digits", "num_classes": 10, "defaults": defaults}

    async def readiness(self):
        return True, "ok"

    async def generate(self, request):
        raise ConnectionResetError("replica gone")

    async def stream(self, request):
        yield {"accepted": True}
        yield {"step": 1, "total": 8, "tokens_done": 2, "seq_len": 64}
        raise ConnectionResetError("replica gone")


def test_an_unexpected_engine_failure_is_a_counted_json_500_or_an_error_event(caplog):
    from fastapi.testclient import TestClient

    from service.http.app import build_app
    from service.settings import ServiceSettings

    backend = PrometheusBackend()
    app = build_app(ServiceSettings(), DyingEngine(), Metrics(backend, "digits", ["marche"]))
    with TestClient(app) as client, caplog.at_level(logging.ERROR, "marche.app"):
        r = client.post("/generate", json={"class_id": 1, "steps": 8})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["detail"] == "internal error (ConnectionResetError)"
        r = client.post("/generate/stream", json={"class_id": 1, "steps": 8})
        events = [line for line in r.text.splitlines() if line.startswith("event: ")]
        assert events == ["event: progress", "event: error"]
        assert '"status": 500' in r.text.splitlines()[-2]
    assert sum("replica gone" in str(rec.exc_info) for rec in caplog.records) == 2  # logged
    text = backend.render().decode()
    assert metric_value(text, "marche_requests_total", mode="marche", status="500") == 2
