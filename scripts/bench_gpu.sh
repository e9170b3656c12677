#!/usr/bin/env bash
# One CUDA device, one script, under 8 minutes: the GPU tests, then every mode (mar, marche,
# turbo) on MAR-B/L/H at batch 128, 64 steps, their default cfg, bf16 autocast, random weights,
# then MAR-B with CUDA graphs (--compile reduce-overhead). Writes JSON per run and table.md.
# Each command has its own timeout; they sum to 450 s, so the whole stays under 8 minutes with
# the device query and the table (tests/test_scripts.py checks the sum). The budgets are
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

declare -A BUDGET_S=([mar_base]=75 [mar_large]=110 [mar_huge]=150)
for model in mar_base mar_large mar_huge; do
  echo "== $model, batch 128, bf16"
  timeout "${BUDGET_S[$model]}" $MARCHE bench --model "$model" --batch 128 --dtype bf16 --device cuda \
    --modes mar,marche,turbo --json "$OUT/$model.json" || echo "$model: failed or timed out"
done
echo "== mar_base, batch 128, bf16, CUDA graphs"
timeout 75 $MARCHE bench --model mar_base --batch 128 --dtype bf16 --device cuda \
  --modes mar,marche,turbo --compile reduce-overhead --json "$OUT/mar_base_graphs.json" \
  || echo "mar_base graphs: failed or timed out"

"$PY" scripts/gpu_table.py "$OUT" | tee "$OUT/table.md"
