"""Every metric the service records, named once; the backend (Prometheus or Ray) makes them.

Under uvicorn the backend is a `prometheus_client` registry served at `/metrics`. Under Ray
Serve each replica is its own process, so `service.ray_serve.app` supplies a backend built on
`ray.serve.metrics`, exported by Ray's per-node exporter with a `ray_` prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import prometheus_client as prom

# Generation takes ~0.1 s (a digit on a GPU) to minutes (MAR-H on a CPU).
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # histogram | counter | gauge
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    exact_sum: bool = False  # histogram: also count `<name>_observed_sum_total` (see below)


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("marche_request_latency_seconds", "histogram",
               "End-to-end latency of generation requests that produced images (route: "
               "generate, stream or openai).", ("model", "mode", "route"), LATENCY_BUCKETS),
    MetricSpec("marche_queue_wait_seconds", "histogram",
               "Time from acceptance to the request's first decoding step.",
               ("model", "mode"), LATENCY_BUCKETS),
    MetricSpec("marche_tenant_queue_wait_seconds", "histogram",
               "Time from acceptance to admission, by tenant (a hash of its key or user; "
               "'other' past 64 tenants) and priority.",
               ("model", "tenant", "priority"), LATENCY_BUCKETS),
    MetricSpec("marche_step_latency_seconds", "histogram",
               "Wall time of one decoding step of a batch (transformer + diffusion head).",
               ("model", "mode"), STEP_BUCKETS),
    MetricSpec("marche_batch_size", "histogram",
               "Images of a mode decoded together: a static batch, or the mode's rows in a "
               "continuous-batching step.",
               ("model", "mode"), BATCH_BUCKETS, exact_sum=True),
    MetricSpec("marche_active_token_fraction", "histogram",
               "MARché: active tokens / all tokens per decoding step (1.0 on full steps).",
               ("model", "mode"), FRACTION_BUCKETS, exact_sum=True),
    MetricSpec("marche_requests_total", "counter",
               "Finished generation requests by status and route (generate: /generate, stream: "
               "/generate/stream, openai: /v1/images/generations).",
               ("model", "mode", "status", "route")),
    MetricSpec("marche_images_generated_total", "counter", "Images generated and returned.",
               ("model", "mode")),
    MetricSpec("marche_rejections_total", "counter",
               "Requests refused at admission (queue_full: 503; tenant_limit: 429).",
               ("model", "reason")),
    MetricSpec("marche_cancellations_total", "counter",
               "Accepted requests dropped before finishing (disconnected, deadline).",
               ("model", "mode", "reason")),
    MetricSpec("marche_step_rows", "histogram",
               "Occupancy: images (rows) in the running batch at each decoding step.",
               ("model",), BATCH_BUCKETS, exact_sum=True),
    MetricSpec("marche_admissions_total", "counter",
               "Requests admitted to the running batch; mid_flight=true: joined a batch that "
               "was already decoding (continuous batching).", ("model", "mode", "mid_flight")),
    MetricSpec("marche_engine_retries_total", "counter",
               "Ray runtime: engine calls sent again by the ingress (queue_full: spilled to "
               "another replica; replica_lost: its replica died before answering).",
               ("model", "reason")),
    MetricSpec("marche_outstanding_image_steps", "gauge",
               "Work the queued and running requests still have to run, in image-steps.",
               ("model",)),
    MetricSpec("marche_expected_wait_seconds", "gauge",
               "Wait a request accepted now would see: step time x ceil(image-steps / rows).",
               ("model",)),
    MetricSpec("marche_requests_running", "gauge", "Requests in the batch being decoded.",
               ("model",)),
    MetricSpec("marche_requests_waiting", "gauge", "Requests accepted and queued.", ("model",)),
)  # fmt: skip
# Mean panels need a histogram's exact `_sum`; Ray 2.60's exporter rebuilds `_sum` from bucket
# midpoints (a mean batch size of 0.71 was read), so those histograms also count their sum in
# a counter, exact under both exporters: mean = rate(<name>_observed_sum_total) / rate(_count).
EXACT_SUMS: dict[str, str] = {s.name: f"{s.name}_observed_sum_total" for s in SPECS if s.exact_sum}
SPECS += tuple(
    MetricSpec(EXACT_SUMS[s.name], "counter",
               f"Sum of the {s.name} observations (exact; mean = its rate / rate of _count).",
               s.labels)
    for s in SPECS if s.exact_sum
)  # fmt: skip
METRIC_NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)


class Backend(Protocol):
    def make(self, spec: MetricSpec) -> Any:
        """A metric object with prometheus_client's `.labels(**tags).observe/inc/set` API."""
        ...


class PrometheusBackend:
    """A private `prometheus_client` registry (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()

    def make(self, spec: MetricSpec) -> Any:
        name = spec.name.removesuffix("_total")  # prometheus_client adds it back to counters
        if spec.kind == "histogram":
            return prom.Histogram(
                name, spec.doc, spec.labels, registry=self.registry, buckets=spec.buckets
            )
        if spec.kind == "counter":
            return prom.Counter(name, spec.doc, spec.labels, registry=self.registry)
        return prom.Gauge(name, spec.doc, spec.labels, registry=self.registry)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


# Label values known up front. Each series is created at 0 on start-up: a series that first
# appears at its first increment starts at its final count, so `rate()` of a burst that
# creates it reads 0 (a burst of 503s would never show on the dashboard).
STATUSES = ("200", "401", "404", "422", "499", "500", "503", "504")
ROUTES = ("generate", "stream", "openai")
REJECTIONS = ("queue_full",)
RETRIES = ("queue_full", "replica_lost")
CANCELLATIONS = ("disconnected", "deadline")


class Metrics:
    """The service's metrics, labelled with the served model."""

    def __init__(self, backend: Backend, model: str, modes: Iterable[str] = ()) -> None:
        self.backend, self.model = backend, model
        self._m = {spec.name: backend.make(spec) for spec in SPECS}
        self.modes = tuple(modes)
        for mode in self.modes:
            for status, route in itertools.product(STATUSES, ROUTES):
                self._labels("marche_requests_total", mode=mode, status=status, route=route).inc(0)
            for reason in CANCELLATIONS:
                self._labels("marche_cancellations_total", mode=mode, reason=reason).inc(0)
            self._labels("marche_images_generated_total", mode=mode).inc(0)
            for flag in ("true", "false"):
                self._labels("marche_admissions_total", mode=mode, mid_flight=flag).inc(0)
        for reason in REJECTIONS:
            self._labels("marche_rejections_total", reason=reason).inc(0)
        for reason in RETRIES:
            self._labels("marche_engine_retries_total", reason=reason).inc(0)

    def _labels(self, name: str, **tags: str) -> Any:
        return self._m[name].labels(model=self.model, **tags)

    def _observe(self, name: str, value: float, **tags: str) -> None:
        self._labels(name, **tags).observe(value)
        if name in EXACT_SUMS:
            self._labels(EXACT_SUMS[name], **tags).inc(value)

    def request_finished(
        self, mode: str, status: int, latency_s: float | None = None, route: str = "generate"
    ) -> None:
        self._labels("marche_requests_total", mode=mode, status=str(status), route=route).inc()
        if latency_s is not None:
            self._labels("marche_request_latency_seconds", mode=mode, route=route).observe(
                latency_s
            )

    def rejected(self, reason: str) -> None:
        self._labels("marche_rejections_total", reason=reason).inc()

    def cancelled(self, mode: str, reason: str) -> None:
        self._labels("marche_cancellations_total", mode=mode, reason=reason).inc()

    def batch_started(self, mode: str, num_images: int, queue_waits: Iterable[float]) -> None:
        self.batch_size(mode, num_images)
        for wait in queue_waits:
            self._labels("marche_queue_wait_seconds", mode=mode).observe(wait)

    def admitted(self, mode: str, num_images: int, queue_wait: float, mid_flight: bool) -> None:
        """A request joined the running batch (continuous batching)."""
        self._labels("marche_admissions_total", mode=mode, mid_flight=str(mid_flight).lower()).inc()
        self._labels("marche_queue_wait_seconds", mode=mode).observe(queue_wait)

    def tenant_wait(self, tenant: str, priority: int, queue_wait: float) -> None:
        self._labels("marche_tenant_queue_wait_seconds", tenant=tenant,
                     priority=str(priority)).observe(queue_wait)  # fmt: skip

    def occupancy(self, rows: int) -> None:
        self._observe("marche_step_rows", rows)

    def batch_size(self, mode: str, num_images: int) -> None:
        self._observe("marche_batch_size", num_images, mode=mode)

    def step(self, mode: str, seconds: float) -> None:
        self._labels("marche_step_latency_seconds", mode=mode).observe(seconds)

    def active_fractions(self, mode: str, fractions: Iterable[float]) -> None:
        for fraction in fractions:
            self._observe("marche_active_token_fraction", fraction, mode=mode)

    def images(self, mode: str, count: int) -> None:
        self._labels("marche_images_generated_total", mode=mode).inc(count)

    def retried(self, reason: str) -> None:
        self._labels("marche_engine_retries_total", reason=reason).inc()

    def queue_state(
        self, running: int, waiting: int, image_steps: int = 0, wait_s: float | None = None
    ) -> None:
        self._labels("marche_requests_running").set(running)
        self._labels("marche_requests_waiting").set(waiting)
        self._labels("marche_outstanding_image_steps").set(image_steps)
        self._labels("marche_expected_wait_seconds").set(wait_s or 0.0)
