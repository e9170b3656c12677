"""Markdown table of the `marche bench` JSON files that scripts/bench_gpu.sh writes (per image,
per phase, speed-up over exact MAR, and milliseconds per AR step: the latency floor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    info = out / "device.txt"
    device = info.read_text().splitlines()[0] if info.exists() else "?"
    lines = [
        f"Device: {device}",
        "",
        "| model | compile | batch | mode | s/image | encoder | decoder | head | VAE | vs mar "
        "| ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("mar_*.json")):
        report = json.loads(path.read_text())
        for mode, r in report["modes"].items():
            ph = r["phases_s_per_image"]
            speedup = report.get("speedup", {}).get(mode)
            steps = report.get("steps")  # AR steps per image: the latency per step
            per_step = "-" if not steps else f"{1000 * r['s_per_image'] / steps:.1f}"
            lines.append(
                f"| {report['model']} | {report['compile']} | {report['batch']} | {mode} "
                f"| {r['s_per_image']:.4f} | {ph['encoder']:.4f} | {ph['decoder']:.4f} "
                f"| {ph['diffusion_head']:.4f} | {ph['vae']:.4f} "
                f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {per_step} |"
            )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu"))
