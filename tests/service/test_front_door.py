"""The front door under uvicorn: class names, the OpenAI Images API driven by the official
`openai` client, and the optional API key.

In-process (a stub engine answering at once, for error paths and ImageNet's names) and
against a live `marche serve` with the real digits model (images, the key, the logs)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.jobs import EngineError, JobCancelled, QueueFull
from service.http.app import build_app
from service.settings import ServiceSettings
from tests.servers import serve
from tests.service.test_api import metric_value
from tests.stub_engine import StubEngine

openai = pytest.importorskip("openai")
KEY = "sk-test-0123456789"


def stub_app(**settings: Any) -> tuple[TestClient, StubEngine]:
    engine = StubEngine(**settings.pop("engine", {}))
    app = build_app(ServiceSettings(device="cpu", warmup=False, **settings), client=engine)
    return TestClient(app), engine


def sdk(http: httpx.Client, base: str = "http://testserver", key: str = "unused"):
    """The official client, no retries (a test sees each answer once)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=http)


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


# -- class names ------------------------------------------------------------------------------


def test_classes_list_ids_names_and_synonyms():
    client, _ = stub_app()
    classes = client.get("/classes").json()["classes"]
    assert classes[7] == {"id": 7, "name": "7", "synonyms": ["7", "seven"]}
    client, _ = stub_app(model="mar_base", engine={"model": "mar_base", "classes": 1000})
    answer = client.get("/classes").json()
    assert answer["model"] == "mar_base" and len(answer["classes"]) == 1000
    assert answer["classes"][207]["name"] == "golden retriever"


def test_class_name_reaches_the_engine_as_its_id():
    client, engine = stub_app(model="mar_base", engine={"model": "mar_base", "classes": 1000})
    for name in ("Golden Retriever", "golden-retriever", "n02099601"):
        r = client.post("/generate", json={"class_name": name, "seed": 1, "response": "json"})
        assert r.status_code == 200 and r.json()["class_name"] == "golden retriever", r.text
        assert engine.requests[-1].class_id == 207


def test_an_unknown_name_is_a_422_with_suggestions():
    client, _ = stub_app(model="mar_base", engine={"model": "mar_base", "classes": 1000})
    r = client.post("/generate", json={"class_name": "golden retreiver"})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "class_name"] and "did you mean" in error["msg"]
    assert error["suggestions"][0] == {"id": 207, "name": "golden retriever"}
    assert len(error["suggestions"]) <= 3


def test_a_shared_name_is_a_422_listing_every_class():
    client, engine = stub_app(model="mar_base", engine={"model": "mar_base", "classes": 1000})
    for route in ("/generate", "/generate/stream"):
        r = client.post(route, json={"class_name": "crane"})
        assert r.status_code == 422
        (error,) = r.json()["detail"]
        assert error["candidates"] == [
            {"id": 134, "name": "crane bird"},
            {"id": 517, "name": "crane"},
        ]
    assert engine.requests == []


@pytest.mark.parametrize(
    ("body", "field"),
    [({"seed": 1}, "class_id"), ({"class_id": 1, "class_name": "1"}, "class_name"),
     ({"class_name": ""}, "class_name"), ({"class_name": "x" * 101}, "class_name"),
     ({"class_name": 7}, "class_name")],
)  # fmt: skip
def test_exactly_one_valid_class_field(body, field):
    client, _ = stub_app()
    r = client.post("/generate", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text


# -- the OpenAI Images API, in process ---------------------------------------------------------


def test_openai_client_gets_images_and_the_resolved_name():
    client, engine = stub_app()
    with client:
        result = sdk(client).images.generate(
            model="digits", prompt="Seven", n=3, size="32x32", response_format="b64_json",
            extra_body={"seed": 11, "mode": "turbo", "steps": 5, "cfg": 2.0, "temperature": 0.9},
        )  # fmt: skip
    assert [d.revised_prompt for d in result.data] == ["7"] * 3
    assert all(png_size(d.b64_json) == (32, 32) for d in result.data) and result.created > 0
    req = engine.requests[-1]
    assert (req.class_id, req.seeds, req.mode) == (7, [11, 12, 13], "turbo")
    assert (req.params.num_iter, req.params.cfg, req.params.temperature) == (5, 2.0, 0.9)


def test_openai_prompt_may_be_an_id_and_models_list_the_served_one():
    client, engine = stub_app(model="mar_base", engine={"model": "mar_base", "classes": 1000})
    with client:
        api = sdk(client)
        result = api.images.generate(prompt="207", size="auto")
        assert result.data[0].revised_prompt == "golden retriever"
        assert engine.requests[-1].class_id == 207
        assert [m.id for m in api.models.list()] == ["mar_base"]
        assert api.models.retrieve("mar_base").owned_by == "marche"
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve("dall-e-3")


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "says"),
    [({"prompt": "sevn"}, "UnprocessableEntityError", "prompt", "did you mean '7'"),
     ({"prompt": "²"}, "UnprocessableEntityError", "prompt", "unknown class"),  # a digit, no int
     ({"prompt": "200"}, "UnprocessableEntityError", "prompt", "0..9"),
     ({"prompt": "7", "size": "1024x1024"}, "UnprocessableEntityError", "size", "'32x32'"),
     ({"prompt": "7", "n": 17}, "UnprocessableEntityError", "n", "less than or equal to 16"),
     ({"prompt": "7", "response_format": "url"}, "UnprocessableEntityError", "response_format",
      "b64_json"),
     ({"prompt": "7", "quality": "hd"}, "UnprocessableEntityError", "quality", "not permitted"),
     ({"prompt": "7", "extra_body": {"sead": 3}}, "UnprocessableEntityError", "sead",
      "not permitted"),
     ({"prompt": "7", "model": "dall-e-3"}, "NotFoundError", "model", "serves 'digits'")],
)  # fmt: skip
def test_openai_errors_raise_the_clients_exception_types(kwargs, error, param, says):
    client, engine = stub_app()
    with client, pytest.raises(getattr(openai, error)) as err:
        sdk(client).images.generate(**kwargs)
    assert err.value.param == param and says in str(err.value), err.value.body
    assert err.value.type == "invalid_request_error" and engine.requests == []


def test_openai_engine_failures_keep_their_status_and_retry_advice():
    client, engine = stub_app()
    cases = [(QueueFull("queue full", retry_after=7), 503), (JobCancelled("deadline"), 504),
             (EngineError("step failed"), 500)]  # fmt: skip
    with client:
        for failure, status in cases:
            engine.fail = failure
            r = client.post("/v1/images/generations", json={"prompt": "3"})
            assert r.status_code == status and set(r.json()["error"]) == {
                "message", "type", "param", "code"}  # fmt: skip
            if status == 503:
                assert r.headers["retry-after"] == "7"
                with pytest.raises(openai.InternalServerError):
                    sdk(client).images.generate(prompt="3")
            else:  # the client must not run a failed or timed-out generation again
                assert r.headers["x-should-retry"] == "false"
        text = client.get("/metrics").text
    for status in ("503", "504", "500"):
        assert metric_value(text, "marche_requests_total", route="openai", status=status) >= 1


def test_openai_body_guards_answer_in_openai_shape():
    client, _ = stub_app(max_body_bytes=256)
    big = client.post("/v1/images/generations", json={"prompt": "7" * 10, "user": "u" * 400})
    assert big.status_code == 413 and "error" in big.json()
    form = client.post("/v1/images/generations", content=b"prompt=7")
    assert form.status_code == 415 and "error" in form.json()
    bad = client.post(
        "/v1/images/generations", content=b"\xff{", headers={"content-type": "application/json"}
    )
    assert bad.status_code in (400, 422) and "error" in bad.json()


# -- the API key ------------------------------------------------------------------------------


def test_api_key_guards_generation_routes_only():
    client, engine = stub_app(api_key=KEY)
    with client:
        for route, body in (("/generate", {"class_id": 1}), ("/generate/stream", {"class_id": 1}),
                            ("/v1/images/generations", {"prompt": "1"})):  # fmt: skip
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
                r = client.post(route, json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert KEY not in r.text
            ok = client.post(route, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200, ok.text
        assert client.get("/v1/models").status_code == 401
        for open_route in ("/healthz", "/readyz", "/metrics", "/info", "/classes", "/"):
            assert client.get(open_route).status_code == 200, open_route
        assert client.get("/info").json()["api_key_required"] is True
        with pytest.raises(openai.AuthenticationError) as err:
            sdk(client, key="wrong").images.generate(prompt="1")
        assert err.value.code == "invalid_api_key"
        assert sdk(client, key=KEY).images.generate(prompt="1").data
        text = client.get("/metrics").text
    assert metric_value(text, "marche_requests_total", status="401", route="generate") == 3
    assert metric_value(text, "marche_requests_total", status="401", route="openai") == 4
    assert len(engine.requests) == 4  # only the keyed requests reached the engine


def test_without_a_key_everything_is_open_and_the_schema_says_so():
    client, _ = stub_app()
    assert client.get("/info").json()["api_key_required"] is False
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
    keyed, _ = stub_app(api_key=KEY)
    schemes = keyed.get("/openapi.json").json()["components"]["securitySchemes"]
    assert list(schemes.values()) == [{"type": "http", "scheme": "bearer"}]
    empty, _ = stub_app(api_key="")  # MARCHE_API_KEY= (empty) is unset, not a blank key
    assert empty.post("/generate", json={"class_id": 1}).status_code == 200


# -- live: `marche serve`, the real digits model -----------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[tuple[str, Any]]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve(log=log, api_key=KEY) as (url, _):
        yield url, log


def test_live_openai_client_matches_generate_and_keeps_the_key_out_of_logs(keyed_server):
    url, log = keyed_server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=120) as http:
        api = sdk(http, base=url, key=KEY)
        result = api.images.generate(
            model="digits", prompt="seven", n=2, size="32x32",
            extra_body={"seed": 5, "steps": 8, "mode": "marche"},
        )  # fmt: skip
        body = {"class_name": "7", "seed": 5, "steps": 8, "mode": "marche", "response": "json"}
        direct = http.post(url + "/generate", headers=auth, json=body)
        with pytest.raises(openai.AuthenticationError):
            sdk(http, base=url, key="not-the-key").images.generate(prompt="seven")
        assert http.get(url + "/readyz").status_code == 200  # probes need no key
        metrics = http.get(url + "/metrics").text
    assert direct.status_code == 200, direct.text
    first = direct.json()["images"][0]
    # the same (model, class, seed, parameters) gives the same image through either API
    assert result.data[0].b64_json == first["b64"] and png_size(first["b64"]) == (32, 32)
    assert result.data[1].b64_json != result.data[0].b64_json  # image i has seed 5 + i
    assert metric_value(metrics, "marche_requests_total", route="openai", status="200") == 1
    assert metric_value(metrics, "marche_requests_total", route="openai", status="401") == 1
    text = log.read_text()
    assert "POST /v1/images/generations" in text  # the access log ran...
    assert KEY not in text  # ...and never saw the key


def test_the_pages_mode_menu_offers_every_engine_mode():
    from html.parser import HTMLParser
    from pathlib import Path

    from engine.decode.policy import MODES

    class Options(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.inside, self.values = False, []

        def handle_starttag(self, tag, attrs):
            if tag == "select":
                self.inside = dict(attrs).get("id") == "mode"
            elif tag == "option" and self.inside:
                self.values.append(dict(attrs)["value"])

        def handle_endtag(self, tag):
            if tag == "select":
                self.inside = False

    page = Options()
    page.feed((Path(__file__).parents[2] / "service/http/static/index.html").read_text())
    assert page.values == list(MODES)
