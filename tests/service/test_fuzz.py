"""The OpenAPI contract against the app, property-based (schemathesis): every generated
request, valid or not, gets a documented status, content type and body; no server errors.

The HTTP layer runs for real; the engine behind it is a stub that answers at once (a real
generation per case would not fit CI: `num_images` 16 at 256 steps is minutes on a CPU).
`MARCHE_FUZZ_EXAMPLES` sets the examples per operation (`make fuzz` runs more)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from service.core.client import EngineRequest  # noqa: E402
from service.core.worker import JobResult  # noqa: E402
from service.http.app import build_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

EXAMPLES = int(os.environ.get("MARCHE_FUZZ_EXAMPLES", "300"))


class StubEngine:
    """Answers like the digits engine, instantly (tiny gray images)."""

    async def info(self) -> dict[str, Any]:
        return {
            "model": "digits", "num_classes": 10, "image_size": 32,
            "labels": [str(i) for i in range(10)],
            "defaults": {"steps": 128, "cfg": 5.0, "cfg_schedule": "linear", "temperature": 1.0},
        }  # fmt: skip

    async def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    def _result(self, request: EngineRequest) -> JobResult:
        images = np.full((len(request.seeds), 8, 8, 3), 128, np.uint8)
        return JobResult(images, request.seeds, 0.0, 0.001, len(request.seeds))

    async def generate(self, request: EngineRequest) -> JobResult:
        return self._result(request)

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        yield {"accepted": True}
        yield {"step": 1, "total": 1, "tokens_done": 64, "seq_len": 64}
        yield {"result": self._result(request)}


app = build_app(ServiceSettings(device="cpu", warmup=False), client=StubEngine())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CASES: list[str] = []


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_answer(case):
    CASES.append(case.operation.label)
    body = case.body if isinstance(case.body, dict) else {}
    field = "prompt" if case.operation.path.startswith("/v1/") else "class_name"
    if not isinstance(body.get(field), str):
        case.call_and_validate()
        return
    # Which strings name a class is the model's data (any case, any synonym), not the schema's:
    # a schema-valid name may be unknown. Then the answer is a 422 naming that field (with
    # suggestions); everything else is checked as usual.
    response = case.call_and_validate(
        excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
    positive = case._meta is None or not case._meta.generation.mode.is_negative
    if positive and response.status_code == 422:
        answer = response.json()
        if field == "prompt":
            assert answer["error"]["param"] == "prompt", answer
        else:
            assert any(d["loc"][-1] == "class_name" for d in answer["detail"]), answer


def test_enough_cases_ran():
    """Runs after the parametrized test (file order): CI wants >= 500 cases in all."""
    if not CASES:
        pytest.skip("run with the fuzz test")
    assert len(CASES) >= min(500, 2 * EXAMPLES), len(CASES)
