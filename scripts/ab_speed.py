"""Time two checkouts of this repository against each other, interleaved, in one run.

    git worktree add /tmp/base <commit>
    python scripts/ab_speed.py --base /tmp/base --case digits:marche:1:32 --case mar_base:marche:1:4

Each case is model:mode:batch:steps (cfg 3.0; official sizes with random weights: speed does
not depend on weight values). Every round runs each case once in a fresh process per
checkout, alternating which goes first; a process warms up once, then times `--runs` images.
Reported: the median seconds per AR step of each side and the ratio base / this tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time, torch
from dataclasses import replace
from engine.decode.policy import make_policy
from engine.pipeline import Pipeline
model, mode, batch, steps, cfg, runs = sys.argv[1:7]
torch.manual_seed(0)
pipe = Pipeline.load(model, device="cpu", random_weights=model != "digits")
params = replace(pipe.spec.defaults, num_iter=int(steps), cfg=float(cfg))
classes, seeds = [1] * int(batch), list(range(int(batch)))
def once():
    start = time.perf_counter()
    pipe.generate(classes, seeds, params=params, policy=make_policy(mode))
    return (time.perf_counter() - start) / int(steps)
once()  # warm-up
print(json.dumps([once() for _ in range(int(runs))]))
"""


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_case(tree: Path, case: str, cfg: float, runs: int, threads: int | None) -> list[float]:
    model, mode, batch, steps = case.split(":")
    env = os.environ | {"PYTHONPATH": str(tree)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [sys.executable, "-c", CHILD, model, mode, batch, steps, str(cfg), str(runs)]
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout")
    parser.add_argument("--case", action="append", required=True, help="model:mode:batch:steps")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed images per process")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "this": HERE}
    times: dict[str, dict[str, list[float]]] = {c: {"base": [], "this": []} for c in args.case}
    for r in range(args.rounds):
        for case in args.case:
            order = ["base", "this"] if r % 2 == 0 else ["this", "base"]
            for side in order:
                times[case][side] += run_case(trees[side], case, args.cfg, args.runs, args.threads)
            say(f"round {r + 1}/{args.rounds} {case}: " + ", ".join(
                f"{s} {statistics.median(times[case][s]):.4f} s/step" for s in order))  # fmt: skip
    rows = []
    say(
        f"\n| case (model:mode:batch:steps, cfg {args.cfg:g}) | base s/step | this s/step "
        "| speed-up |\n|---|---|---|---|"
    )
    for case, sides in times.items():
        base, this = statistics.median(sides["base"]), statistics.median(sides["this"])
        rows.append({"case": case, "base_s_per_step": base, "this_s_per_step": this,
                     "speedup": base / this, "samples": len(sides["base"])})  # fmt: skip
        say(f"| {case} | {base:.4f} | {this:.4f} | {base / this:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cfg": args.cfg, "rounds": args.rounds, "rows": rows},
                                        indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
