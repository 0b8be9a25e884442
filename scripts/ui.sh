#!/usr/bin/env bash
# `make ui`: the operator's one command. On loopback, over the project's own stores (.prefect/,
# mlflow/): the Prefect server with the deployments of prefect.yaml registered (work pool
# s2s-process, the weekly schedule on) and a process worker on that pool, so a run started from
# the Prefect UI runs at once; and the MLflow UI (runs, registry, sign-off reports). Ctrl-C stops all.
# S2S_ROOT (default: this checkout) is the project root the deployments run in; PREFECT_PORT and
# MLFLOW_PORT move the servers (tests/test_make_ui.py runs this script on a throwaway root).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "${S2S_ROOT:-$REPO}" && pwd)"
BIN="$REPO/.venv/bin"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# leases on disk: a restarted server still knows who holds the writer slot (flows/one_writer.py)
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="${PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE:-prefect.server.concurrency.lease_storage.filesystem}"
STORE="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow/mlflow.db}"
mkdir -p "$ROOT/mlflow/artifacts" "$PREFECT_HOME"
cd "$ROOT"

"$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$PREFECT_HOME/ui-server.log" 2>&1 &
PREFECT_PID=$!
"$BIN/mlflow" server --backend-store-uri "$STORE" --default-artifact-root "$ROOT/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" >"$ROOT/mlflow/ui-server.log" 2>&1 &
MLFLOW_PID=$!
WORKER_PID=""
trap 'kill $PREFECT_PID $MLFLOW_PID $WORKER_PID 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

wait_for() {  # url name pid log
    for _ in $(seq 1 180); do
        if curl -fs "$1" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then echo "$2 failed to start; see $4" >&2; tail -20 "$4" >&2; exit 1; fi
        sleep 1
    done
    echo "$2 did not answer at $1 within 180 s; see $4" >&2; exit 1
}
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" Prefect $PREFECT_PID "$PREFECT_HOME/ui-server.log"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"

# the deployments of prefect.yaml (pool created when missing; the same deployments updated on a re-run)
"$BIN/python" -m flows.deployments --root "$ROOT"
# one worker, one flow run at a time: every flow writes the same data/, artifacts/ and MLflow store
"$BIN/prefect" worker start --pool s2s-process --limit 1 --name "make-ui-$(hostname)" \
    >"$PREFECT_HOME/ui-worker.log" 2>&1 &
WORKER_PID=$!
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" MLflow $MLFLOW_PID "$ROOT/mlflow/ui-server.log"

echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT   (flow runs, artifacts, deployments)"
echo "MLflow UI:  http://127.0.0.1:$MLFLOW_PORT   (experiment telugu-s2s, model registry: telugu-s2s)"
echo "Worker make-ui-$(hostname) on pool s2s-process (log: $PREFECT_HOME/ui-worker.log)"
echo "Start a run: Prefect UI -> Deployments -> train (or data, pipeline) -> Run -> Quick run / Custom run,"
echo "  or: PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run train/train"
echo "Ctrl-C stops all three."
wait
