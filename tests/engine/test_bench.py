"""`engine.eval.bench`: each timed run is reported as it ends, with its own phase split."""

from __future__ import annotations

import pytest

from engine.eval.bench import PHASES, bench
from engine.model.config import SamplingParams


def test_progress_reports_each_run_with_the_phases_the_report_sums():
    heard: list[tuple[str, int, float, dict[str, float]]] = []
    report = bench(
        "digits", ["mar", "turbo"], batch=2, params=SamplingParams(2, 5.0), device="cpu",
        repeats=2, warmup_steps=1, progress=lambda *run: heard.append(run),
    )  # fmt: skip
    interleaved = [("mar", 1), ("turbo", 1), ("mar", 2), ("turbo", 2)]
    assert [(mode, run) for mode, run, _, _ in heard] == interleaved
    for mode, entry in report["modes"].items():
        mine = [(seconds, phases) for m, _, seconds, phases in heard if m == mode]
        assert entry["runs_s"] == [seconds for seconds, _ in mine]
        for phase in PHASES:
            run_sum = sum(phases[phase] for _, phases in mine)
            assert run_sum > 0
            # the report gives seconds per image averaged over runs: 2 images x 2 runs
            assert entry["phases_s_per_image"][phase] == pytest.approx(run_sum / 4)
        # the phases are timed inside each run, so they cannot exceed its wall time
        for seconds, phases in mine:
            assert sum(phases.values()) <= seconds
