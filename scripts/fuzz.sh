#!/usr/bin/env bash
# The libFuzzer targets of fuzz/ (cargo-fuzz on a nightly toolchain), each for SECONDS
# (default 20), seeded from crates/remask-model/fuzz-corpus/. New corpus entries go to a
# scratch directory, not into the repository; a crash leaves its input under
# fuzz/artifacts/TARGET/ and fails the script.
#
# Without a nightly toolchain it says so and exits 0: the same properties run on stable
# in `cargo test -p remask-model --test fuzz` (random mutations of the same corpus).
#
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
root=$PWD

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz.sh: no nightly toolchain: the fuzz targets run only on the stable driver (cargo test)" >&2
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
corpus=crates/remask-model/fuzz-corpus
for pair in safetensors_header:safetensors config_json:config chat_template:chat_template; do
  target=${pair%%:*}
  seeds=$corpus/${pair##*:}
  mkdir -p "$scratch/$target"
  echo "fuzz.sh: $target for ${seconds}s (seeds: $seeds)" >&2
  (cd fuzz && cargo +nightly fuzz run "$target" "$scratch/$target" "$root/$seeds" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
done
echo "fuzz.sh: every target ran ${seconds}s without a failure" >&2
