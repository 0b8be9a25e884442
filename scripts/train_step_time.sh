#!/usr/bin/env bash
# Codec training step time on two nodes against one process at the same global batch
# (docs/scaling.md, Training): one process at batch B, then two `s2s train node` launches meeting
# in a c10d rendezvous on loopback at batch B/2 each; the median `step_seconds` of each run's
# metrics.jsonl (the first logged window, with its warm-up, left out). Run in the project whose
# corpus it trains on (S2S_ROOT or the current folder); outputs under artifacts/step-time/.
#   scripts/train_step_time.sh [STEPS] [BATCH] [--set ...]
#   e.g. scripts/train_step_time.sh 30 16
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
S2S="$HERE/.venv/bin/s2s"
STEPS=${1:-30}
BATCH=${2:-16}
shift $(( $# > 2 ? 2 : $# ))
PORT=${PORT:-29511}
OUT=artifacts/step-time
rm -rf "$OUT"
mkdir -p "$OUT"
common=(--no-mlflow --set "codec_train.max_steps=$STEPS" --set codec_train.kmeans_iterations=3
        --set codec_train.eval_items=2 --set codec_train.unseen_items=2 --set codec_train.log_every=5 "$@")
"$S2S" train codec "${common[@]}" --set "codec_train.batch_size=$BATCH" --set "codec_train.out_dir=$OUT/one" \
    --force > "$OUT/one.log" 2>&1
two=(--set distributed.nnodes=2 --set "distributed.rdzv_endpoint=127.0.0.1:$PORT"
     --set "codec_train.batch_size=$((BATCH / 2))" --set "codec_train.out_dir=$OUT/two")
"$S2S" train node --stage codec "${common[@]}" "${two[@]}" > "$OUT/node-a.log" 2>&1 &
node_a=$!
"$S2S" train node --stage codec "${common[@]}" "${two[@]}" > "$OUT/node-b.log" 2>&1
wait "$node_a"
"$HERE/.venv/bin/python" - "$OUT" "$BATCH" <<'EOF'
import json, statistics, sys
out, batch = sys.argv[1], int(sys.argv[2])
median = {}
for run in ("one", "two"):
    rows = [json.loads(line) for line in open(f"{out}/{run}/metrics.jsonl")]
    steps = [r["step_seconds"] for r in rows if "step_seconds" in r][1:]
    median[run] = statistics.median(steps)
print(f"global batch {batch}: one process {median['one']:.3f} s/step, two nodes x 1 process "
      f"{median['two']:.3f} s/step, ratio (two / one) {median['two'] / median['one']:.2f}")
EOF
