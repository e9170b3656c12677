"""The service's metrics on `ray.serve.metrics`: each replica is its own process, exported by
Ray's per-node exporter as `ray_marche_*`, tagged by Serve with deployment and replica."""

from __future__ import annotations

from typing import Any

from ray.serve import metrics as ray_metrics

from service.metrics import MetricSpec


class _Tagged:
    def __init__(self, metric: Any, tags: dict[str, str]) -> None:
        self.metric, self.tags = metric, tags

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)

    def inc(self, value: float = 1.0) -> None:
        if value == 0:  # create the series at 0: Counter.inc refuses 0, its recorder does
            self.metric._record(0, tags=self.tags)  # not (checked against Ray's exporter)
            return
        self.metric.inc(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)


class _RayMetric:
    def __init__(self, spec: MetricSpec) -> None:
        name = spec.name.removesuffix("_total")  # Ray's exporter adds `_total` to counters
        doc = spec.doc.encode("ascii", "replace").decode()  # Ray's C++ side wants ASCII
        if spec.kind == "histogram":
            self.metric = ray_metrics.Histogram(
                name, doc, boundaries=list(spec.buckets), tag_keys=spec.labels
            )
        elif spec.kind == "counter":
            self.metric = ray_metrics.Counter(name, doc, tag_keys=spec.labels)
        else:
            self.metric = ray_metrics.Gauge(name, doc, tag_keys=spec.labels)

    def labels(self, **tags: str) -> _Tagged:
        return _Tagged(self.metric, tags)


class RayBackend:
    def make(self, spec: MetricSpec) -> _RayMetric:
        return _RayMetric(spec)
