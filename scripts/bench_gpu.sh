#!/usr/bin/env bash
# One CUDA device, one script per part, each under 9 minutes (the device tool's command is 10):
#
#   scripts/bench_gpu.sh latency [OUT_DIR]     (make bench-gpu; the default part)
#     the GPU tests, then the latency floor (issue 24): every mode (mar, marche, turbo) at
#     batch 1 on MAR-B/L/H and at batches 4 and 16 on MAR-B, eager vs the head and the
#     transformer's full passes as CUDA graphs per bucket (marche bench --units cuda-graphs),
#     interleaved in one process per model;
#   scripts/bench_gpu.sh throughput [OUT_DIR]  (make bench-gpu-throughput)
#     every mode (mar, marche, turbo, quality, fast) on MAR-B/L/H at batch 128 (the papers'
#     setting), then torch.profiler on MAR-B at batch 1 and 128 (8 steps; mar, marche, turbo):
#     top kernels, the device's busy share, host time per step;
#   scripts/bench_gpu.sh service [OUT_DIR]     (make bench-gpu-service)
#     `marche serve --model mar_base` on the device (continuous batching, units auto, bf16,
#     64 steps) under the load bench with the real engine: idle latency, capacity (images/s
#     at saturation) and p50/p99 at 80% of it (loadbench_mar_base.{json,md,png}).
#
# bf16 autocast, random weights (speed does not depend on weight values), default cfg.
# Latency runs take 16 AR steps (the table reports ms per step; a 64-step image is ~4x), the
# throughput runs 64. Every command has its own timeout; a part's timeouts sum to at most 525
# s (tests/test_scripts.py checks), leaving 15 s for the device query and the table. The
# budgets are estimates from the first H200 run (docs/results/gpu_h200), not guarantees: a
# command that runs out is reported as "failed or timed out" and the table shows the rest.
# Needs CUDA torch and this package (the Docker image, or `pip install -e .` on a GPU node).
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-latency}"
OUT="${2:-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
MARCHE="$PY -m marche"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/device.txt" 2>/dev/null

units() {  # units NAME SECONDS ARGS...: eager vs CUDA graphs, JSON to $OUT/units_NAME.json
  local name="$1" seconds="$2"
  shift 2
  echo "== units $name"
  timeout "$seconds" $MARCHE bench --dtype bf16 --device cuda --modes mar,marche,turbo \
    --units cuda-graphs --steps 16 --repeats 3 --json "$OUT/units_$name.json" "$@" \
    || echo "units $name: failed or timed out"
}

run() {  # run NAME SECONDS ARGS...: one `marche bench` under its timeout, JSON to $OUT/NAME.json
  local name="$1" seconds="$2"
  shift 2
  echo "== $name"
  timeout "$seconds" $MARCHE bench --dtype bf16 --device cuda --modes mar,marche,turbo,quality,fast \
    --json "$OUT/$name.json" "$@" || echo "$name: failed or timed out"
}

service_bench() {  # service_bench NAME SECONDS ARGS...: loadtest.loadbench against `marche serve`
  local name="$1" seconds="$2"
  shift 2
  echo "== service $name"
  MARCHE_DEVICE=cuda MARCHE_RANDOM_WEIGHTS=1 timeout "$seconds" "$PY" -m loadtest.loadbench \
    --schedulers continuous --out "$OUT/$name" "$@" || echo "service $name: failed or timed out"
}

case "$PART" in
latency)
  echo "== GPU tests"
  timeout 75 "$PY" -m pytest -q -m gpu tests/engine/test_cuda.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
  # eager vs units (the head per (plan, token bucket), the transformer's passes per (call,
  # known-token bucket), as CUDA graphs), interleaved per mode and batch in one process;
  # capture time and memory are in the JSON and the table
  declare -A B1_S=([mar_base]=95 [mar_large]=105 [mar_huge]=120)
  for model in mar_base mar_large mar_huge; do
    units "${model}_b1" "${B1_S[$model]}" --model "$model" --batches 1
  done
  declare -A SMALL_S=([b4_b16]=120)
  units mar_base_b4_b16 "${SMALL_S[b4_b16]}" --model mar_base --batches 4,16
  ;;
throughput)
  # GtR's modes take 40 (fast) and 48 (quality) of the 64 steps, on top of turbo's caches:
  # ~+45% on the budgets of mar, marche and turbo alone (76 / 112 / 152 s)
  declare -A BUDGET_S=([mar_base]=110 [mar_large]=160 [mar_huge]=215 [profile]=40)
  for model in mar_base mar_large mar_huge; do
    run "$model" "${BUDGET_S[$model]}" --model "$model" --batch 128
  done
  echo "== profile"
  timeout "${BUDGET_S[profile]}" $MARCHE bench --profile --dtype bf16 --device cuda \
    --model mar_base --modes mar,marche,turbo --batches 1,128 --steps 8 \
    --json "$OUT/profile_mar_base.json" || echo "profile: failed or timed out"
  ;;
service)
  # start-up (weights, CUDA graphs) ~1-2 min, idle 3 requests, capacity 45 s, 80% load 60 s
  declare -A SERVICE_S=([mar_base]=480)
  MARCHE_MODEL=mar_base service_bench loadbench_mar_base "${SERVICE_S[mar_base]}" --steps 64 \
    --max-batch-size 64 --idle-requests 3 --capacity-s 45 --loads 0.8 --duration 60
  ;;
*)
  echo "usage: scripts/bench_gpu.sh latency|throughput|service [OUT_DIR]" >&2
  exit 2
  ;;
esac

"$PY" scripts/gpu_table.py "$OUT" | tee "$OUT/table.md"
