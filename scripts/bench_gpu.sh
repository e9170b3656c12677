#!/usr/bin/env bash
# One CUDA device, one script per part, each under 9 minutes (the device tool's command is 10):
#
#   scripts/bench_gpu.sh latency [OUT_DIR]     (make bench-gpu; the default part)
#     the GPU tests, then the latency floor (issue 24): every mode (mar, marche, turbo) at
#     batch 1 on MAR-B/L/H and at batches 4 and 16 on MAR-B, eager and with CUDA graphs
#     (--compile reduce-overhead: one graph per step shape, captured in the warm-up);
#   scripts/bench_gpu.sh throughput [OUT_DIR]  (make bench-gpu-throughput)
#     every mode on MAR-B/L/H at batch 128 (the papers' setting).
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

run() {  # run NAME SECONDS ARGS...: one `marche bench` under its timeout, JSON to $OUT/NAME.json
  local name="$1" seconds="$2"
  shift 2
  echo "== $name"
  timeout "$seconds" $MARCHE bench --dtype bf16 --device cuda --modes mar,marche,turbo \
    --json "$OUT/$name.json" "$@" || echo "$name: failed or timed out"
}

case "$PART" in
latency)
  echo "== GPU tests"
  timeout 30 "$PY" -m pytest -q -m gpu tests/engine/test_cuda.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
  # batch 1, every size: eager is bound by kernel launches; graphs replay each step's kernels
  declare -A EAGER_S=([mar_base]=35 [mar_large]=40 [mar_huge]=45)
  declare -A GRAPHS_S=([mar_base]=55 [mar_large]=60 [mar_huge]=65)
  for model in mar_base mar_large mar_huge; do
    run "${model}_b1_eager" "${EAGER_S[$model]}" --model "$model" --batch 1 --steps 16
    run "${model}_b1_graphs" "${GRAPHS_S[$model]}" --model "$model" --batch 1 --steps 16 \
      --compile reduce-overhead
  done
  # small batches (continuous batching's usual row counts), MAR-B
  declare -A SMALL_S=([b4_eager]=40 [b4_graphs]=60 [b16_eager]=40 [b16_graphs]=55)
  for batch in 4 16; do
    run "mar_base_b${batch}_eager" "${SMALL_S[b${batch}_eager]}" --model mar_base --batch "$batch" --steps 16
    run "mar_base_b${batch}_graphs" "${SMALL_S[b${batch}_graphs]}" --model mar_base --batch "$batch" \
      --steps 16 --compile reduce-overhead
  done
  ;;
throughput)
  declare -A BUDGET_S=([mar_base]=75 [mar_large]=110 [mar_huge]=150)
  for model in mar_base mar_large mar_huge; do
    run "$model" "${BUDGET_S[$model]}" --model "$model" --batch 128
  done
  ;;
*)
  echo "usage: scripts/bench_gpu.sh latency|throughput [OUT_DIR]" >&2
  exit 2
  ;;
esac

"$PY" scripts/gpu_table.py "$OUT" | tee "$OUT/table.md"
