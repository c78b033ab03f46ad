#!/usr/bin/env bash
# Rebuild the embedded default model from scratch: fetch the corpora, prepare
# them, train the tokenizer, pre-train, SFT, export to models/remask-demo,
# plot the loss curves and evaluate with `remask eval`.
#
#   training/build_demo.sh                    # CPU, the shipped recipe (~95 min on 2 cores)
#   DEVICE=cuda PRETRAIN_STEPS=40000 training/build_demo.sh   # on a GPU machine
#
# Every stage resumes: rerunning after an interruption continues where it was.
# On a machine without network, run the first two steps elsewhere and carry
# training/data/out (the GPU machine of the `device` tool has no network).
#
# Environment: RUN (run directory, default runs/demo), DEVICE (cpu|cuda),
# PRETRAIN_STEPS, PRETRAIN_DECAY, SFT_STEPS, SEED, OUT (default models/remask-demo),
# PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/demo}
DEVICE=${DEVICE:-cpu}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-7800}
PRETRAIN_DECAY=${PRETRAIN_DECAY:-1400}
SFT_STEPS=${SFT_STEPS:-2500}
SEED=${SEED:-0}
OUT=${OUT:-models/remask-demo}
PYTHON=${PYTHON:-python3}

if [[ ! -s training/data/out/pretrain_train.txt ]]; then
  training/data/fetch.sh
  "$PYTHON" training/data/prepare.py
fi
mkdir -p "$RUN"
[[ -s $RUN/tokenizer.json ]] || "$PYTHON" training/tokenizer.py --data training/data/out --out "$RUN" --vocab 4096
"$PYTHON" training/train.py pretrain --run "$RUN" --device "$DEVICE" --seed "$SEED" \
  --steps "$PRETRAIN_STEPS" --decay "$PRETRAIN_DECAY" --log-every 50 --eval-every 250
"$PYTHON" training/train.py sft --run "$RUN" --device "$DEVICE" --seed "$SEED" \
  --steps "$SFT_STEPS" --log-every 50 --eval-every 250
"$PYTHON" training/export.py --run "$RUN" --stage sft --out "$OUT" --dtype bf16
"$PYTHON" training/plot.py --run "$RUN" --out docs/training-loss.png
cargo build --release -p remask-cli
target/release/remask eval --model "$OUT" --data training/data/out --json "$RUN/eval.json" | tee "$RUN/eval.md"
