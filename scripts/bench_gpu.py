"""The device run (issue 30): one command of at most 9 minutes per part.

    python scripts/bench_gpu.py [gpu] [--out out/gpu]   (make bench-gpu)
    python scripts/bench_gpu.py service [--out ...]     (make bench-gpu-service)
    python scripts/bench_gpu.py gpu --smoke --out DIR   (every stage on digits on the CPU, tiny)

Through the device tool, write under $OUT so that the files come back:
`PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py gpu --out $OUT/gpu` (timeout_s 580); the
service part needs the wheels of scripts/gpu_wheels.sh carried (its header has the command).

A task is lent a device only by chance, with 15 minutes of device time for everything, the
machine's start included: the run is one command. Its stages go in the order their answers
matter, each under its own time limit and all under one deadline; a stage that would start
with less than half its limit left is skipped, never started to be killed. Every stage's
outcome (ok, failed, timed out, skipped) and seconds go in status_<part>.json, its output in
log.txt, nvidia-smi before and after in nvidia-smi.txt, and table.md renders whatever JSON
the stages wrote (scripts/gpu_table.py).

The `gpu` part, bf16, random weights (speed does not depend on weight values), each model's
default cfg, units as CUDA graphs sized for the batch (`--units cuda-graphs`, buckets auto):
  1. MAR-B at batch 128, 64 steps, mar / marche / turbo, eager against units (the paper's
     setting and the issue's headline targets);
  2. torch.profiler on MAR-B at batch 1 and 128 through the units: top kernels, the device's
     busy share, host time per step (16 steps);
  3. the CUDA tests: units captured and replayed against eager in every mode, no host sync in
     a non-full step (eager and units), every attention on SDPA's flash or memory-efficient
     backend;
  4. MAR-B at batch 1, 64 steps, eager against units (the batch-1 target);
  5. MAR-L and 6. MAR-H at batch 128, 64 steps, units alone (MARché's and turbo's speed-ups
     over exact MAR under the units);
  7. MARché's cache-aware attention four ways (ours, without the gather, the paper's concat
     baseline, two calls merged by log-sum-exp) per layer call on MAR-B's shapes at batch 1,
     16 and 128 (`marche bench --attention`);
  8. MAR-B at batches 4 and 16, 16 steps, eager against units;
  9. MAR-B in the service's default mode (marche) at batches 16 to 128, 16 steps, units
     alone: s/image and ms per step by batch, what the GPU default max_batch_size is chosen by;
 10. the GtR presets (quality, fast) against mar on MAR-B at batch 128, units alone.
Peak device memory is in every row; a units stage writes its JSON as each row completes, so
one stopped by its limit keeps the rows it finished. `--smoke` runs the same stages on digits
on the CPU with static units, batches of at most 4 and 4 steps: it checks their command lines
and that the table reads what they write (tests/test_scripts.py).

The `service` part: `marche serve --model mar_base` on the device (continuous batching, units
auto, bf16, 64 steps, batches up to 64) under `loadtest.loadbench` with the real engine: idle
latency, capacity (images/s at saturation) and p50/p99 at 80% of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 500  # the stages of one part; with the device queries and the table, under 9 min
QUERY_S = 15  # the device query before the stages, and nvidia-smi after them


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int  # its timeout
    argv: tuple[str, ...]  # this Python's arguments: ("-m", "marche", ...)
    env: dict[str, str] = field(default_factory=dict)


class Sizes:
    """The settings of a real run, or of a smoke run on the CPU (digits, static units, batches
    of at most 4, 4 steps)."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = ["--device", "cpu", "--dtype", "fp32"] if smoke else [
            "--device", "cuda", "--dtype", "bf16"]  # fmt: skip
        self.units = "static" if smoke else "cuda-graphs"

    def model(self, name: str) -> str:
        return "digits" if self.smoke else name

    def batches(self, *sizes: int) -> str:
        sizes = tuple(dict.fromkeys(min(b, 4) for b in sizes)) if self.smoke else sizes
        return ",".join(map(str, sizes))

    def steps(self, n: int) -> str:
        return str(4 if self.smoke else n)


def gpu_stages(sizes: Sizes, out: Path) -> list[Stage]:
    """The `gpu` part's stages, most important first."""

    def units(
        name: str,
        limit_s: int,
        model: str,
        batches: tuple[int, ...],
        steps: int,
        modes: str = "mar,marche,turbo",
        repeats: int = 1,
        eager: bool = True,
    ) -> Stage:
        argv = (
            "-m",
            "marche",
            "bench",
            "--model",
            sizes.model(model),
            *sizes.device,
            "--units",
            sizes.units,
            "--batches",
            sizes.batches(*batches),
            "--steps",
            sizes.steps(steps),
            "--modes",
            modes,
            "--repeats",
            str(repeats),
            *(() if eager else ("--no-eager",)),
            "--json",
            str(out / f"units_{name}.json"),
        )
        return Stage(name, limit_s, argv)  # fmt: skip

    tests = ("-m", "pytest", "-q", "-m", "gpu", "tests/engine/test_cuda.py")
    profile = ("-m", "marche", "bench", "--profile", "--model", sizes.model("mar_base"),
               *sizes.device, "--units", sizes.units, "--modes", "mar,marche,turbo",
               "--batches", sizes.batches(1, 128), "--steps", sizes.steps(16),
               "--json", str(out / "profile_mar_base.json"))  # fmt: skip
    attention = ("-m", "marche", "bench", "--attention", "--model", sizes.model("mar_base"),
                 *sizes.device, "--batches", sizes.batches(1, 16, 128),
                 "--json", str(out / "attention_mar_base.json"))  # fmt: skip
    return [
        units("mar_base_b128", 180, "mar_base", (128,), 64),
        Stage("profile", 60, profile),
        Stage("tests", 90, tests + (("--collect-only",) if sizes.smoke else ())),
        units("mar_base_b1", 90, "mar_base", (1,), 64, repeats=2),
        units("mar_large_b128", 50, "mar_large", (128,), 64, eager=False),
        units("mar_huge_b128", 70, "mar_huge", (128,), 64, eager=False),
        Stage("attention", 30, attention),
        units("mar_base_b4_b16", 45, "mar_base", (4, 16), 16),
        units("mar_base_batches", 45, "mar_base", (16, 32, 64, 128), 16, "marche", eager=False),
        units("mar_base_b128_gtr", 45, "mar_base", (128,), 64, "mar,quality,fast", eager=False),
    ]


def service_stages(sizes: Sizes, out: Path) -> list[Stage]:
    """The `service` part: start-up (weights, CUDA graphs) ~1-2 min, 3 idle requests,
    capacity 45 s, 80% load 60 s."""
    model = sizes.model("mar_base")
    env = {"MARCHE_MODEL": model, "MARCHE_DEVICE": "cpu" if sizes.smoke else "cuda"}
    if model != "digits":
        env["MARCHE_RANDOM_WEIGHTS"] = "1"
    timing = (
        ("--idle-requests", "1", "--capacity-s", "5", "--duration", "5")
        if sizes.smoke
        else ("--idle-requests", "3", "--capacity-s", "45", "--duration", "60")
    )
    argv = ("-m", "loadtest.loadbench", "--schedulers", "continuous", "--steps", sizes.steps(64),
            "--max-batch-size", sizes.batches(64), *timing, "--loads", "0.8",
            "--out", str(out / f"loadbench_{model}"),
            "--server-log", str(out / f"server_{model}.log"))  # fmt: skip
    return [Stage(f"loadbench_{model}", 480, argv, env)]


PARTS = {"gpu": gpu_stages, "service": service_stages}


def run_stages(stages: list[Stage], log, deadline_s: float = DEADLINE_S) -> list[dict]:
    """Each stage under min(its limit, the time left), in order; one with less than half its
    limit left is skipped. Returns each stage's outcome."""
    started, outcomes = time.monotonic(), []
    for stage in stages:
        left = deadline_s - (time.monotonic() - started)
        outcome = {"stage": stage.name, "limit_s": stage.limit_s}
        if left < stage.limit_s / 2:
            outcomes.append(outcome | {"status": "skipped (deadline)", "seconds": 0.0})
            log.write(f"== {stage.name}: skipped, {left:.0f} s left\n")
            continue
        timeout = min(stage.limit_s, left)
        log.write(f"== {stage.name} (limit {timeout:.0f} s): {' '.join(stage.argv)}\n")
        log.flush()
        begun = time.monotonic()
        status = _run(stage, log, timeout)
        seconds = time.monotonic() - begun
        log.write(f"== {stage.name}: {status} in {seconds:.0f} s\n")
        outcomes.append(outcome | {"status": status, "seconds": round(seconds, 1)})
    return outcomes


def _run(stage: Stage, log, timeout: float) -> str:
    """One stage in its own process group, so that a timeout stops what it started too (the
    load bench's server)."""
    proc = subprocess.Popen([sys.executable, *stage.argv], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=os.environ | stage.env,
                            start_new_session=True)  # fmt: skip
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # 10 s to stop, then whatever is left is killed
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timed out"
    return "ok" if code == 0 else f"failed (exit {code})"


def query_device(out: Path, smoke: bool) -> None:
    """device.txt (torch's name of the device, torch's version) and nvidia-smi.txt."""
    probe = ("import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() "
             "else 'cpu (smoke)', torch.__version__)")  # fmt: skip
    name = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=QUERY_S).stdout.strip()  # fmt: skip
    (out / "device.txt").write_text(name + "\n")
    if not smoke:
        if name.startswith("cpu"):
            raise SystemExit("no CUDA device (run with --smoke on a CPU)")
        _nvidia_smi(out, "before")


def _nvidia_smi(out: Path, when: str) -> None:
    try:
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                              timeout=QUERY_S).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        text = f"nvidia-smi: {exc}\n"
    with (out / "nvidia-smi.txt").open("a") as f:
        f.write(f"== {when}\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="gpu", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu")
    parser.add_argument("--smoke", action="store_true", help="digits on the CPU, tiny sizes")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    query_device(out, args.smoke)
    stages = PARTS[args.part](Sizes(args.smoke), out)
    with (out / "log.txt").open("a") as log:
        outcomes = run_stages(stages, log)
    if not args.smoke:
        _nvidia_smi(out, "after")
    (out / f"status_{args.part}.json").write_text(json.dumps(outcomes, indent=2) + "\n")
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_table.py"), str(out)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    (out / "table.md").write_text(table)
    sys.stdout.write(table)
    return 0 if all(o["status"] == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
