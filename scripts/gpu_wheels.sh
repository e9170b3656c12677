#!/usr/bin/env bash
# The wheels `make bench-gpu-service` needs on the lent device that its image lacks, into .whl/
# (git-ignored, 4 MB). The device's image has PyTorch, typer, rich, safetensors, numpy, httpx,
# prometheus-client, matplotlib, click, h11 and anyio (the device tool's KINDS.md), which is
# all `make bench-gpu` needs; the HTTP service also needs FastAPI and pydantic, and nothing can
# be fetched there. Its Python is 3.12. The versions are those the tests run here.
#
# Then, in the device command, with ".whl" carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
#     PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py service --out "$OUT/gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 fastapi-offline==1.7.7 starlette==1.10.0 uvicorn==0.55.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  python-dotenv==1.2.4 opentelemetry-api==1.45.2
ls .whl
