#!/usr/bin/env bash
# The libFuzzer targets of fuzz/ (cargo-fuzz), each for SECONDS (default 20), seeded
# from crates/remask-model/fuzz-corpus/ and crates/remask-cluster/fuzz-corpus/. New
# corpus entries go to a scratch directory, not into the repository; a crash leaves its
# input under fuzz/artifacts/TARGET/ and fails the script.
#
# cargo-fuzz needs nightly flags (-Zsanitizer): a nightly toolchain, or else the stable
# one with RUSTC_BOOTSTRAP=1 (REMASK_FUZZ_STABLE=0 refuses that and exits 0). The same
# properties run on stable in `cargo test --test fuzz` (random mutations of the same
# corpora).
#
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
root=$PWD

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=+nightly
elif [[ ${REMASK_FUZZ_STABLE:-1} == 1 ]]; then
  echo "fuzz.sh: no nightly toolchain: stable with RUSTC_BOOTSTRAP=1" >&2
  toolchain=+stable
  export RUSTC_BOOTSTRAP=1
else
  echo "fuzz.sh: no nightly toolchain: the fuzz targets run only on the stable driver (cargo test)" >&2
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
model=crates/remask-model/fuzz-corpus
cluster=crates/remask-cluster/fuzz-corpus
for pair in safetensors_header:$model/safetensors config_json:$model/config \
  generation_config:$model/generation_config \
  chat_template:$model/chat_template safetensors_index:$model/index \
  generate_request:$cluster/generate worker_forward:$cluster/forward \
  worker_load_shard:$cluster/load_shard worker_release_caches:$cluster/release_caches \
  http_completions:$cluster/completions http_chat:$cluster/chat \
  http_tokenize:$cluster/tokenize http_detokenize:$cluster/detokenize; do
  target=${pair%%:*}
  seeds=${pair##*:}
  mkdir -p "$scratch/$target"
  echo "fuzz.sh: $target for ${seconds}s (seeds: $seeds)" >&2
  (cd fuzz && cargo $toolchain fuzz run "$target" "$scratch/$target" "$root/$seeds" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
done
echo "fuzz.sh: every target ran ${seconds}s without a failure" >&2
