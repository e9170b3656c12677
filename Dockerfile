# MARché Serve on a GPU node (CUDA wheels of torch bundle their CUDA libraries; the host needs
# only the NVIDIA driver and container toolkit). Build: docker build -t marche-serve .
FROM python:3.11-slim

# The CUDA build of the pinned torch. Override TORCH_INDEX for another CUDA version, or set it
# to https://download.pytorch.org/whl/cpu for a CPU-only image.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY service ./service
COPY marche ./marche
RUN pip install .

RUN useradd --create-home --uid 1000 marche
USER marche
ENTRYPOINT ["marche"]
CMD ["info"]
