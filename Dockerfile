# MARché Serve on a GPU node (CUDA wheels of torch bundle their CUDA libraries; the host needs
# only the NVIDIA driver and container toolkit). Build: docker build -t marche-serve .
#
# Default command: a one-node Ray cluster plus the Ray Serve application of
# deploy/serve_config.yaml (deploy/start-ray-serve.sh). Alternatives, same image:
#   docker run --gpus all -p 8000:8000 marche-serve marche serve --host 0.0.0.0 --port 8000
#   docker run marche-serve marche info
# The full stack (Prometheus, Grafana, Locust) is deploy/compose.yml; see deploy/README.md.
FROM python:3.11-slim

# The CUDA build of the pinned torch (the same version as TORCH in the Makefile). Override
# TORCH_INDEX for another CUDA version, or set it to https://download.pytorch.org/whl/cpu for a
# CPU-only image.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# wget: KubeRay's default exec probes call it on Ray pods (deploy/kuberay/rayservice.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /app

# Dependencies first, in their own layer (Ray is large): install the project's [ray] extras
# against empty package stubs, then drop the stub install so code edits don't re-resolve them.
# torch is already satisfied above, so pip keeps the CUDA build.
COPY pyproject.toml README.md ./
RUN mkdir -p engine service marche \
    && touch engine/__init__.py service/__init__.py marche/__init__.py \
    && pip install ".[ray]" \
    && pip uninstall -y marche-serve \
    && rm -rf engine service marche build ./*.egg-info

COPY engine ./engine
COPY service ./service
COPY marche ./marche
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Serve config, entry script, monitoring files (read by the Ray Serve stack at runtime).
COPY deploy ./deploy

# Histogram buckets of Ray Serve's built-in latency metrics (ms): finer between 0.5 s and 30 s,
# where one MAR generation lands. Read by every Ray process started in this image.
ENV RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS="1,2,5,10,20,50,100,200,500,750,1000,1500,2000,3000,4000,5000,7500,10000,15000,20000,30000,60000,120000,300000,600000"

RUN useradd --create-home --uid 1000 marche && mkdir -p /models && chown marche /models
USER marche

# 8000: HTTP (Ray Serve proxy or uvicorn), 8080: Ray metrics export, 8265: Ray dashboard.
EXPOSE 8000 8080 8265

CMD ["sh", "/app/deploy/start-ray-serve.sh"]
