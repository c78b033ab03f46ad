"""Shared by the Python end-to-end suites (tests/grpc, tests/http): where the
binary under test is, a clean environment for its processes, free loopback
ports, and the gRPC stubs of proto/ generated at test time (no generated code
is committed)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = PROTO_ROOT / "remask" / "v1" / "generation.proto"


def tools_required() -> bool:
    """REMASK_REQUIRE_TOOLS=1 (set by scripts/test.sh, hence CI): a test whose outside tool
    (grpcurl, buf, promtool, a Python package) is missing fails instead of skipping."""
    return os.environ.get("REMASK_REQUIRE_TOOLS", "") not in ("", "0")


def missing_tool(what: str, how: str):
    """Skips (locally) or fails (REMASK_REQUIRE_TOOLS=1) a test that needs `what`."""
    import pytest

    msg = f"{what} is not installed ({how})"
    if tools_required():
        pytest.fail(f"{msg}; REMASK_REQUIRE_TOOLS=1 makes this a failure", pytrace=False)
    pytest.skip(msg)


def require_module(name: str, how: str):
    """import `name`, or missing_tool(...)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_tool(f"the Python package {name}", how)


def require_executable(name: str, how: str, extra_dirs=()) -> str:
    """The path of executable `name` (on PATH or in one of `extra_dirs`), or missing_tool(...)."""
    import shutil

    for d in extra_dirs:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found is None:
        missing_tool(f"`{name}`", how)
    return found


def remask_bin() -> Path:
    """REMASK_BIN, or <repo>/target/release/remask."""
    return Path(os.environ.get("REMASK_BIN") or REPO / "target" / "release" / "remask")


def child_env(cache_dir: Path) -> dict:
    """This environment without any REMASK_* variable (the CLI reads them as
    flags), with the embedded default model's cache in `cache_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMASK_")}
    env["REMASK_CACHE_DIR"] = str(cache_dir)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stubs:
    """The generated modules: `pb` (messages), `pb_grpc` (service stubs), plus
    the health-checking modules from grpcio-health-checking."""

    def __init__(self, pb, pb_grpc, health_pb, health_grpc):
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.health_pb = health_pb
        self.health_grpc = health_grpc


def generate_stubs(out: Path) -> Stubs:
    """Runs grpc_tools.protoc on generation.proto into `out` and imports the result."""
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        "-I", str(PROTO_ROOT),
        f"--python_out={out}", f"--grpc_python_out={out}",
        str(PROTO_FILE),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"protoc failed: {res.stderr}"
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("remask.v1.generation_pb2")
        pb_grpc = importlib.import_module("remask.v1.generation_pb2_grpc")
    finally:
        # the modules stay in sys.modules; the path is not needed any more
        sys.path.remove(str(out))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return Stubs(pb, pb_grpc, health_pb2, health_pb2_grpc)


class Cli:
    """Runs `remask generate ... --json`: in process (the reference the servers
    are compared with), or against a server with `--endpoint` (and `--api-key`)."""

    TIMEOUT_S = 60.0

    def __init__(self, bin_path: Path, model_dir: Path, cache_dir: Path):
        self.bin = bin_path
        self.model = model_dir
        self.env = child_env(cache_dir)

    def command(self, *, prompt_ids=None, prompt=None, chat=False, suffix=None, gen_length=None,
                steps=None, block_length=None, remasking=None, temperature=None, cfg_scale=None,
                seed=None, logits_eos_inf=False, confidence_eos_eot_inf=False, endpoint=None,
                api_key=None, threshold=None, factor=None, entropy=None,
                full_canvas=False, cache=None, stop=(), top_k=None, top_p=None) -> list:
        cmd = [str(self.bin), "generate", "--json"]
        cmd += ["--model", str(self.model)] if endpoint is None else ["--endpoint", endpoint]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        if prompt_ids is not None:
            cmd += ["--prompt-ids", ",".join(str(int(t)) for t in prompt_ids)]
        if prompt is not None:
            cmd += ["--prompt", prompt]
        if chat:
            cmd.append("--chat")
        if suffix is not None:
            cmd += ["--suffix", suffix]
        for flag, v in (("--gen-length", gen_length), ("--steps", steps),
                        ("--block-length", block_length), ("--temperature", temperature),
                        ("--cfg-scale", cfg_scale), ("--seed", seed),
                        ("--threshold", threshold), ("--factor", factor), ("--entropy", entropy),
                        ("--top-k", top_k), ("--top-p", top_p)):
            if v is not None:
                cmd += [flag, repr(v) if isinstance(v, float) else str(v)]
        if remasking is not None:
            cmd += ["--remasking", remasking]
        if logits_eos_inf:
            cmd.append("--logits-eos-inf")
        if confidence_eos_eot_inf:
            cmd.append("--confidence-eos-eot-inf")
        if full_canvas:
            cmd.append("--no-early-stop")
        if cache is not None:
            cmd += ["--cache", cache]
        for s in stop:
            cmd += ["--stop", s]
        return cmd

    def run(self, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(**kw), capture_output=True, text=True, env=self.env,
                              timeout=self.TIMEOUT_S)

    def generate(self, **kw) -> dict:
        res = self.run(**kw)
        assert res.returncode == 0, f"{' '.join(self.command(**kw))} failed: {res.stderr}"
        return json.loads(res.stdout)
