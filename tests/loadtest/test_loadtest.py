"""The load-test harness: the SLO verdict (pure), the locustfile's checks and shapes, and a smoke
run of Locust against a real `marche serve`.

Locust gevent-monkey-patches whatever imports it, so this process only imports `loadtest.slo`
(which imports Locust lazily); anything that needs Locust runs in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadtest import slo
from loadtest.slo import Thresholds, evaluate
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
HAVE_LOCUST = importlib.util.find_spec("locust") is not None
needs_locust = pytest.mark.skipif(not HAVE_LOCUST, reason="locust is not installed")


def summary(gen=100, gen_fail=0, shed=0, probes=10, probe_fail=0, p95=1000, duration=10.0):
    """A run summary shaped like `slo.summarize` returns (only the fields `evaluate` reads)."""
    return {
        "duration_s": duration,
        "totals": {"requests": gen + probes, "failures": gen_fail + probe_fail, "shed": shed},
        "generate": {"requests": gen, "failures": gen_fail, "p95_ms": p95},
        "endpoints": [],
    }


STRICT = Thresholds(p95_ms=2000, fail_ratio=0.01, min_rps=1.0)


@pytest.mark.parametrize(
    ("run", "thresholds", "passed", "violation"),
    [
        pytest.param(summary(), STRICT, True, None, id="pass"),
        pytest.param(summary(p95=3000), STRICT, False, "p95", id="p95-violation"),
        pytest.param(summary(p95=2000), STRICT, True, None, id="p95-at-threshold"),
        pytest.param(summary(gen_fail=5), STRICT, False, "fail ratio", id="fail-ratio"),
        pytest.param(summary(probe_fail=1), STRICT, True, None, id="fail-ratio-within"),
        pytest.param(summary(shed=500), STRICT, True, None, id="shed-is-not-failure"),
        pytest.param(
            summary(shed=50), Thresholds(shed_ratio=0.2), False, "shed ratio", id="shed-ratio"
        ),
        pytest.param(summary(gen=5), STRICT, False, "rps", id="min-rps"),
        pytest.param(summary(gen=0, probes=0), Thresholds(), False, "no successful", id="empty"),
        pytest.param(
            summary(gen=0, probes=50, shed=20), Thresholds(), False, "no successful", id="all-shed"
        ),
        pytest.param(
            summary(gen=10, gen_fail=10),
            Thresholds(fail_ratio=None),
            False,
            "no successful",
            id="all-failed",
        ),
        pytest.param(
            summary(p95=10**6, gen_fail=3),
            Thresholds(p95_ms=None, fail_ratio=None),
            True,
            None,
            id="unchecked",
        ),
    ],
)
def test_evaluate(run, thresholds, passed, violation):
    verdict = evaluate(run, thresholds)
    assert verdict.passed is passed, verdict
    if violation:
        assert any(violation in v for v in verdict.violations), verdict.violations
    else:
        assert verdict.violations == []


def test_evaluate_reports_the_measured_values():
    checks = evaluate(summary(gen=50, gen_fail=1, shed=50, probes=0), Thresholds()).checks
    assert checks["successful_generate_requests"] == 49
    assert checks["fail_ratio"] == pytest.approx(1 / 50)  # shed answers are not in the ratio
    assert checks["shed_ratio"] == pytest.approx(0.5)
    assert checks["generate_rps"] == pytest.approx(4.9)


def test_thresholds_from_options_treat_zero_and_negative_as_off():
    options = SimpleNamespace(slo_p95_ms=0, slo_fail_ratio=-1, slo_shed_ratio=-1, slo_min_rps=0)
    assert slo.thresholds_from_options(options) == Thresholds(None, None, None, None)
    options = SimpleNamespace(slo_p95_ms=5000, slo_fail_ratio=0, slo_shed_ratio=0.5, slo_min_rps=2)
    assert slo.thresholds_from_options(options) == Thresholds(5000, 0.0, 0.5, 2.0)


def test_classify_names():
    assert slo.classify(slo.SHED_NAME) == "shed"
    assert slo.classify("generate png marche") == "generate"
    assert slo.classify("readyz") == "probe"


def test_server_readout_from_prometheus_text():
    before = slo.parse_prometheus("marche_step_rows_count 2\nmarche_step_rows_sum 4\n")
    after = slo.parse_prometheus(
        textwrap.dedent(
            """\
            # HELP marche_step_rows images per decoding step
            marche_step_rows_bucket{le="1.0"} 3
            marche_step_rows_count 6
            marche_step_rows_sum 16
            marche_rejections_total{reason="queue_full"} 2
            marche_rejections_total{reason="too_large"} 1
            """
        )
    )
    readout = slo.server_readout(before, after)
    assert readout["steps"] == 4
    assert readout["mean_occupancy"] == 3.0
    assert readout["rejections"] == 3
    assert readout["mean_queue_wait_s"] is None


def test_write_report(tmp_path):
    run = summary(shed=3)
    run["generate"].update(name="generate (all)", method="", kind="generate", rps=10.0)
    run["generate"].update(p50_ms=500, p90_ms=900, p99_ms=1500, max_ms=1600)
    thresholds = Thresholds(p95_ms=500)
    verdict = evaluate(run, thresholds)
    md = slo.write_report(tmp_path / "out" / "report.md", run, verdict, thresholds)
    assert md == tmp_path / "out" / "report.md"
    assert "SLO FAIL" in md.read_text() and "p95" in md.read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["verdict"]["passed"] is False
    assert data["totals"]["shed"] == 3


LOCUSTFILE_CHECKS = """
import random
from locust.util.load_locustfile import load_locustfile
from loadtest import locustfile as lf

s = lf.Settings.from_env({"MARCHE_LT_STEPS": "8", "MARCHE_LT_MODES": "mar",
                          "MARCHE_LT_MIX": "stream:0", "MARCHE_LT_CFG": "2.5"})
assert (s.steps, s.mode("png"), s.mode("json"), s.cfg) == (8, "mar", "mar", 2.5)
assert s.mix == {"png": 6, "json": 3, "stream": 0, "probe": 1}
body = lf.payload(s, "mar", random.Random(0))
assert set(body) == {"class_id", "seed", "steps", "mode", "num_images", "cfg"}
assert 0 <= body["class_id"] < 10 and body["steps"] == 8

png = lf.PNG_MAGIC + b"rest"
assert lf.check_png(png) is None and lf.check_png(b"GIF89a") and lf.check_png(None)
body = {"seed": 7, "num_images": 2, "mode": "mar"}
assert lf.check_seed_header("7,8", body) is None
assert lf.check_seed_header("7", body) and lf.check_seed_header(None, body)
b64 = __import__("base64").b64encode(png).decode()
doc = {"images": [{"b64": b64, "seed": 7}, {"b64": b64, "seed": 8}], "mode": "mar"}
assert lf.check_json(doc, body) is None
assert lf.check_json({**doc, "mode": "marche"}, body)

good = (
    'event: progress\\ndata: {"step": 1, "total": 8}\\n\\n'
    'event: image\\ndata: {"b64": "%s", "seed": 7}\\n\\n'
    'event: image\\ndata: {"b64": "%s", "seed": 8}\\n\\n'
    "event: done\\ndata: {}\\n\\n" % (b64, b64)
)
assert lf.check_stream(lf.parse_sse(good), body) is None
assert lf.check_stream(lf.parse_sse(good.replace("event: done", "event: x")), body)
assert lf.check_stream(lf.parse_sse("event: error\\ndata: boom\\n\\n"), body)
full = 'event: progress\\ndata: {}\\n\\n' 'event: error\\ndata: {"status": 503}\\n\\n'
assert lf.stream_shed(lf.parse_sse(full))
assert not lf.stream_shed(lf.parse_sse(good))
assert not lf.stream_shed(lf.parse_sse("event: error\\ndata: {\\"status\\": 500}\\n\\n"))

_, shapes = load_locustfile("loadtest/shapes.py")
assert [type(x).__name__ for x in shapes] == ["Spike"], shapes  # MARCHE_LT_SHAPE=spike
spike = shapes[0]
assert [spike.at(t) for t in (0, 31, 51, 81)] == [(2, 2), (16, 16), (2, 16), None]
from loadtest.shapes import StepLoad
step = StepLoad()
assert [step.at(t) for t in (0, 29, 30, 119, 120)] == [(4, 2), (4, 2), (8, 2), (16, 2), None]
print("ok")
"""


@needs_locust
def test_locustfile_checks_and_shapes():
    env = {**os.environ, "MARCHE_LT_SHAPE": "spike"}
    result = subprocess.run(
        [sys.executable, "-c", LOCUSTFILE_CHECKS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@needs_locust
def test_slo_gate_fails_a_run_against_a_dead_server(tmp_path):
    """The flags parse, the report is written, and nothing answered means exit code 1."""
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless"]
        + ["-u", "1", "-r", "1", "-t", "2s", "--host", f"http://127.0.0.1:{free_port()}"]
        + ["--only-summary", "--slo-report", str(report), "--slo-p95-ms", "1000"]
        + ["--slo-fail-ratio", "0.5", "--slo-min-rps", "1"],
        cwd=ROOT,
        env={**os.environ, "MARCHE_LT_WAIT": "0.2,0.2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "SLO FAIL" in result.stderr
    data = json.loads(report.with_suffix(".json").read_text())
    expected = {"p95_ms": 1000.0, "fail_ratio": 0.5, "shed_ratio": None, "min_rps": 1.0}
    assert data["thresholds"] == expected
    assert data["verdict"]["passed"] is False
    assert "no successful generate requests" in data["verdict"]["violations"]
    assert data["totals"]["failures"] == data["totals"]["requests"] > 0
    assert "SLO FAIL" in report.with_suffix(".md").read_text()


# ---------------------------------------------------------------------------------------------
# smoke: Locust against the real service


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def wait_ready(url: str, server: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            output = log.read_text(errors="replace")
            if "No such command" in output:
                pytest.skip("`marche serve` is not available yet (No such command 'serve')")
            pytest.fail(f"marche serve exited with {server.returncode}:\n{output[-3000:]}")
        try:
            if http_get(url + "/readyz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"{url}/readyz not 200 after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def stop(server: subprocess.Popen | None) -> None:
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=5)


@pytest.mark.slow
@needs_locust
def test_locust_smoke_against_marche_serve(tmp_path):
    """`MARCHE_SMOKE_URL=http://host:port` runs against an already started server instead."""
    url = os.environ.get("MARCHE_SMOKE_URL", "").rstrip("/")
    server, server_log = None, tmp_path / "server.log"
    server_log.touch()
    try:
        if not url:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with server_log.open("wb") as sink:
                server = subprocess.Popen(
                    [sys.executable, "-m", "marche", "serve", "--host", "127.0.0.1"]
                    + ["--port", str(port)],
                    cwd=ROOT,
                    env={**os.environ, "MARCHE_MAX_WAIT_MS": "20"},
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
        wait_ready(url, server, server_log, timeout=120)

        report = tmp_path / "report"
        env = {**os.environ, "MARCHE_LT_STEPS": "8", "MARCHE_LT_WAIT": "0.1,0.5"}
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless"]
            + ["-u", "4", "-r", "4", "-t", "20s", "--stop-timeout", "30", "--host", url]
            + ["--only-summary", "--slo-report", str(report)]
            + ["--slo-p95-ms", "30000", "--slo-fail-ratio", "0", "--slo-min-rps", "0.1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        output = locust.stdout[-4000:] + locust.stderr[-4000:]
        assert locust.returncode == 0, output

        data = json.loads(report.with_suffix(".json").read_text())
        generate = data["generate"]
        assert generate["requests"] - generate["failures"] > 0, data
        assert data["totals"]["failures"] == 0, data["errors"]
        assert data["verdict"]["passed"] is True, data["verdict"]
        assert report.with_suffix(".md").is_file()

        status, metrics = http_get(url + "/metrics")
        assert status == 200
        assert slo.parse_prometheus(metrics).get("marche_step_rows_count", 0) > 0, metrics[:2000]
    finally:
        stop(server)


def test_the_flat_engine_follows_its_curve_under_the_real_worker():
    """loadtest.flat_engine: step time base + per_row x (rows - 1), driven by the real worker
    and continuous scheduler; blank images of the served model's size."""
    from engine.model.config import SamplingParams
    from loadtest.flat_engine import FlatRows, image_shape
    from service.core.jobs import Job
    from service.core.worker import EngineWorker

    rows = FlatRows(16, base_s=0.01, per_row_s=0.001, shape=image_shape("digits"))
    assert rows.step_s(1) == 0.01 and rows.step_s(16) == pytest.approx(0.025)
    worker = EngineWorker(None, rows=rows, max_batch_size=16,
                          warmup_params=SamplingParams(num_iter=8, cfg=1.0))  # fmt: skip
    worker.start(warmup=True)
    try:
        job = Job(3, [0, 1], SamplingParams(num_iter=4, cfg=1.0), "marche", time.monotonic() + 30)
        result = worker.submit(job).result(30)
        assert result.images.shape == (2, 32, 32, 1) and result.batch_size == 2
        step_s = worker.queue.step_time.seconds
        assert 0.01 <= step_s < 0.2  # the warm-up's 16-row steps, then 2-row ones
    finally:
        worker.stop(10)


def test_fairbench_plans_the_mix_and_reports_the_targets_ratios(tmp_path):
    """The fair-scheduling bench's arithmetic on made-up samples: the 80/20 mix, B at a tenth
    of A's rate, per-class p99s, longest waits, and each policy's ratios against fifo."""
    from loadtest import fairbench as fb

    mixed = fb.plan("mixed", rate=2.0, duration=500)
    share = sum(a.kind == "small" for a in mixed) / len(mixed)
    assert 0.75 < share < 0.85 and 900 < len(mixed) < 1100
    tenants = fb.plan("tenants", rate=2.0, duration=500)
    b = sum(a.kind == "b" for a in tenants)
    assert 0.07 < b / len(tenants) < 0.11 and [a.at_s for a in tenants] == sorted(
        a.at_s for a in tenants)  # fmt: skip

    def samples(small_s: float, large_s: float) -> list:
        return [fb.Sample("small", i, small_s, 200, small_s / 2, 1) for i in range(100)] + [
            fb.Sample("large", i, large_s, 200, 1.0, 16) for i in range(20)]  # fmt: skip

    results = {"fifo": fb.summarize(samples(40.0, 60.0), {"small": 2.0}, 100.0),
               "fair": fb.summarize(samples(4.0, 66.0), {"small": 2.0}, 100.0)}  # fmt: skip
    assert results["fair"]["small"]["p99_over_idle"] == 2.0
    assert results["fifo"]["small"]["max_queue_s"] == 20.0
    assert results["fifo"]["images_per_s"] == (100 + 20 * 16) / 100
    targets = fb.targets("mixed", results)
    assert targets["fair"] == {"small_p99_vs_fifo": 0.1, "large_p99_vs_fifo": 1.1,
                               "throughput_vs_fifo": 1.0}  # fmt: skip
    report = {"results": results, "targets": targets}
    assert "| fair | small | 100 | 100 | 0 | 0 | 4.0 | 4.0 | 2.0 | 2.0 |" in fb.table(report)
