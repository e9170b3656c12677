"""scripts/: the GPU script's time budget and the table it prints (no GPU needed for either)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_GPU = ROOT / "scripts" / "bench_gpu.sh"
GPU_TABLE = ROOT / "scripts" / "gpu_table.py"
BENCH_JSON = ROOT / "docs" / "results" / "bench_cpu_mar_base_b16.json"


def test_bench_gpu_timeouts_fit_in_eight_minutes():
    """The issue sizes the script to under 8 minutes; every command is under a timeout, so the
    timeouts' sum bounds it (30 s are left for the device query and the table)."""
    text = BENCH_GPU.read_text()
    literal = [int(s) for s in re.findall(r"\btimeout (\d+)\b", text)]
    budgets = re.search(r"BUDGET_S=\(([^)]*)\)", text)
    assert budgets is not None, "per-model budgets not found"
    per_model = [int(s) for s in re.findall(r"\]=(\d+)", budgets.group(1))]
    assert len(per_model) == 3  # MAR-B, L, H
    # every command that runs a model or the tests is under a timeout
    for line in text.splitlines():
        if "$MARCHE bench" in line or "-m pytest" in line:
            assert "timeout" in line, line
    assert sum(literal) + sum(per_model) <= 8 * 60 - 30


def test_gpu_table_renders_a_bench_report(tmp_path):
    shutil.copy(BENCH_JSON, tmp_path / "mar_base.json")
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
    assert rows[2].endswith("| 3.15x |")  # turbo's speedup from the report
    assert "| 48.9636 |" in rows[2]  # s/image, 4 decimals
