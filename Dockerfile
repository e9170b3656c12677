# MARché Serve on a GPU node (CUDA wheels of torch bundle their CUDA libraries; the host needs
# only the NVIDIA driver and container toolkit). Build: docker build -t marche-serve .
# Without Docker (podman, no registry): make image (scripts/image.sh, deploy/README.md).
#
# Default command: a one-node Ray cluster plus the Ray Serve application of the packaged serve
# config (deploy/start-ray-serve.sh). Alternatives, same image:
#   docker run --gpus all -p 8000:8000 marche-serve marche serve --host 0.0.0.0 --port 8000
#   docker run marche-serve marche info
# The full stack (Prometheus, Grafana, Locust) is deploy/compose.yml; see deploy/README.md.
#
# Two stages: `build` installs torch, the project's [ray] dependencies and the project into a
# virtual environment (/opt/venv), each in its own layer, least changing first (a code edit
# rebuilds only the last layers); the final image is the base, wget, that environment and
# deploy/, run as a non-root user. No compiler or build files reach it.

# ---- build: the virtual environment ---------------------------------------------------------
FROM python:3.11-slim AS build

# The CUDA build of the pinned torch (the same version as TORCH in the Makefile). Override
# TORCH_INDEX for another CUDA version, or set it to https://download.pytorch.org/whl/cpu for a
# CPU-only image (make image points TORCH_SPEC at a local CPU wheel instead).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"
# The CA bundle pip trusts (build-time only): the system's by default; behind a TLS-inspecting
# proxy, mount the proxy's bundle at this path or pass another.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /src

# Dependencies in their own layer (Ray is large): install the project's [ray] extras against
# empty package stubs, then drop the stub install so code edits don't re-resolve them. torch is
# already satisfied above, so pip keeps that build.
COPY pyproject.toml README.md ./
RUN mkdir -p engine service marche \
    && touch engine/__init__.py service/__init__.py marche/__init__.py \
    && pip install ".[ray]" \
    && pip uninstall -y marche-serve \
    && rm -rf engine service marche build ./*.egg-info

# The project itself (with its package data: the digits weights, the serve config, the web page)
COPY engine ./engine
COPY service ./service
COPY marche ./marche
RUN pip install --no-deps . \
    && cd / && python -c "from importlib.resources import files; \
assert files('engine').joinpath('weights/digits.safetensors').is_file(); \
assert files('service.ray_serve').joinpath('serve_config.yaml').is_file()"

# ---- the image ------------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="MARché Serve" \
      org.opencontainers.image.description="Masked autoregressive (MAR) image generation served with MARché decoding, under Ray Serve" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

# wget: KubeRay's default exec probes call it on Ray pods (deploy/kuberay/rayservice.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 marche && mkdir -p /models && chown marche /models

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# Histogram buckets of Ray Serve's built-in latency metrics (ms): finer between 0.5 s and 30 s,
# where one MAR generation lands. Read by every Ray process started in this image.
ENV RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS="1,2,5,10,20,50,100,200,500,750,1000,1500,2000,3000,4000,5000,7500,10000,15000,20000,30000,60000,120000,300000,600000"

WORKDIR /app

# Entry script and monitoring files; deploy/serve_config.yaml links to the packaged serve config,
# copied to where the link points.
COPY deploy ./deploy
COPY service/ray_serve/serve_config.yaml ./service/ray_serve/serve_config.yaml

USER marche

# 8000: HTTP (Ray Serve proxy or uvicorn), 8080: Ray metrics export, 8265: Ray dashboard.
EXPOSE 8000 8080 8265

# Ready = model loaded, warmed up and the device probe passes (503 until then); the same check
# as deploy/compose.yml's. No curl in the image: urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=4 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/readyz', timeout=5)"]

CMD ["sh", "/app/deploy/start-ray-serve.sh"]
