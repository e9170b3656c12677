#!/bin/sh
# The image's default command: a one-node Ray cluster, then the Serve application of
# deploy/serve_config.yaml in it, in the foreground (replica logs go to stdout).
#
#   MARCHE_SERVE_CONFIG      Serve config file (default /app/deploy/serve_config.yaml)
#   RAY_METRICS_EXPORT_PORT  Prometheus exporter of Ray and of the app's metrics (default 8080)
#   RAY_START_ARGS           extra `ray start` flags, e.g. "--num-gpus=1" for a logical GPU
#
# On SIGTERM (docker stop, compose down) Serve is shut down gracefully first, so requests in
# flight can finish within each deployment's graceful_shutdown_timeout_s, then Ray is stopped.
# Run the container with an init process (compose: `init: true`) so Ray's daemons are reaped.
set -eu

config="${MARCHE_SERVE_CONFIG:-/app/deploy/serve_config.yaml}"
metrics_port="${RAY_METRICS_EXPORT_PORT:-8080}"

# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
ray start --head \
    --metrics-export-port="${metrics_port}" \
    --dashboard-host=0.0.0.0 \
    --disable-usage-stats \
    ${RAY_START_ARGS:-}

serve_pid=""

stop() {
    trap - TERM INT
    echo "start-ray-serve: shutting down Serve (draining requests), then Ray" >&2
    # serve.shutdown() waits (up to 30 s) for the controller's graceful shutdown; the
    # `serve shutdown` CLI would only send the request and return.
    python -c 'import ray; from ray import serve; ray.init(address="auto", log_to_driver=False); serve.shutdown()' || true
    if [ -n "${serve_pid}" ]; then
        kill "${serve_pid}" 2>/dev/null || true
    fi
    ray stop --grace-period 10 || true
    exit 0
}
trap stop TERM INT

serve run "${config}" &
serve_pid=$!

status=0
wait "${serve_pid}" || status=$?
# `serve run` ended on its own (bad config, lost cluster): stop Ray and report its status so the
# container restarts.
echo "start-ray-serve: serve run exited with status ${status}" >&2
ray stop --grace-period 10 || true
exit "${status}"
