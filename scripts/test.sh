#!/usr/bin/env bash
# The whole test suite: Rust unit and property tests, the end-to-end CLI tests,
# and the independent Python reference. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python packages of the reference tests, when missing.
if ! python3 -c "import numpy, pytest, tokenizers, jinja2" 2>/dev/null; then
  python3 -m pip install --quiet -r tests/reference/requirements.txt
fi

# One release build serves the tests and the binary they drive.
cargo build --release --locked -p remask-cli
export REMASK_BIN="$PWD/target/release/remask"
cargo test --release --locked --workspace
python3 -m pytest -q tests/reference
