"""The app's metrics through Ray's own exporter (Ray 2.60, a local Ray on loopback):

* the dashboard's means are exact: Ray rebuilds a histogram's `_sum` from bucket midpoints,
  so the mean panels divide the `<name>_observed_sum_total` counters by `_count`;
* the series of known label values exist at 0 before their first increment (else a burst
  that creates one, e.g. the first 503s, reads as a rate of 0).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.servers import free_port
from tests.service.test_api import metric_value

ray = pytest.importorskip("ray")

BATCHES = [1, 3, 3, 5, 16, 16, 16]  # midpoints would make their mean 6.93, not 8.57
FRACTIONS = [1.0, 0.33, 0.41, 0.52, 1.0, 0.47]
ROWS = [2, 7, 7, 9]


@pytest.fixture(scope="module")
def exporter():
    port = free_port()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


@pytest.mark.slow
def test_ray_exports_exact_means_and_zero_series(exporter):
    @ray.remote(num_cpus=0)
    class Replica:  # what a MarcheEngine replica records, without the model
        def record(self) -> None:
            from engine.decode.policy import MODES
            from service.metrics import Metrics
            from service.ray_serve.app import RayBackend

            self.metrics = Metrics(RayBackend(), "digits", MODES)
            for size in BATCHES:
                self.metrics.batch_size("marche", size)
            self.metrics.active_fractions("marche", FRACTIONS)
            for rows in ROWS:
                self.metrics.occupancy(rows)
            self.metrics.request_finished("marche", 200, 1.5)

    replica = Replica.remote()
    ray.get(replica.record.remote())
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(exporter, timeout=5).text
        if "ray_marche_step_rows_observed_sum_total" in text and "ray_marche_requests" in text:
            break
        time.sleep(0.5)

    def mean(name: str, **labels: str) -> float:
        total = metric_value(text, f"ray_marche_{name}_observed_sum_total", **labels)
        return total / metric_value(text, f"ray_marche_{name}_count", **labels)

    assert mean("batch_size", mode="marche") == pytest.approx(sum(BATCHES) / len(BATCHES))
    assert mean("active_token_fraction", mode="marche") == pytest.approx(
        sum(FRACTIONS) / len(FRACTIONS)
    )
    assert mean("step_rows") == pytest.approx(sum(ROWS) / len(ROWS))
    # the reason for the counters: Ray's own _sum is not the sum of what was observed
    ray_sum = metric_value(text, "ray_marche_batch_size_sum", mode="marche")
    print(f"batch size sum: observed {sum(BATCHES)}, Ray's _sum {ray_sum}")

    # pre-created at 0: every status and reason of every mode, before any happened
    for mode in ("mar", "marche", "turbo"):
        for status in ("422", "499", "500", "503", "504"):
            assert _has_series(text, "ray_marche_requests_total", mode=mode, status=status)
            assert metric_value(text, "ray_marche_requests_total", mode=mode, status=status) == 0
        assert _has_series(text, "ray_marche_cancellations_total", mode=mode, reason="deadline")
    assert _has_series(text, "ray_marche_rejections_total", reason="queue_full")
    assert metric_value(text, "ray_marche_requests_total", mode="marche", status="200") == 1


def _has_series(text: str, name: str, **labels: str) -> bool:
    return any(
        line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        for line in text.splitlines()
    )
