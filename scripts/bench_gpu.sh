#!/usr/bin/env bash
# One CUDA device, one script, under 9 minutes: the GPU tests; the batch-1 latency of every mode
# (mar, marche, turbo) on MAR-B, eager and with CUDA graphs (--compile reduce-overhead); then
# every mode on MAR-B/L/H at batch 128. 64 steps, default cfg, bf16 autocast, random weights.
# Writes JSON per run and table.md. Each command has its own timeout; they sum to 525 s, so the
# whole stays under 9 minutes with the device query and the table, inside the device tool's
# 10-minute command (tests/test_scripts.py checks the sum). The budgets are
# estimates (paper Table 1 per-image times × 128 × three modes, plus start-up), not measured: a
# command that runs out is reported as "failed or timed out" and the table shows the rest.
# Needs an environment with CUDA torch and this package (the Docker image, or `pip install -e .`
# on a GPU node). Usage: scripts/bench_gpu.sh [OUT_DIR]   (default out/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
MARCHE="$PY -m marche"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/device.txt" 2>/dev/null

echo "== GPU tests"
timeout 40 "$PY" -m pytest -q -m gpu tests/engine/test_cuda.py 2>&1 | tail -5 | tee "$OUT/tests.txt"

# Batch 1: a lone request, the latency floor (issue 24). Eager is bound by kernel launches;
# reduce-overhead replays CUDA graphs (its warm-up compiles every row count a run meets).
echo "== mar_base, batch 1, bf16, eager"
timeout 60 $MARCHE bench --model mar_base --batch 1 --dtype bf16 --device cuda \
  --modes mar,marche,turbo --json "$OUT/mar_base_b1.json" || echo "mar_base b1: failed or timed out"
echo "== mar_base, batch 1, bf16, CUDA graphs"
timeout 90 $MARCHE bench --model mar_base --batch 1 --dtype bf16 --device cuda \
  --modes mar,marche,turbo --compile reduce-overhead --json "$OUT/mar_base_b1_graphs.json" \
  || echo "mar_base b1 graphs: failed or timed out"

declare -A BUDGET_S=([mar_base]=75 [mar_large]=110 [mar_huge]=150)
for model in mar_base mar_large mar_huge; do
  echo "== $model, batch 128, bf16"
  timeout "${BUDGET_S[$model]}" $MARCHE bench --model "$model" --batch 128 --dtype bf16 --device cuda \
    --modes mar,marche,turbo --json "$OUT/$model.json" || echo "$model: failed or timed out"
done

"$PY" scripts/gpu_table.py "$OUT" | tee "$OUT/table.md"
