#!/bin/sh
# The image's default command: a one-node Ray cluster, then the Serve application of
# deploy/serve_config.yaml in it (`marche serve --ray` connected to that cluster), in the
# foreground (replica logs go to stdout).
#
# Engine replicas: one per GPU the cluster sees. By default the engine autoscales on work
# between the config's min_replicas and every visible GPU (capped by its max_replicas), starting
# with all of them; MARCHE_REPLICAS=N fixes N replicas instead. Which GPUs are visible is the
# container's business (compose: `count: all`; docker run: --gpus).
#
#   MARCHE_SERVE_CONFIG      Serve config file (default /app/deploy/serve_config.yaml)
#   MARCHE_REPLICAS          a fixed number of engine replicas (default: autoscale, see above)
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
    --port=6379 \
    --metrics-export-port="${metrics_port}" \
    --dashboard-host=0.0.0.0 \
    --disable-usage-stats \
    ${RAY_START_ARGS:-}

serve_pid=""

stop() {
    trap - TERM INT
    echo "start-ray-serve: shutting down Serve (draining requests), then Ray" >&2
    if [ -n "${serve_pid}" ]; then
        kill -TERM "${serve_pid}" 2>/dev/null || true  # marche serve --ray: serve.shutdown()
        wait "${serve_pid}" || true
    fi
    ray stop --grace-period 10 || true
    exit 0
}
trap stop TERM INT

RAY_ADDRESS=127.0.0.1:6379 marche serve --ray --config "${config}" --host 0.0.0.0 --port 8000 &
serve_pid=$!

status=0
wait "${serve_pid}" || status=$?
# marche serve --ray ended on its own (bad config, lost cluster): stop Ray and report its status
# so the container restarts.
echo "start-ray-serve: marche serve --ray exited with status ${status}" >&2
ray stop --grace-period 10 || true
exit "${status}"
