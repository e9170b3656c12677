"""scripts/: the GPU script's time budget and the table it prints (no GPU needed for either)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_GPU = ROOT / "scripts" / "bench_gpu.sh"
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


def test_bench_gpu_timeouts_fit_in_nine_minutes():
    """Each part must fit one device-tool command (10 min) with time to spare; every command is
    under a timeout, so a part's timeouts bound it (15 s are left for the device query and the
    table)."""
    text = BENCH_GPU.read_text()
    for line in text.splitlines():  # every command that runs a model or the tests is timed
        if any(c in line for c in ("$MARCHE bench", "-m pytest", "-m loadtest")):
            assert "timeout" in line, line
    parts = dict(re.findall(r"^(latency|throughput|service)\)\n(.*?)^  ;;", text, re.S | re.M))
    assert set(parts) == {"latency", "throughput", "service"}
    for name, body in parts.items():
        literal = [int(s) for s in re.findall(r"\btimeout (\d+)\b", body)]
        budgets = [int(s) for s in re.findall(r"\]=(\d+)", body)]
        runs = re.findall(r"^\s*(?:MARCHE_MODEL=\S+ )?(?:run|units|service_bench) ", body, re.M)
        assert budgets and runs, name
        assert sum(literal) + sum(budgets) <= 9 * 60 - 15, (name, sum(literal) + sum(budgets))
    latency = parts["latency"]
    assert len(re.findall(r"^\s*units ", latency, re.M)) == 2  # batch 1 per size; small batches
    assert "mar_huge" in latency and "--batches 1\n" in latency and "--batches 4,16" in latency


UNITS = {
    "model": "mar_base",
    "units": {"head": {"built": 18, "build_seconds": 2.5, "memory_bytes": 3 * 2**20},
              "full": {"built": 96, "build_seconds": 4.0, "memory_bytes": 2**20}},
    "rows": [{"mode": "mar", "batch": 1, "eager_ms_per_step": 40.0, "units_ms_per_step": 4.0,
              "speedup": 10.0, "max_token_diff": 0.002}],
}  # fmt: skip


def test_gpu_table_renders_a_units_report(tmp_path):
    (tmp_path / "units_mar_base_b1.json").write_text(json.dumps(UNITS))
    out = subprocess.run([sys.executable, str(GPU_TABLE), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "| model | units |" not in out  # no empty throughput table
    row = [ln for ln in out.splitlines() if ln.startswith("| mar_base | 1 | mar")]
    assert row == ["| mar_base | 1 | mar | 40.0 | 4.0 | 10.00x | 2.0e-03 | head 18 (2.5 s, 3 MiB), "
                   "full 96 (4.0 s, 1 MiB) |"]  # fmt: skip


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
