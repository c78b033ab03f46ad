#!/usr/bin/env bash
# Per-step time of `remask serve` (in-process worker) against a 2-stage
# cluster (etcd + coordinator + 2 workers) on loopback, same model, side by
# side in one run; then throughput of `serve` at 1, 4 and 16 concurrent
# requests (what step-level batching buys).
#
#   bench/cluster_vs_serve.sh MODEL_DIR [ROUNDS=3]
#
# Needs etcd on PATH, python3 with grpcio (tests/grpc/requirements.txt).
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR [ROUNDS]}
ROUNDS=${2:-3}
R=${REMASK_BIN:-target/release/remask}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TMP=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
unset "${!REMASK_@}" 2>/dev/null || true

EP=$(free_port); PP=$(free_port)
etcd --name b --data-dir "$TMP/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "b=http://127.0.0.1:$PP" \
  --heartbeat-interval 10 --election-timeout 100 --log-level error >"$TMP/etcd.log" 2>&1 &
PIDS+=($!)
SERVE=$(free_port); COORD=$(free_port)
"$R" serve --model "$MODEL" --listen "127.0.0.1:$SERVE" --no-http 2>"$TMP/serve.log" & PIDS+=($!)
sleep 1
for i in 1 2; do
  "$R" worker --listen "127.0.0.1:$(free_port)" --etcd "http://127.0.0.1:$EP" 2>"$TMP/w$i.log" & PIDS+=($!)
done
"$R" coordinator --model "$MODEL" --listen "127.0.0.1:$COORD" --no-http --etcd "http://127.0.0.1:$EP" --stages 2 \
  2>"$TMP/coord.log" & PIDS+=($!)

REQ=(--prompt-ids "$(seq -s, 1 288)" --gen-length 32 --steps 32 --block-length 32 --json)
wait_ready() { for _ in $(seq 600); do "$R" generate --endpoint "127.0.0.1:$1" --prompt-ids 1 --gen-length 1 --steps 1 --block-length 1 --json >/dev/null 2>&1 && return; sleep 0.2; done; echo "not ready: $1" >&2; exit 1; }
wait_ready "$SERVE"; wait_ready "$COORD"

echo "per-step time, prompt 288 + gen 32 = 320 tokens, 32 steps, B=1 (ms)"
printf "%-8s %10s %10s %10s %12s\n" round serve cluster ratio coord_ms
for r in $(seq "$ROUNDS"); do
  s=$("$R" generate --endpoint "127.0.0.1:$SERVE" "${REQ[@]}")
  c=$("$R" generate --endpoint "127.0.0.1:$COORD" "${REQ[@]}")
  python3 - "$s" "$c" "$r" <<'PY'
import json, sys
s, c, r = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
assert s["token_ids"] == c["token_ids"], "serve and cluster disagree"
ps, pc = s["elapsed_ms"] / s["steps"], c["elapsed_ms"] / c["steps"]
# the coordinator's own time per step: everything but the stages' compute
own = (c["elapsed_ms"] - c["compute_ms"]) / c["steps"]
print(f"{r:<8} {ps:10.2f} {pc:10.2f} {pc / ps:10.3f} {own:12.2f}")
PY
done

echo
echo "throughput of serve, prompt 32 + gen 64, 64 steps, block 32"
for c in 1 4 16; do
  n=$(( c < 4 ? 4 : c ))
  python3 "$HERE/grpc_load.py" --endpoint "127.0.0.1:$SERVE" --concurrency "$c" --requests "$n" \
    --prompt-len 32 --gen-length 64 --steps 64 --block-length 32 --json |
    python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(f'concurrency {$c:>2}: {d[\"tokens_per_s\"]:8.1f} tok/s  p50 {d[\"latency_ms_p50\"]:9.1f} ms')"
done
