#!/usr/bin/env bash
# Capacity through HAProxy with 1 and with 2 `s2s serve` replicas (docs/scaling.md, Serving):
# for each pool size, `s2s serve-pool start`, then `s2s loadtest --url` at the balancer over a sweep
# of session counts, then the pool is stopped. Capacity is the most sessions whose p95 first-audio
# latency stays under P95_MS with no error and no drop. Reports land in artifacts/scale/.
#   scripts/pool_capacity.sh [MODEL] [SESSIONS] [P95_MS]
#   e.g. scripts/pool_capacity.sh models:/telugu-s2s@champion 1,2,4,8,12,16 300
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models:/telugu-s2s@champion}
SESSIONS=${2:-1,2,4,8,12,16}
P95_MS=${3:-300}
PORT=${PORT:-18000}
OUT=artifacts/scale
mkdir -p "$OUT"
for replicas in 1 2; do
  dir="$OUT/pool-$replicas"
  rm -f "$dir/pool.json"
  .venv/bin/s2s serve-pool start --replicas "$replicas" --port "$PORT" --model "$MODEL" --dir "$dir" \
      --set serving.max_sessions=64 > "$OUT/pool-$replicas.out" 2>&1 &
  pool=$!
  until [ -f "$dir/pool.json" ] && grep -q '"status": "ready"' "$dir/pool.json"; do
    kill -0 "$pool" 2>/dev/null || { cat "$OUT/pool-$replicas.out"; exit 1; }
    sleep 1
  done
  .venv/bin/s2s loadtest --url "ws://127.0.0.1:$PORT/ws" --sessions "$SESSIONS" --turns 2 --compare-unbatched 0 \
      --soak-seconds 0 --out "$OUT/loadtest-$replicas.md" --json "$OUT/loadtest-$replicas.json" || true
  kill -TERM "$pool"
  wait "$pool" || true
done
.venv/bin/python - "$OUT" "$P95_MS" <<'EOF'
import json, sys
out, limit = sys.argv[1], float(sys.argv[2])
capacity = {}
for replicas in (1, 2):
    runs = json.load(open(f"{out}/loadtest-{replicas}.json"))["runs"]
    ok = [r["clients"] for r in runs if not r["errors"] and not r["dropped"]
          and r["turns_completed"] == r["turns_planned"] and (r["latency_ms"]["p95"] or 1e9) < limit]
    capacity[replicas] = max(ok, default=0)
    for r in runs:
        lat, nan = r["latency_ms"], float("nan")
        print(f"{replicas} replica(s), {r['clients']:3d} sessions: p95 {lat['p95'] or nan:.0f} ms, "
              f"mean {lat['mean'] or nan:.0f} ms, RTF {r['reply_rtf_median'] or nan:.2f}, "
              f"{r['turns_completed']}/{r['turns_planned']} turns, {r['errors']} errors, {r['dropped']} dropped")
ratio = capacity[2] / capacity[1] if capacity[1] else float("nan")
print(f"capacity (p95 < {limit:g} ms, no errors): 1 replica {capacity[1]}, 2 replicas {capacity[2]}, ratio {ratio:.2f}")
EOF
