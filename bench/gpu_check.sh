#!/usr/bin/env bash
# The CUDA backend's check on the GPU machine, in one call (see
# ../shared/TOOLING.md): build here, carry the binary, run this there.
#
#   here:  cargo build --release -p remask-cli --features cuda &&
#          mkdir -p gpu && cp target/release/remask gpu/   # `gpu/` is git-ignored
#   there: bash bench/gpu_check.sh gpu/remask            (device tool, carry ["gpu"])
#
# 1. correctness on `small` (bf16): logits of --backend cuda against the CPU
#    backend (relative error < 2e-2), also with the weights drawn on the GPU
#    (`small` with --on-device-weights, same seed, against the CPU on the
#    files), and greedy ids of both;
# 2. speed on the llada-8b shape (random weights made on the GPU at load:
#    `model init --on-device-weights` writes only config and tokenizer, no
#    16 GB checkpoint): ms per full-forward step at B=1, L=320 and B=8, L=320,
#    and the end-to-end generate of prompt 64, gen 256, block 32, steps 256;
#    the forward again with REMASK_CUDA_ATTENTION=rows (the simple kernel) to
#    show what the tiled tensor-core attention buys, in the same run.
# Prints a table; writes everything under $OUT (or /tmp/gpu_check).
set -uo pipefail
R=${1:-gpu/remask}
O=${OUT:-/tmp/gpu_check}
mkdir -p "$O"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
SMALL=/tmp/remask-small
SMALL_GEN=/tmp/remask-small-generated
"$R" model init --preset small --out "$SMALL" --dtype bf16 --force 2>>"$O/log"
"$R" model init --preset small --out "$SMALL_GEN" --on-device-weights --force 2>>"$O/log"

echo "== correctness (small, bf16)"
IDS=$(seq -s, 1 40)
"$R" forward --model "$SMALL" --ids "$IDS" --out "$O/cpu.npy" 2>>"$O/log"
"$R" forward --model "$SMALL" --ids "$IDS" --out "$O/cuda.npy" --backend cuda 2>>"$O/log"
"$R" forward --model "$SMALL_GEN" --ids "$IDS" --out "$O/cuda_generated.npy" --backend cuda 2>>"$O/log"
python3 - "$O" <<'PY' | tee "$O/correctness.txt"
import sys, numpy as np
o = sys.argv[1]
a = np.load(f"{o}/cpu.npy")
for name, what in (("cuda", "files"), ("cuda_generated", "weights drawn on the GPU")):
    b = np.load(f"{o}/{name}.npy")
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    print(f"cuda ({what}) vs cpu (files): logits max|diff|/max|logit| = {rel:.3e} (target < 2e-2); argmax agreement {agree:.3f}")
PY
for b in cpu cuda; do
  "$R" generate --model "$SMALL" --prompt-ids 5,6,7,8 --gen-length 32 --steps 32 --block-length 8 \
    --backend "$b" --json 2>>"$O/log" >"$O/gen_$b.json"
done
python3 -c "
import json; a=json.load(open('$O/gen_cpu.json')); b=json.load(open('$O/gen_cuda.json'))
same=sum(x==y for x,y in zip(a['generated_ids'],b['generated_ids']))
print(f'greedy ids: {same}/{len(a[\"generated_ids\"])} equal (bf16 compute agrees approximately)')" | tee -a "$O/correctness.txt"

echo "== speed (llada-8b shape, random bf16 weights drawn on the GPU)"
BIG=/tmp/remask-llada-8b
t0=$(date +%s)
"$R" model init --preset llada-8b --out "$BIG" --on-device-weights --force 2>>"$O/log"
echo "checkpoint (config and tokenizer, no weight files) written in $(( $(date +%s) - t0 )) s"
for b in 1 8; do
  "$R" bench --model "$BIG" --backend cuda --batch $b --seq-len 320 --iters 10 --warmup 2 --json 2>>"$O/log" |
    tee "$O/bench_b$b.json"
  # The same with the simple row attention kernel: the tiled kernel's share, side by side.
  REMASK_CUDA_ATTENTION=rows "$R" bench --model "$BIG" --backend cuda --batch $b --seq-len 320 --iters 10 \
    --warmup 2 --json 2>>"$O/log" | tee "$O/bench_rows_b$b.json"
done
"$R" generate --model "$BIG" --backend cuda --prompt-ids "$(seq -s, 1 64)" --gen-length 256 --steps 256 \
  --block-length 32 --json 2>>"$O/log" >"$O/generate.json"
python3 - "$O" <<'PY' | tee "$O/table.txt"
import json, sys
o = sys.argv[1]
rows = []
for b, floor, ref, target in ((1, 6.3, "19.6-27.3", 7.5), (8, 50.7, "84-89", 56.0)):
    d = json.load(open(f"{o}/bench_b{b}.json"))
    rows.append((f"B={b} L=320 full forward", d["ms_per_forward_median"], f"{floor} ms", ref, f"<= {target}"))
    rows.append((f"B={b} L=320 denoising step", d["ms_per_step_median"], f"{floor} ms", ref, f"<= {target}"))
    try:
        r = json.load(open(f"{o}/bench_rows_b{b}.json"))
        rows.append((f"B={b} full forward, row attention", r["ms_per_forward_median"], "-", "-", "-"))
    except (OSError, ValueError, KeyError):
        pass
g = json.load(open(f"{o}/generate.json"))
rows.append(("generate 64+256, block 32, 256 steps", g["elapsed_ms"], "-", "5030", "< 2200"))
print(f"{'what':40} {'remask ms':>10} {'floor':>8} {'pytorch ms':>11} {'target':>8}")
for r in rows:
    print(f"{r[0]:40} {r[1]:10.2f} {r[2]:>8} {r[3]:>11} {r[4]:>8}")
PY
