#!/usr/bin/env bash
# `make ui`: the Prefect UI (flow runs, artifacts, deployments) and the MLflow UI (runs, registry,
# sign-off reports) on loopback, over the project's own stores (.prefect/, mlflow/).
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
STORE="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow/mlflow.db}"
mkdir -p "$ROOT/mlflow/artifacts" "$PREFECT_HOME"

.venv/bin/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$PREFECT_HOME/ui-server.log" 2>&1 &
PREFECT_PID=$!
.venv/bin/mlflow server --backend-store-uri "$STORE" --default-artifact-root "$ROOT/mlflow/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" >"$ROOT/mlflow/ui-server.log" 2>&1 &
MLFLOW_PID=$!
trap 'kill $PREFECT_PID $MLFLOW_PID 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

wait_for() {  # url name pid log
    for _ in $(seq 1 180); do
        if curl -fs "$1" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then echo "$2 failed to start; see $4" >&2; tail -20 "$4" >&2; exit 1; fi
        sleep 1
    done
    echo "$2 did not answer at $1 within 180 s; see $4" >&2; exit 1
}
wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" Prefect $PREFECT_PID "$PREFECT_HOME/ui-server.log"
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" MLflow $MLFLOW_PID "$ROOT/mlflow/ui-server.log"
echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT   (flow runs, artifacts, deployments)"
echo "MLflow UI:  http://127.0.0.1:$MLFLOW_PORT   (experiment telugu-s2s, model registry: telugu-s2s)"
echo "Run a worker for deployments: PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api .venv/bin/prefect worker start --pool s2s-process"
echo "Ctrl-C stops both."
wait
