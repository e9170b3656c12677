"""Locust traffic for `marche serve`: PNG, JSON and streamed generations plus a few probes.

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --stop-timeout 60 \\
        --host http://127.0.0.1:8000

Each request is validated (status, PNG magic bytes, seeds); a 503 with `Retry-After` is the
server shedding load and is reported under the name `generate [shed]` as a success, so it shows
up in its own row and never in the failure count or the generate latency percentiles. Every
other non-200 answer, a bad body or a timeout is a failure.

Knobs (environment variables, read once at start):

    MARCHE_LT_STEPS=16          autoregressive steps per request (server default: 128 for digits)
    MARCHE_LT_MODES=marche,mar  decoding mode of PNG requests, then of JSON/stream requests
    MARCHE_LT_CFG=              guidance scale; empty = the server's default
    MARCHE_LT_NUM_CLASSES=10    class ids are drawn from 0..N-1 (digits: 10; ImageNet: 1000)
    MARCHE_LT_NUM_IMAGES=1      images per request
    MARCHE_LT_MIX=png:6,json:3,stream:1,probe:1   task weights (0 disables a task)
    MARCHE_LT_WAIT=0.5,2        think time between tasks, seconds (min,max)
    MARCHE_LT_TIMEOUT=180       client network timeout, seconds (> worst generation time)
    MARCHE_LT_BACKOFF_MAX=10    cap on honouring Retry-After after a shed answer; 0 = no backoff

No Ray (or other heavy) imports here: Locust monkey-patches with gevent at import time.
Importing `slo` registers the SLO gate and report (see loadtest/slo.py).
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from dataclasses import dataclass, field

from locust import FastHttpUser, between, task

try:
    from loadtest import slo
except ImportError:  # run with only this folder on the path (e.g. a container mount)
    import slo  # type: ignore[no-redef]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHED = "shed"  # what a response check returns for an in-band 503 (see stream_shed)


@dataclass(frozen=True)
class Settings:
    steps: int = 16
    modes: tuple[str, ...] = ("marche", "mar")
    cfg: float | None = None
    num_classes: int = 10
    num_images: int = 1
    mix: dict[str, int] = field(
        default_factory=lambda: {"png": 6, "json": 3, "stream": 1, "probe": 1}
    )
    wait: tuple[float, float] = (0.5, 2.0)
    timeout: float = 180.0
    backoff_max: float = 10.0

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        default = cls()
        mix = dict(default.mix)
        for item in filter(None, env.get("MARCHE_LT_MIX", "").split(",")):
            name, _, weight = item.partition(":")
            if name.strip() not in mix:
                raise ValueError(f"MARCHE_LT_MIX: unknown task {name!r}; known: {sorted(mix)}")
            mix[name.strip()] = int(weight)
        modes = tuple(m.strip() for m in env.get("MARCHE_LT_MODES", "marche,mar").split(","))
        wait = [float(x) for x in env.get("MARCHE_LT_WAIT", "0.5,2").split(",")]
        cfg = env.get("MARCHE_LT_CFG", "").strip()
        return cls(
            steps=int(env.get("MARCHE_LT_STEPS", default.steps)),
            modes=tuple(m for m in modes if m) or default.modes,
            cfg=float(cfg) if cfg else None,
            num_classes=int(env.get("MARCHE_LT_NUM_CLASSES", default.num_classes)),
            num_images=int(env.get("MARCHE_LT_NUM_IMAGES", default.num_images)),
            mix=mix,
            wait=(wait[0], wait[-1]),
            timeout=float(env.get("MARCHE_LT_TIMEOUT", default.timeout)),
            backoff_max=float(env.get("MARCHE_LT_BACKOFF_MAX", default.backoff_max)),
        )

    def mode(self, kind: str) -> str:
        """PNG requests use the first mode, JSON and stream requests the second (or the only)."""
        return self.modes[0] if kind == "png" else self.modes[1 % len(self.modes)]


SETTINGS = Settings.from_env()


# ---------------------------------------------------------------------------------------------
# request bodies and response checks (pure; unit-tested)


def payload(settings: Settings, mode: str, rng: random.Random) -> dict:
    body = {
        "class_id": rng.randrange(settings.num_classes),
        "seed": rng.randrange(2**31),
        "steps": settings.steps,
        "mode": mode,
        "num_images": settings.num_images,
    }
    if settings.cfg is not None:
        body["cfg"] = settings.cfg
    return body


def expected_seeds(body: dict) -> list[int]:
    return [body["seed"] + i for i in range(body["num_images"])]


def check_png(content: bytes | None) -> str | None:
    if not content or not content.startswith(PNG_MAGIC):
        return f"body is not a PNG ({(content or b'')[:8]!r})"
    return None


def check_seed_header(header: str | None, body: dict) -> str | None:
    if not header:
        return "missing X-Seed header"
    try:
        seeds = [int(s) for s in header.split(",")]
    except ValueError:
        return f"bad X-Seed header {header!r}"
    if seeds != expected_seeds(body):
        return f"X-Seed {header!r} != requested seeds {expected_seeds(body)}"
    return None


def check_image_docs(images: list[dict], body: dict, where: str) -> str | None:
    """Each {"b64", "seed"} image (JSON answer or stream event): a valid PNG, the right seed."""
    for image, seed in zip(images, expected_seeds(body), strict=True):
        problem = check_png(base64.b64decode(image.get("b64", "")))
        if problem:
            return f"{where} image: {problem}"
        if image.get("seed") != seed:
            return f"{where} seed {image.get('seed')} != {seed}"
    return None


def check_json(doc: dict, body: dict) -> str | None:
    images = doc.get("images") or []
    if len(images) != body["num_images"]:
        return f"{len(images)} images in JSON, expected {body['num_images']}"
    problem = check_image_docs(images, body, "JSON")
    if problem:
        return problem
    if doc.get("mode") != body["mode"]:
        return f"JSON mode {doc.get('mode')!r} != {body['mode']!r}"
    return None


def parse_sse(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body; data lines of one event are joined."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data or name != "message":
            events.append((name, "\n".join(data)))
    return events


def stream_shed(events: list[tuple[str, str]]) -> bool:
    """An `error` event with status 503: the stream was opened (200), then the queue was full."""
    for name, data in events:
        if name == "error":
            try:
                return json.loads(data).get("status") == 503
            except (ValueError, AttributeError):
                return False
    return False


def check_stream(events: list[tuple[str, str]], body: dict) -> str | None:
    """progress* then one image per requested image then done; unknown events are tolerated."""
    names = [name for name, _ in events]
    if "error" in names:
        return "stream error event: " + events[names.index("error")][1][:200]
    if not names or names[-1] != "done":
        return f"stream did not end with 'done' (last events {names[-3:]})"
    images = [json.loads(data) for name, data in events if name == "image"]
    if len(images) != body["num_images"]:
        return f"{len(images)} image events, expected {body['num_images']}"
    first_image = names.index("image")
    if any(name == "progress" for name in names[first_image:]):
        return "progress event after an image event"
    return check_image_docs(images, body, "stream")


def retry_after(headers) -> str | None:
    """The Retry-After value of a shed (503) answer, else None."""
    return (headers or {}).get("Retry-After") or None


# ---------------------------------------------------------------------------------------------
# the user


class ImageUser(FastHttpUser):
    """One client: mostly generations, sometimes a readiness or info probe."""

    wait_time = between(*SETTINGS.wait)
    network_timeout = SETTINGS.timeout  # FastHttpUser's default 60 s is below a busy CPU run
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()

    def _generate(self, kind: str, path: str, headers: dict, check) -> None:
        body = payload(SETTINGS, SETTINGS.mode(kind), self.rng)
        shed_for = None
        name = f"{slo.GENERATE_PREFIX} {kind} {body['mode']}"
        with self.client.post(
            path, json=body, headers=headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code == 503 and retry_after(resp.headers):
                resp.request_meta["name"] = slo.SHED_NAME  # its own row, not a failure
                resp.success()
                shed_for = retry_after(resp.headers)
            elif resp.status_code != 200:
                detail = (resp.text or str(resp.error or ""))[:200]
                resp.failure(f"HTTP {resp.status_code}: {detail}")
            else:
                try:
                    problem = check(resp, body)
                except Exception as exc:  # a malformed body is the server's failure, not ours
                    problem = f"invalid response: {exc!r}"
                if problem is SHED:
                    resp.request_meta["name"] = slo.SHED_NAME
                    resp.success()
                    shed_for = "1"
                elif problem:
                    resp.failure(problem)
                else:
                    resp.success()
        if shed_for is not None:
            self._backoff(shed_for)

    def _backoff(self, value: str) -> None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = 1.0
        time.sleep(min(seconds, SETTINGS.backoff_max))

    @task(SETTINGS.mix["png"])
    def generate_png(self) -> None:
        def check(resp, body):
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("image/png"):
                return f"Content-Type {content_type!r}"
            return check_png(resp.content) or check_seed_header(resp.headers.get("X-Seed"), body)

        # explicit: FastHttpUser adds `Accept: application/json` to any json= request
        self._generate("png", "/generate", {"Accept": "image/png"}, check)

    @task(SETTINGS.mix["json"])
    def generate_json(self) -> None:
        def check(resp, body):
            try:
                doc = resp.json()
            except ValueError as exc:
                return f"body is not JSON: {exc}"
            return check_json(doc, body)

        self._generate("json", "/generate", {"Accept": "application/json"}, check)

    @task(SETTINGS.mix["stream"])
    def generate_stream(self) -> None:
        def check(resp, body):
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                return f"Content-Type {content_type!r}"
            try:
                events = parse_sse(resp.text or "")
                return SHED if stream_shed(events) else check_stream(events, body)
            except (ValueError, KeyError) as exc:
                return f"malformed stream: {exc}"

        self._generate("stream", "/generate/stream", {"Accept": "text/event-stream"}, check)

    @task(SETTINGS.mix["probe"])
    def probe(self) -> None:
        path = self.rng.choice(("/readyz", "/info"))
        with self.client.get(path, name=path.lstrip("/"), catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
