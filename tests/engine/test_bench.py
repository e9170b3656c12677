"""`engine.eval.bench`: each timed run is reported as it ends, with its own phase split."""

from __future__ import annotations

import pytest

from engine.decode.step import StepEngine
from engine.eval.bench import PHASES, bench, warm_up
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


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


@pytest.mark.parametrize(("steps", "expected"), [(2, 2), (None, 8)])
def test_warm_up_runs_the_first_steps_of_a_real_run_of_each_mode(monkeypatch, steps, expected):
    seen: list[tuple[int, int]] = []  # (rows, tokens done) after each step
    real_step = StepEngine.step

    def counting_step(self, rows, *args, **kwargs):
        out = real_step(self, rows, *args, **kwargs)
        seen.append((len(rows), rows[0].tokens_done))
        return out

    monkeypatch.setattr(StepEngine, "step", counting_step)
    pipe = Pipeline.load("digits", device="cpu")
    warm_up(pipe, ["mar", "turbo"], 3, SamplingParams(8, 5.0), None, steps)
    # each mode on the real run's schedule (8 steps), cut after `steps`: not a short 2-step
    # run, which would predict every token
    assert [rows for rows, _ in seen] == [3] * (2 * expected)
    seq_len = pipe.model.config.seq_len
    for done in (seen[expected - 1][1], seen[-1][1]):  # each mode's last step
        assert done == seq_len if steps is None else 0 < done < seq_len / 2


def test_the_units_bench_times_eager_against_units_and_builds_pool_units_once():
    """`marche bench --units static` on digits: both runners' tokens agree, and MARché's lazy
    units are built in the warm-up round only (each runner keeps its step engine's pool, as a
    server does): 4 steps, 2 of them lazy, 2 rounds."""
    from engine.eval.latency import units_table

    params = SamplingParams(num_iter=4, cfg=3.0)
    report = units_table("digits", "static", ["marche"], [1], params, repeats=1)
    (row,) = report["rows"]
    assert row["mode"] == "marche" and row["eager_ms_per_step"] > 0 and row["speedup"] > 0
    assert row["max_token_diff"] < 1e-3
    lazy = report["units"]["lazy"]
    assert lazy["hits"] == 2 * 2 and lazy["built"] == 2 * 2 and lazy["misses"] == 0


def test_the_units_bench_warms_eager_up_on_its_first_steps_and_may_time_units_alone(
    monkeypatch,
):
    """Eager builds nothing, so its warm-up round is its first steps only (a whole eager run
    at batch 128 is a minute of a GPU); the units' is a whole run (they are built on first
    use). `eager=False` times the units alone, each mode against exact MAR under them."""
    from engine.eval.latency import units_table

    steps: dict[int, int] = {}  # per step engine, in the order they were made
    real_step = StepEngine.step

    def counting_step(self, rows, *args, **kwargs):
        steps[id(self)] = steps.get(id(self), 0) + 1
        return real_step(self, rows, *args, **kwargs)

    monkeypatch.setattr(StepEngine, "step", counting_step)
    params = SamplingParams(num_iter=4, cfg=3.0)
    report = units_table("digits", "static", ["mar"], [1], params, repeats=1,
                         eager_warmup_steps=1)  # fmt: skip
    assert list(steps.values()) == [1 + 4, 4 + 4]  # eager, then units: warm-up + timed round
    (row,) = report["rows"]
    assert row["eager_vs_mar"] == row["units_vs_mar"] == 1.0
    assert row["units_peak_bytes"] is None  # no device memory to read on a CPU
    assert row["units_s_per_image"] == pytest.approx(row["units_ms_per_step"] * 4 / 1e3)

    heard: list[list[str]] = []  # the rows of each report `on_row` hears of

    def on_row(report: dict) -> None:
        heard.append([row["mode"] for row in report["rows"]])

    alone = units_table("digits", "static", ["turbo", "mar"], [2], params, repeats=1,
                        eager=False, on_row=on_row)  # fmt: skip
    assert heard == [["turbo"], ["turbo", "mar"]]  # as each row is complete
    assert alone["eager"] is False
    for row in alone["rows"]:
        assert "eager_ms_per_step" not in row and "speedup" not in row
        assert row["units_ms_per_step"] > 0 and row["units_vs_mar"] > 0
    assert alone["rows"][1]["units_vs_mar"] == 1.0  # mar's own; turbo's filled in at the end
