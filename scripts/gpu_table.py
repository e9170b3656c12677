"""Markdown tables of the `marche bench` JSON files that scripts/bench_gpu.sh writes: per image,
per phase, speed-up over exact MAR and ms per AR step (mar_*.json); eager vs CUDA-graph units
in ms per AR step, with their capture time and memory (units_*.json: the latency floor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _units(report: dict) -> str:
    """How the run's phases ran: `units` (older files: `compile`, the removed torch.compile
    of the hot paths)."""
    return report.get("units", report.get("compile", "off"))


def main(out: Path) -> None:
    info = out / "device.txt"
    device = info.read_text().splitlines()[0] if info.exists() else "?"
    lines = [f"Device: {device}"]
    reports = sorted(out.glob("mar_*.json"))
    if reports:
        lines += [
            "",
            "| model | units | batch | mode | s/image | encoder | decoder | head | VAE | vs mar "
            "| ms/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for path in reports:
        report = json.loads(path.read_text())
        for mode, r in report["modes"].items():
            ph = r["phases_s_per_image"]
            speedup = report.get("speedup", {}).get(mode)
            steps = report.get("steps")  # AR steps per image: the latency per step
            per_step = "-" if not steps else f"{1000 * r['s_per_image'] / steps:.1f}"
            lines.append(
                f"| {report['model']} | {_units(report)} | {report['batch']} | {mode} "
                f"| {r['s_per_image']:.4f} | {ph['encoder']:.4f} | {ph['decoder']:.4f} "
                f"| {ph['diffusion_head']:.4f} | {ph['vae']:.4f} "
                f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {per_step} |"
            )
    units = sorted(out.glob("units_*.json"))
    if units:
        lines += [
            "",
            "| model | batch | mode | eager ms/step | graphs ms/step | speed-up "
            "| max token diff | units built (s, MiB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for path in units:
        report = json.loads(path.read_text())
        built = ", ".join(f"{name} {u['built']} ({u['build_seconds']:.1f} s, "
                          f"{u['memory_bytes'] / 2**20:.0f} MiB)"
                          for name, u in report["units"].items())  # fmt: skip
        for row in report["rows"]:
            lines.append(
                f"| {report['model']} | {row['batch']} | {row['mode']} "
                f"| {row['eager_ms_per_step']:.1f} | {row['units_ms_per_step']:.1f} "
                f"| {row['speedup']:.2f}x | {row['max_token_diff']:.1e} | {built} |"
            )
    profiles = sorted(out.glob("profile_*.json"))
    if profiles:
        lines += [
            "",
            "| model | batch | mode | ms/step | host ms/step | device busy | top kernels (share) |",
            "|---|---|---|---|---|---|---|",
        ]
    for path in profiles:
        report = json.loads(path.read_text())
        for row in report["rows"]:
            busy = row["device_busy"]
            tops = ", ".join(f"{t['name'][:48]} {t['share']:.0%}" for t in row["top"][:3])
            lines.append(
                f"| {report['model']} | {row['batch']} | {row['mode']} | {row['ms_per_step']:.1f} "
                f"| {row['host_ms_per_step']:.1f} | {'-' if busy is None else f'{busy:.0%}'} "
                f"| {tops} |"
            )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu"))
