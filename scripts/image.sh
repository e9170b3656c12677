#!/usr/bin/env bash
# Build the repository's Dockerfile with podman on a machine with no Docker engine and no
# image registry (make image), and the stand-ins it needs (deploy/README.md, "Building the
# image without Docker"):
#
#   scripts/image.sh base        the Dockerfile's FROM (python:3.11-slim) made locally: a
#                                debootstrap Debian 12 with Python 3.11, and Prometheus's image
#                                (prom/prometheus:v3.5.0) from Debian's prometheus package
#   scripts/image.sh build       base, then the image (marche-serve:latest), its size and time
#
# The Dockerfile is the one a GPU node builds; here build arguments point it at this machine's
# package sources: the CPU torch wheel pip's find-links holds (PIP_FIND_LINKS, default
# /opt/wheels; without one the build pulls the CUDA wheels) and the host's CA bundle (mounted at
# the path the image's pip is told to trust). Cached between runs: the stand-ins (built once,
# kept by podman; IMAGE_REBUILD_BASE=1 makes them anew) and every layer of the image whose
# inputs did not change (code edits rebuild only the last layers).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"

IMAGE="${IMAGE:-marche-serve:latest}"
BASE="docker.io/library/python:3.11-slim"        # the Dockerfile's FROM, fully qualified
PROMETHEUS="docker.io/prom/prometheus:v3.5.0"    # deploy/compose.yml's default
DEBIAN="localhost/debian-bookworm:base"
CACHE="${IMAGE_CACHE:-$HOME/.cache/marche-image}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WHEELS="${PIP_FIND_LINKS:-/opt/wheels}"
TORCH_PIN="$(sed -n 's/^TORCH *:= *//p' Makefile)"  # torch==2.13.0

# podman here: runc (crun refuses hybrid cgroups), cgroupfs, ulimits under the hard limits
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

say() { printf '%s\n' "image.sh: $*" >&2; }

need() {
    local missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "missing: ${missing[*]} (apt-get install podman runc debootstrap)"
        exit 2
    fi
}

exists() { "${PODMAN[@]}" image exists "$1"; }

base() {
    need
    if [ "${IMAGE_REBUILD_BASE:-0}" = 1 ]; then
        "${PODMAN[@]}" rmi -f "$BASE" "$PROMETHEUS" "$DEBIAN" >/dev/null 2>&1 || true
    fi
    if ! exists "$DEBIAN"; then
        mkdir -p "$CACHE"
        local tarball="$CACHE/bookworm-python.tar"
        if [ ! -s "$tarball" ]; then
            local root
            root="$(mktemp -d)"
            say "debootstrap: Debian 12 (minbase) with python3, python3-venv, ca-certificates"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$root" >"$CACHE/debootstrap.log" 2>&1 \
                || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
            # python:3.11-slim's layout: python, python3 in /usr/local/bin
            ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
            ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
            rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
            tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
            rm -rf "$root"
        fi
        "${PODMAN[@]}" import \
            --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
            "$tarball" "$DEBIAN" >/dev/null
    fi
    exists "$BASE" || "${PODMAN[@]}" tag "$DEBIAN" "$BASE"
    if ! exists "$PROMETHEUS"; then
        say "prometheus: an image of Debian's package, tagged $PROMETHEUS"
        "${PODMAN[@]}" build "${LIMITS[@]}" --pull=never --network host --format docker \
            -t "$PROMETHEUS" -f deploy/prometheus/Containerfile deploy/prometheus >&2
    fi
}

build() {
    base
    local args=(--build-arg "PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    local mounts=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
    local wheel
    wheel="$(ls "$WHEELS"/"${TORCH_PIN/==/-}"+cpu-*.whl 2>/dev/null | head -1 || true)"
    if [ -n "$wheel" ]; then  # the local CPU wheel instead of the CUDA index
        mounts+=(-v "$WHEELS:/wheels:ro")
        args+=(--build-arg "TORCH_SPEC=/wheels/$(basename "$wheel")"
               --build-arg "TORCH_INDEX=https://pypi.org/simple")
    else
        say "no local CPU wheel of $TORCH_PIN in $WHEELS: the CUDA build is downloaded"
    fi
    local started=$SECONDS
    "${PODMAN[@]}" build "${LIMITS[@]}" --pull=never --network host --format docker \
        --layers "${mounts[@]}" "${args[@]}" -t "$IMAGE" -f Dockerfile . >&2
    local seconds=$((SECONDS - started))
    local size
    size="$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')"
    say "built $IMAGE in ${seconds} s, $((size / 1000000)) MB"
    printf '{"image": "%s", "build_seconds": %d, "size_bytes": %s}\n' "$IMAGE" "$seconds" "$size"
}

case "${1:-build}" in
base) base ;;
build) build ;;
*) say "usage: scripts/image.sh base|build"; exit 2 ;;
esac
