#!/usr/bin/env bash
# Compare one full forward pass: remask (CPU) vs the PyTorch float32 CPU reference.
#
#   bench/cpu_vs_pytorch.sh MODEL_DIR [BATCH=1] [SEQ_LEN=320] [ITERS=5]
#
# Runs the two ALTERNATING (remask, torch, remask, torch, ...) for ROUNDS rounds (default 3)
# so that machine noise hits both, then prints the median of the per-round medians for each
# and the ratio remask/pytorch (< 1 means remask is faster).
#
# Environment:
#   REMASK_BIN     remask binary (default target/release/remask)
#   PYTHON         python interpreter (default python3)
#   ROUNDS         rounds of each (default 3)
#   TORCH_THREADS  --threads for the torch script (default: its own default, os.cpu_count())
#   REMASK_ARGS    extra arguments appended to `remask bench` (e.g. "--threads 16")
set -euo pipefail

usage() { echo "usage: $0 MODEL_DIR [BATCH=1] [SEQ_LEN=320] [ITERS=5]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 4 ]] || usage
MODEL_DIR=$1
BATCH=${2:-1}
SEQ_LEN=${3:-320}
ITERS=${4:-5}
ROUNDS=${ROUNDS:-3}
REMASK_BIN=${REMASK_BIN:-target/release/remask}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TORCH_SCRIPT="$HERE/torch_forward.py"

[[ -d $MODEL_DIR ]] || { echo "error: $MODEL_DIR is not a directory" >&2; exit 2; }
[[ -x $REMASK_BIN ]] || { echo "error: $REMASK_BIN not found or not executable (cargo build --release, or set REMASK_BIN)" >&2; exit 2; }
"$PYTHON" -c 'import torch, safetensors' 2>/dev/null || { echo "error: $PYTHON cannot import torch and safetensors" >&2; exit 2; }

torch_threads=()
[[ -n ${TORCH_THREADS:-} ]] && torch_threads=(--threads "$TORCH_THREADS")
# shellcheck disable=SC2206
remask_extra=(${REMASK_ARGS:-})

# Print the ms_per_forward_median of the last JSON line on stdin that has one.
extract_ms() {
    "$PYTHON" -c '
import json, sys
ms = None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    if isinstance(obj, dict) and "ms_per_forward_median" in obj:
        ms = float(obj["ms_per_forward_median"])
if ms is None:
    sys.exit("no JSON line with ms_per_forward_median in the output")
print(ms)
'
}

run_one() {  # $1 = remask|pytorch; prints the median ms of one run
    local out
    if [[ $1 == remask ]]; then
        out=$("$REMASK_BIN" bench --model "$MODEL_DIR" --batch "$BATCH" --seq-len "$SEQ_LEN" \
              --iters "$ITERS" --json "${remask_extra[@]}") || { echo "error: remask bench failed" >&2; return 1; }
    else
        out=$("$PYTHON" "$TORCH_SCRIPT" --model "$MODEL_DIR" --batch "$BATCH" --seq-len "$SEQ_LEN" \
              --iters "$ITERS" --json "${torch_threads[@]}") || { echo "error: torch_forward.py failed" >&2; return 1; }
    fi
    printf '%s\n' "$out" | extract_ms
}

echo "model $MODEL_DIR  batch $BATCH  seq_len $SEQ_LEN  iters $ITERS  rounds $ROUNDS" >&2
remask_ms=()
torch_ms=()
for ((r = 1; r <= ROUNDS; r++)); do
    ms=$(run_one remask);  remask_ms+=("$ms"); echo "round $r/$ROUNDS  remask   $ms ms" >&2
    ms=$(run_one pytorch); torch_ms+=("$ms");  echo "round $r/$ROUNDS  pytorch  $ms ms" >&2
done

"$PYTHON" - "$BATCH" "$SEQ_LEN" "${remask_ms[*]}" "${torch_ms[*]}" <<'PY'
import statistics, sys
batch, seq_len = sys.argv[1], sys.argv[2]
rm = [float(x) for x in sys.argv[3].split()]
tm = [float(x) for x in sys.argv[4].split()]
mr, mt = statistics.median(rm), statistics.median(tm)
fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)
print(f"forward pass, batch {batch}, seq_len {seq_len} (median of per-run medians, ms)")
print(f"{'impl':<10} {'median_ms':>10}   runs")
print(f"{'remask':<10} {mr:>10.2f}   {fmt(rm)}")
print(f"{'pytorch':<10} {mt:>10.2f}   {fmt(tm)}")
print(f"ratio remask/pytorch = {mr / mt:.3f}  ({'remask faster' if mr < mt else 'pytorch faster' if mr > mt else 'equal'})")
PY
