"""The service with the real engine (the shipped digits model) behind FastAPI's TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.http.app import build_app
from service.settings import ServiceSettings

FAST = {"steps": 4}  # few decoding steps keep CPU tests quick; the model is the real one


def make_client(**overrides) -> TestClient:
    settings = ServiceSettings(**{"device": "cpu", "max_wait_ms": 50.0, **overrides})
    return TestClient(build_app(settings))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c
