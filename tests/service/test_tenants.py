"""Tenants and what requests hear while they wait: keys and OpenAI's `user` name tenants (by
hash, never in clear), a tenant past its waiting limit gets 429 with Retry-After while others
are still accepted, `priority` reaches the engine, waiting streams hear their place."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.core.jobs import TenantBusy
from service.core.worker import EngineWorker
from service.http.app import build_app
from service.http.auth import ANONYMOUS, tenant_name
from service.settings import ServiceSettings
from tests.service.test_api import metric_value
from tests.service.test_front_door import sdk, stub_app
from tests.service.test_scheduler import FakeRows, job

KEYS = ("sk-tenant-a-0123456789", "sk-tenant-b-0123456789")


def test_each_key_is_a_tenant_known_by_its_hash():
    client, engine = stub_app(api_key=KEYS[0], api_keys=f"{KEYS[1]}, ")
    with client:
        for key in KEYS:
            r = client.post("/generate", json={"class_id": 1},
                            headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert r.status_code == 200
        assert client.post("/generate", json={"class_id": 1}).status_code == 401
        sdk(client, key=KEYS[1]).images.generate(prompt="1", user="ignored when keyed")
    tenants = [r.tenant for r in engine.requests]
    assert tenants == [tenant_name("key", KEYS[0]), tenant_name("key", KEYS[1])] * 1 + [
        tenant_name("key", KEYS[1])]  # fmt: skip
    assert all(t.startswith("key-") and len(t) == 16 for t in tenants)
    assert not any(k in t for k in KEYS for t in tenants)


def test_without_keys_the_user_field_names_the_tenant():
    client, engine = stub_app()
    with client:
        client.post("/generate", json={"class_id": 1, "user": "alice", "priority": -3})
        client.post("/generate", json={"class_id": 1})
        sdk(client).images.generate(prompt="1", user="bob", extra_body={"priority": 2})
        bad = client.post("/generate", json={"class_id": 1, "priority": 11})
    assert [(r.tenant, r.priority) for r in engine.requests] == [
        (tenant_name("user", "alice"), -3),
        (ANONYMOUS, 0),
        (tenant_name("user", "bob"), 2),
    ]
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "priority"]


def test_a_tenant_past_its_waiting_limit_gets_429_and_the_others_get_in():
    rows = FakeRows(capacity=2)
    worker = EngineWorker(
        None, rows=rows, max_batch_size=1, pause_rows=1, queue_size=8, tenant_queue_size=2
    )  # fmt: skip  (not started: requests wait)
    worker.queue.step_time.observe(0.5)
    for _ in range(2):
        worker.submit(job(1, [0], steps=8, tenant="a"))
    with pytest.raises(TenantBusy) as refused:
        worker.submit(job(1, [0], steps=8, tenant="a"))
    assert refused.value.retry_after >= 1
    worker.submit(job(2, [0], steps=8, tenant="b"))  # another tenant is still accepted
    view = worker.scheduling()
    assert view["policy"] == "fair" and view["tenant_queue_size"] == 2 and view["slots"] == 2
    assert view["tenants"]["a"]["waiting"] == 2 and view["tenants"]["b"]["waiting"] == 1
    worker.stop(1)


def test_the_http_answer_to_a_tenants_limit_is_429_with_retry_after():
    client, engine = stub_app()
    engine.fail = TenantBusy("too many requests waiting for this tenant (2)", 9)
    with client:
        r = client.post("/generate", json={"class_id": 1})
        v1 = client.post("/v1/images/generations", json={"prompt": "1"})
        text = client.get("/metrics").text
    assert r.status_code == 429 and r.headers["retry-after"] == "9"
    assert v1.status_code == 429 and v1.json()["error"]["type"] == "rate_limit_error"
    assert metric_value(text, "marche_requests_total", route="generate", status="429") == 1


def test_a_waiting_stream_hears_its_place_and_expected_start():
    """The real digits engine, one row, no pause room: the second stream waits and is told so
    (position 0, a start time) before its first progress event."""
    settings = ServiceSettings(device="cpu", max_batch_size=1, pause_rows=0)
    with TestClient(build_app(settings)) as client:
        body = {"class_id": 1, "steps": 24, "seed": 0}
        first = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": body})
        first.start()
        time.sleep(0.3)
        with client.stream("POST", "/generate/stream", json=body) as r:
            events = [line for line in r.iter_lines() if line]
        first.join()
        info = client.get("/info").json()["scheduling"]
        text = client.get("/metrics").text
    names = [e.removeprefix("event: ") for e in events if e.startswith("event: ")]
    assert names[0] == "queued" and names.index("progress") > 0
    queued = json.loads(events[events.index("event: queued") + 1].removeprefix("data: "))
    assert queued["position"] == 0 and queued["expected_start_s"] > 0
    assert info["policy"] == "fair" and info["slots"] == 1
    assert info["tenants"][ANONYMOUS]["admitted"] >= 2  # warm-up excluded: two requests
    assert metric_value(text, "marche_tenant_queue_wait_seconds_count", tenant=ANONYMOUS,
                        priority="0") >= 2  # fmt: skip
