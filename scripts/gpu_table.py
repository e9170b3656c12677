"""Markdown tables of the JSON files that scripts/bench_gpu.py writes: eager vs units (CUDA
graphs) per model, batch and mode, in ms per AR step and s/image, with each mode's speed-up
over exact MAR under the units, peak memory, and the units' capture time and memory
(units_*.json); torch.profiler summaries (profile_*.json); the cache-aware attention variants
(attention_*.json); the service under the load bench (loadbench_*.json); each stage's outcome
(status_*.json). Also the eager per-phase tables of older runs (mar_*.json: per image, per
phase, speed-up over exact MAR, ms per AR step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _units(report: dict) -> str:
    """How the run's phases ran: `units` (older files: `compile`, the removed torch.compile
    of the hot paths)."""
    return report.get("units", report.get("compile", "off"))


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


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
                f"| {_num(speedup, '.2f', 'x')} | {per_step} |"
            )
    units = sorted(out.glob("units_*.json"))
    if units:
        lines += [
            "",
            "| model | batch | steps | mode | eager ms/step | units ms/step | speed-up "
            "| units s/image | units vs mar | peak GiB | max token diff | units built (s, MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for path in units:
        report = json.loads(path.read_text())
        built = ", ".join(f"{name} {u['built']} ({u['build_seconds']:.1f} s, "
                          f"{u['memory_bytes'] / 2**20:.0f} MiB)"
                          for name, u in report["units"].items())  # fmt: skip
        for row in report["rows"]:
            lines.append(
                f"| {report['model']} | {row['batch']} | {report.get('steps', '-')} "
                f"| {row['mode']} | {_num(row.get('eager_ms_per_step'), '.1f')} "
                f"| {row['units_ms_per_step']:.1f} | {_num(row.get('speedup'), '.2f', 'x')} "
                f"| {_num(row.get('units_s_per_image'), '.4f')} "
                f"| {_num(row.get('units_vs_mar'), '.2f', 'x')} "
                f"| {_num(_gib(row.get('units_peak_bytes')), '.1f')} "
                f"| {_num(row.get('max_token_diff'), '.1e')} | {built} |"
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
            tops = ", ".join(f"{t['name'][:48]} {t['share']:.0%}" for t in row["top"][:3])
            lines.append(
                f"| {report['model']} | {row['batch']} | {row['mode']} | {row['ms_per_step']:.1f} "
                f"| {row['host_ms_per_step']:.1f} | {_num(row['device_busy'], '.0%')} "
                f"| {tops} |"
            )
    for path in sorted(out.glob("attention_*.json")):  # marche bench --attention
        report = json.loads(path.read_text())
        variants = list(report["rows"][0]["us_per_call"]) if report["rows"] else []
        lines += [
            "",
            f"| model | batch | calls | {' | '.join(f'{v} µs' for v in variants)} "
            f"| {' | '.join(f'{v} vs concat' for v in variants)} | errors |",
            "|---|---|---|" + "---|" * (2 * len(variants) + 1),
        ]
        for row in report["rows"]:
            us, vs = row["us_per_call"], row["vs_concat"] or {}
            lines.append(
                f"| {report['model']} | {row['batch']} | {row['calls']} | "
                + " | ".join(_num(us.get(v), ".0f") for v in variants)
                + " | "
                + " | ".join(_num(vs.get(v), ".2f", "x") for v in variants)
                + f" | {'; '.join(f'{k}: {e}' for k, e in row['errors'].items()) or '-'} |"
            )
    benches = sorted(out.glob("loadbench_*.json"))
    if benches:
        lines += [
            "",
            "| model | scheduler | idle s | capacity req/s | load | throughput req/s | p50 s "
            "| p99 s | p99 / idle | 503s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for path in benches:  # loadtest.loadbench: the service on the device
        for r in json.loads(path.read_text())["results"]:
            for load, x in r["loads"].items():
                lines.append(
                    f"| {r['model']} | {r['scheduler']} | {r['idle_latency_s']:.3f} "
                    f"| {r['capacity_rps']:.2f} | {float(load):.0%} | {x['throughput_rps']:.2f} "
                    f"| {x['p50_s']:.3f} | {x['p99_s']:.3f} "
                    f"| {x['p99_s'] / r['idle_latency_s']:.1f} | {x['shed_503']} |"
                )
    for path in sorted(out.glob("status_*.json")):  # scripts/bench_gpu.py: each stage's outcome
        part = path.stem.removeprefix("status_")
        lines += ["", f"| {part} stage | status | seconds | limit s |", "|---|---|---|---|"]
        for o in json.loads(path.read_text()):
            lines.append(f"| {o['stage']} | {o['status']} | {o['seconds']:.0f} | {o['limit_s']} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gpu"))
