"""The SLO gate for Locust runs: thresholds in, a verdict, an exit code and a report out.

Importing this module from a locustfile (after `import locust`) registers three event hooks:

* `init_command_line_parser` adds `--slo-p95-ms`, `--slo-fail-ratio`, `--slo-shed-ratio`,
  `--slo-min-rps` and `--slo-report` (each also settable from a `MARCHE_SLO_*` variable or
  `locust.conf`);
* `test_start` scrapes the server's `/metrics` once, so the report can show server-side deltas;
* `quitting` summarises the stats, evaluates the thresholds, writes `<report>.json` and
  `<report>.md`, and sets `environment.process_exit_code = 1` on a violation.

The verdict itself is the pure function `evaluate(summary, thresholds)`; this module imports
Locust only inside functions, so tests import it without gevent's monkey-patching.

Request names carry the traffic class (see `classify`): `generate ...` entries are generations,
a name ending in `[shed]` is a 503 + Retry-After answer (load shedding, counted apart from
failures and from the latency percentiles), everything else is a probe (`readyz`, `info`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("marche.slo")

GENERATE_PREFIX = "generate"
SHED_SUFFIX = "[shed]"
SHED_NAME = f"{GENERATE_PREFIX} {SHED_SUFFIX}"
PERCENTILES = (0.50, 0.90, 0.95, 0.99)
# next to this file, not the working directory, so a container mount of loadtest/ gets it too
DEFAULT_REPORT = str(Path(__file__).resolve().parent / "results" / "report")

# server-side series read from /metrics before and after the run (a histogram's _sum/_count,
# counters summed over their labels)
SERVER_SERIES = (
    "marche_step_rows_sum",
    "marche_step_rows_count",
    "marche_queue_wait_seconds_sum",
    "marche_queue_wait_seconds_count",
    "marche_request_latency_seconds_sum",
    "marche_request_latency_seconds_count",
    "marche_images_generated_total",
    "marche_rejections_total",
    "marche_cancellations_total",
)


@dataclass(frozen=True)
class Thresholds:
    """A threshold of None (or <= 0 for p95/rps on the command line) is not checked."""

    p95_ms: float | None = None  # p95 end-to-end latency of generate requests
    fail_ratio: float | None = 0.0  # failures / answered requests (shed excluded)
    shed_ratio: float | None = None  # shed / all generate attempts
    min_rps: float | None = None  # successful generate requests per second


@dataclass(frozen=True)
class Verdict:
    passed: bool
    violations: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)  # the measured value behind each check


def classify(name: str) -> str:
    """'shed', 'generate' or 'probe', from a Locust request name."""
    if name.endswith(SHED_SUFFIX):
        return "shed"
    if name.startswith(GENERATE_PREFIX):
        return "generate"
    return "probe"


# ---------------------------------------------------------------------------------------------
# the verdict (pure)


def evaluate(summary: dict[str, Any], thresholds: Thresholds) -> Verdict:
    """Judge a run summary (the dict `summarize` returns) against the thresholds.

    A run with no successful generate request always fails: an idle or dead server must not
    pass the gate by having nothing to measure.
    """
    totals = summary["totals"]
    generate = summary["generate"]
    answered = totals["requests"]  # shed answers are not in here
    ok_generate = generate["requests"] - generate["failures"]
    fail_ratio = totals["failures"] / answered if answered else 0.0
    attempts = generate["requests"] + totals["shed"]
    shed_ratio = totals["shed"] / attempts if attempts else 0.0
    duration = summary["duration_s"]
    goodput = ok_generate / duration if duration > 0 else 0.0

    checks = {
        "successful_generate_requests": ok_generate,
        "fail_ratio": round(fail_ratio, 4),
        "shed_ratio": round(shed_ratio, 4),
        "generate_p95_ms": generate["p95_ms"],
        "generate_rps": round(goodput, 3),
    }
    violations = []
    if ok_generate == 0:
        violations.append("no successful generate requests")
    if thresholds.fail_ratio is not None and fail_ratio > thresholds.fail_ratio:
        violations.append(f"fail ratio {fail_ratio:.2%} > {thresholds.fail_ratio:.2%}")
    if thresholds.shed_ratio is not None and shed_ratio > thresholds.shed_ratio:
        violations.append(f"shed ratio {shed_ratio:.2%} > {thresholds.shed_ratio:.2%}")
    if thresholds.p95_ms is not None and generate["p95_ms"] > thresholds.p95_ms:
        violations.append(f"generate p95 {generate['p95_ms']:.0f} ms > {thresholds.p95_ms:.0f} ms")
    if thresholds.min_rps is not None and goodput < thresholds.min_rps:
        violations.append(f"generate rps {goodput:.2f} < {thresholds.min_rps:.2f}")
    return Verdict(passed=not violations, violations=violations, checks=checks)


# ---------------------------------------------------------------------------------------------
# Locust stats -> summary dict


def _entry_summary(entry, duration: float) -> dict[str, Any]:
    row = {
        "name": entry.name,
        "method": entry.method,
        "kind": classify(entry.name),
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.num_requests / duration, 3) if duration > 0 else 0.0,
        "avg_ms": round(entry.avg_response_time, 1),
        "max_ms": round(entry.max_response_time),
    }
    for p in PERCENTILES:
        row[f"p{round(p * 100)}_ms"] = entry.get_response_time_percentile(p)
    return row


def summarize(stats) -> dict[str, Any]:
    """Reduce a `locust.stats.RequestStats` to the plain dict `evaluate` and the report use."""
    from locust.stats import StatsEntry

    start, last = stats.start_time, stats.last_request_timestamp
    duration = max(last - start, 0.0) if last and start else 0.0
    generate = StatsEntry(stats, f"{GENERATE_PREFIX} (all)", "")
    endpoints, requests, failures, shed = [], 0, 0, 0
    for entry in sorted(stats.entries.values(), key=lambda e: (e.name, e.method)):
        row = _entry_summary(entry, duration)
        endpoints.append(row)
        if row["kind"] == "shed":
            shed += entry.num_requests
            continue
        requests += entry.num_requests
        failures += entry.num_failures
        if row["kind"] == "generate":
            generate.extend(entry)  # one latency distribution over all generate entries
    return {
        "duration_s": round(duration, 2),
        "totals": {"requests": requests, "failures": failures, "shed": shed},
        "generate": _entry_summary(generate, duration),
        "endpoints": endpoints,
        "errors": [
            {"name": e.name, "method": e.method, "error": str(e.error), "count": e.occurrences}
            for e in stats.errors.values()
        ],
    }


# ---------------------------------------------------------------------------------------------
# server-side readout from /metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str, names=SERVER_SERIES) -> dict[str, float]:
    """Sum each wanted series over its labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in names:
            try:
                values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
            except ValueError:
                continue
    return values


def server_readout(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server saw during the run: counter deltas, decoding steps and their mean
    occupancy (images per step), mean queue wait."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}

    def mean(prefix: str) -> float | None:
        count = delta.get(f"{prefix}_count", 0.0)
        return round(delta.get(f"{prefix}_sum", 0.0) / count, 4) if count else None

    return {
        "steps": delta.get("marche_step_rows_count", 0.0),
        "mean_occupancy": mean("marche_step_rows"),
        "mean_queue_wait_s": mean("marche_queue_wait_seconds"),
        "mean_request_latency_s": mean("marche_request_latency_seconds"),
        "images_generated": delta.get("marche_images_generated_total", 0.0),
        "rejections": delta.get("marche_rejections_total", 0.0),
        "cancellations": delta.get("marche_cancellations_total", 0.0),
    }


def scrape(host: str | None, timeout: float = 5.0) -> dict[str, float] | None:
    if not host:
        return None
    try:
        with urllib.request.urlopen(host.rstrip("/") + "/metrics", timeout=timeout) as resp:
            return parse_prometheus(resp.read().decode("utf-8", "replace"))
    except Exception as exc:  # the readout is a bonus; never fail the run over it
        logger.info("SLO: no server metrics from %s/metrics (%s)", host, exc)
        return None


# ---------------------------------------------------------------------------------------------
# the report


def render_markdown(summary: dict[str, Any], verdict: Verdict, thresholds: Thresholds) -> str:
    totals, gen = summary["totals"], summary["generate"]
    status = "PASS" if verdict.passed else "FAIL"
    lines = [
        f"# Load test report: SLO {status}",
        "",
        f"- duration: {summary['duration_s']} s",
        f"- requests (answered): {totals['requests']}, failures: {totals['failures']}, "
        f"shed (503 + Retry-After): {totals['shed']}",
        f"- generate: {gen['requests']} requests, {verdict.checks['generate_rps']} successful/s, "
        f"p50 {gen['p50_ms']} ms, p95 {gen['p95_ms']} ms, p99 {gen['p99_ms']} ms",
        f"- thresholds: {json.dumps(asdict(thresholds))}",
    ]
    lines += [f"- violation: {v}" for v in verdict.violations]
    lines += [
        "",
        "| endpoint | kind | requests | failures | rps | p50 ms | p90 ms | p95 ms | p99 ms "
        "| max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    columns = ("kind", "requests", "failures", "rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms")
    for row in [*summary["endpoints"], gen]:
        name = f"{row['method']} {row['name']}".strip()
        cells = [name, *(str(row[c]) for c in columns), str(row["max_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("errors"):
        lines += ["", "## Failures", "", "| request | error | count |", "|---|---|---:|"]
        for err in summary["errors"]:
            error = err["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {err['method']} {err['name']} | {error} | {err['count']} |")
    if summary.get("server"):
        lines += ["", "## Server (/metrics deltas over the run)", ""]
        lines += [f"- {k}: {v}" for k, v in summary["server"].items()]
    return "\n".join(lines) + "\n"


def write_report(stem: str | Path, summary, verdict: Verdict, thresholds: Thresholds) -> Path:
    """Write `<stem>.json` and `<stem>.md`; returns the markdown path."""
    stem = Path(stem)
    if stem.suffix in (".md", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "verdict": asdict(verdict),
        "thresholds": asdict(thresholds),
        **summary,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    md = stem.with_suffix(".md")
    md.write_text(render_markdown(summary, verdict, thresholds))
    return md


# ---------------------------------------------------------------------------------------------
# Locust hooks


def thresholds_from_options(options) -> Thresholds:
    def positive(value) -> float | None:
        return float(value) if value is not None and float(value) > 0 else None

    def ratio(value) -> float | None:
        return float(value) if value is not None and float(value) >= 0 else None

    return Thresholds(
        p95_ms=positive(getattr(options, "slo_p95_ms", None)),
        fail_ratio=ratio(getattr(options, "slo_fail_ratio", 0.0)),
        shed_ratio=ratio(getattr(options, "slo_shed_ratio", -1)),
        min_rps=positive(getattr(options, "slo_min_rps", None)),
    )


def _add_arguments(parser) -> None:
    group = parser.add_argument_group("MARché SLO gate (loadtest/slo.py)")
    group.add_argument(
        "--slo-p95-ms",
        type=float,
        default=0,
        env_var="MARCHE_SLO_P95_MS",
        help="fail if p95 of generate requests exceeds this (ms); 0 = not checked",
    )
    group.add_argument(
        "--slo-fail-ratio",
        type=float,
        default=0.0,
        env_var="MARCHE_SLO_FAIL_RATIO",
        help="fail if failures/answered requests exceed this (shed 503s excluded); -1 = off",
    )
    group.add_argument(
        "--slo-shed-ratio",
        type=float,
        default=-1,
        env_var="MARCHE_SLO_SHED_RATIO",
        help="fail if shed/generate attempts exceed this; -1 = not checked",
    )
    group.add_argument(
        "--slo-min-rps",
        type=float,
        default=0,
        env_var="MARCHE_SLO_MIN_RPS",
        help="fail if successful generate requests/s fall below this; 0 = not checked",
    )
    group.add_argument(
        "--slo-report",
        default=DEFAULT_REPORT,
        env_var="MARCHE_SLO_REPORT",
        help="write <path>.json and <path>.md (default: loadtest/results/report)",
    )


def _is_worker(environment) -> bool:
    from locust.runners import WorkerRunner

    return isinstance(environment.runner, WorkerRunner)


def _on_test_start(environment, **_kwargs) -> None:
    if not _is_worker(environment):
        environment.marche_metrics_before = scrape(environment.host)


def _on_quitting(environment, **_kwargs) -> None:
    if environment.runner is None or _is_worker(environment):
        return
    from locust import log

    thresholds = thresholds_from_options(environment.parsed_options)
    summary = summarize(environment.runner.stats)
    before = getattr(environment, "marche_metrics_before", None)
    after = scrape(environment.host) if before is not None else None
    if before is not None and after is not None:
        summary["server"] = server_readout(before, after)
    verdict = evaluate(summary, thresholds)

    stem = getattr(environment.parsed_options, "slo_report", None) or DEFAULT_REPORT
    try:
        md = write_report(stem, summary, verdict, thresholds)
        logger.info("SLO report written to %s (+ .json)", md)
    except OSError as exc:
        logger.error("SLO report could not be written to %s: %s", stem, exc)

    if verdict.passed:
        logger.info("SLO PASS: %s", json.dumps(verdict.checks))
        # the gate decides the exit code, unless the locustfile itself raised somewhere
        if not environment.runner.exceptions and not log.unhandled_greenlet_exception:
            environment.process_exit_code = 0
    else:
        logger.error("SLO FAIL: %s (%s)", "; ".join(verdict.violations), json.dumps(verdict.checks))
        environment.process_exit_code = 1


def install() -> None:
    """Register the hooks once, even if this file is imported under two module names."""
    from locust import events

    if getattr(events, "_marche_slo_installed", False):
        return
    events.init_command_line_parser.add_listener(_add_arguments)
    events.test_start.add_listener(_on_test_start)
    events.quitting.add_listener(_on_quitting)
    events._marche_slo_installed = True


# NOTE: hooks only inside a Locust process (the locustfile imports locust first). Importing
# locust here would gevent-monkey-patch whatever imported this module, e.g. a pytest session.
if "locust" in sys.modules:
    install()
