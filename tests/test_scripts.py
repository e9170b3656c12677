"""scripts/: the GPU script's time budget and the table it prints (no GPU needed for either)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_GPU = ROOT / "scripts" / "bench_gpu.py"
GPU_TABLE = ROOT / "scripts" / "gpu_table.py"


def _mode(name: str, s_per_image: float) -> dict:
    phases = dict(encoder=1.0, decoder=2.0, diffusion_head=3.0, vae=0.5)
    return {"mode": name, "s_per_image": s_per_image, "phases_s_per_image": phases}


# the fields of a `marche bench` report that the table reads (a fixture of its own, so that
# re-measured files in docs/results/ cannot change this test)
REPORT = {
    "model": "mar_base",
    "units": "off",
    "batch": 128,
    "steps": 64,
    "modes": {m: _mode(m, s) for m, s in [("mar", 0.2), ("marche", 0.1), ("turbo", 0.05)]},
    "speedup": {"mar": 1.0, "marche": 2.0, "turbo": 4.0},
}


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH_GPU)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_is_one_command_under_nine_minutes_per_part(tmp_path):
    """Each part is one device-tool command (10 min) with time to spare: its stages run under
    one deadline, and the device queries (each under its timeout) and the table fit in what
    is left; no stage's limit exceeds the deadline, so the first always runs whole."""
    bench_gpu = _bench_gpu()
    assert bench_gpu.DEADLINE_S + 2 * bench_gpu.QUERY_S + 10 <= 9 * 60
    for part, stages in bench_gpu.PARTS.items():
        listed = stages(bench_gpu.Sizes(smoke=False), tmp_path)
        assert listed and all(s.limit_s <= bench_gpu.DEADLINE_S for s in listed), part
    for part, stages in bench_gpu.PARTS.items():  # each runs a module of this repository
        for stage in stages(bench_gpu.Sizes(smoke=False), tmp_path):  # (-m: from its root,
            assert stage.argv[0] == "-m", (part, stage.argv)  # as on a device, where nothing
            spec = importlib.util.find_spec(stage.argv[1])  # is installed)
            assert spec is not None and spec.origin is not None, stage.argv
            assert stage.argv[1] == "pytest" or Path(spec.origin).is_relative_to(ROOT)
    names = [s.name for s in bench_gpu.gpu_stages(bench_gpu.Sizes(False), tmp_path)]
    # the headline first: MAR-B at batch 128, eager against units
    assert names[:3] == ["mar_base_b128", "profile", "tests"]
    assert {"mar_base_b1", "mar_large_b128", "mar_huge_b128", "mar_base_b4_b16",
            "mar_base_batches", "attention"} <= set(names)  # fmt: skip


def test_bench_gpu_skips_what_the_deadline_leaves_no_room_for(tmp_path):
    """Stages run in order under min(limit, time left); one with less than half its limit
    left is skipped, not started; a failing or overrunning stage is reported as such."""
    bench_gpu = _bench_gpu()
    stages = [
        bench_gpu.Stage("ok", 5, ("-c", "pass")),
        bench_gpu.Stage("fails", 5, ("-c", "raise SystemExit(3)")),
        bench_gpu.Stage("slow", 2, ("-c", "import time; time.sleep(30)")),
        bench_gpu.Stage("no room", 14, ("-c", "pass")),  # ~6 s left of 8: under half of 14
        bench_gpu.Stage("small", 1, ("-c", "pass")),
    ]
    with (tmp_path / "log.txt").open("w") as log:
        outcomes = bench_gpu.run_stages(stages, log, deadline_s=8)
    status = {o["stage"]: o["status"] for o in outcomes}
    assert status == {"ok": "ok", "fails": "failed (exit 3)", "slow": "timed out",
                      "no room": "skipped (deadline)", "small": "ok"}  # fmt: skip
    assert next(o for o in outcomes if o["stage"] == "slow")["seconds"] < 15


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_stage_and_the_table_reads_them(tmp_path):
    """`scripts/bench_gpu.py --smoke`: every stage of both parts, on digits on the CPU with
    static units, batches <= 4 and 4 steps: their command lines are valid, they write what
    the table renders, and every stage reports ok."""
    for part in ("gpu", "service"):
        subprocess.run([sys.executable, str(BENCH_GPU), part, "--smoke", "--out", str(tmp_path)],
                       check=True, capture_output=True, timeout=600)  # fmt: skip
    table = (tmp_path / "table.md").read_text()
    for name in ("mar_base_b128", "profile", "mar_huge_b128", "attention", "mar_base_b128_gtr"):
        assert f"| {name} | ok |" in table
    assert "| loadbench_digits | ok |" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| digits |")]
    units_rows = [r for r in rows if r.endswith("MiB) |")]  # its last column: units built
    assert {r.split("|")[4].strip() for r in units_rows} == {"mar", "marche", "turbo", "quality",
                                                           "fast"}  # fmt: skip
    eager = [r for r in units_rows if r.split("|")[5].strip() != "-"]  # eager against units
    assert eager and all(float(r.split("|")[11]) < 1e-3 for r in eager)  # same tokens
    assert any("continuous" in r for r in rows)  # the service's load bench
    attention = [r for r in rows if r.endswith("| - |")]  # its last column: no errors
    assert len(attention) == 2 and all("| 1.00x |" in r for r in attention)  # vs concat


UNITS = {
    "model": "mar_base",
    "units": {"head": {"built": 18, "build_seconds": 2.5, "memory_bytes": 3 * 2**20},
              "full": {"built": 96, "build_seconds": 4.0, "memory_bytes": 2**20}},
    "steps": 64,
    "rows": [{"mode": "mar", "batch": 1, "eager_ms_per_step": 40.0, "units_ms_per_step": 4.0,
              "units_s_per_image": 0.256, "units_vs_mar": 1.0, "units_peak_bytes": 5.5 * 2**30,
              "speedup": 10.0, "max_token_diff": 0.002},
             {"mode": "turbo", "batch": 128, "units_ms_per_step": 2.0, "units_s_per_image": 0.001,
              "units_vs_mar": 3.0, "units_peak_bytes": None}],
}  # fmt: skip


def test_gpu_table_renders_a_units_report(tmp_path):
    (tmp_path / "units_mar_base_b1.json").write_text(json.dumps(UNITS))
    out = subprocess.run([sys.executable, str(GPU_TABLE), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "| model | units |" not in out  # no empty throughput table
    row = [ln for ln in out.splitlines() if ln.startswith("| mar_base | 1 | 64 | mar")]
    assert row == ["| mar_base | 1 | 64 | mar | 40.0 | 4.0 | 10.00x | 0.2560 | 1.00x | 5.5 "
                   "| 2.0e-03 | head 18 (2.5 s, 3 MiB), full 96 (4.0 s, 1 MiB) |"]  # fmt: skip
    # a units-alone row (--no-eager): no eager column, speed-up or token difference
    assert "| mar_base | 128 | 64 | turbo | - | 2.0 | - | 0.0010 | 3.00x | - | - |" in out


def test_gpu_table_renders_a_bench_report(tmp_path):
    (tmp_path / "mar_base.json").write_text(json.dumps(REPORT))
    (tmp_path / "device.txt").write_text("Some GPU 2.13.0\n")
    out = subprocess.run(
        [sys.executable, str(GPU_TABLE), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "Device: Some GPU 2.13.0"
    rows = [ln for ln in lines if ln.startswith("| mar_base")]
    assert [r.split("|")[4].strip() for r in rows] == ["mar", "marche", "turbo"]
    assert rows[2].endswith("| 4.00x | 0.8 |")  # turbo's speedup; 0.05 s / 64 steps in ms
    assert "| 0.0500 | 1.0000 | 2.0000 | 3.0000 | 0.5000 |" in rows[2]  # s/image, phases


PROFILE = {
    "model": "mar_base",
    "device": "cuda:0",
    "dtype": "bfloat16",
    "steps": 8,
    "rows": [{"mode": "turbo", "batch": 128, "steps": 8, "wall_s": 1.6, "ms_per_step": 200.0,
              "host_ms_per_step": 40.0, "device_busy": 0.83,
              "top": [{"name": "sm90_xmma_gemm_bf16", "calls": 900, "ms": 700.0, "share": 0.5},
                      {"name": "flash_fwd_kernel", "calls": 300, "ms": 280.0, "share": 0.2}]}],
}  # fmt: skip


def test_gpu_table_renders_a_profile(tmp_path):
    (tmp_path / "profile_mar_base.json").write_text(json.dumps(PROFILE))
    out = subprocess.run([sys.executable, str(GPU_TABLE), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    row = [ln for ln in out.splitlines() if ln.startswith("| mar_base | 128 | turbo")]
    assert row == ["| mar_base | 128 | turbo | 200.0 | 40.0 | 83% "
                   "| sm90_xmma_gemm_bf16 50%, flash_fwd_kernel 20% |"]  # fmt: skip
