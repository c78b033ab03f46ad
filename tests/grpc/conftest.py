"""Fixtures for the independent Python client test of `remask serve`.

The server under test is a real `remask serve` process on loopback, started once
per session. The Python stubs for `proto/remask/v1/generation.proto` are
generated at test time into a temporary directory (no generated code is
committed). Every child process gets an environment with all `REMASK_*`
variables removed and `REMASK_CACHE_DIR` pointing into a temporary directory.

Environment:
  REMASK_BIN   the remask binary (default: <repo>/target/release/remask)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import (  # noqa: E402  (tests/harness.py, shared with the other suite)
    Cli, Stubs, child_env, free_port, generate_stubs, remask_bin,
)

SERVER_START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- stubs


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> Stubs:
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


# --------------------------------------------------------------------------- binary, model


@pytest.fixture(scope="session")
def bin_path() -> Path:
    b = remask_bin()
    if not b.is_file():
        pytest.skip(f"remask binary not found at {b} (build it: cargo build --release, or set REMASK_BIN)")
    return b


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remask-cache")


@pytest.fixture(scope="session")
def model_dir(bin_path, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    res = subprocess.run(
        [str(bin_path), "model", "init", "--preset", "tiny", "--out", str(out), "--dtype", "f32"],
        capture_output=True, text=True, env=child_env(cache_dir), timeout=CLI_TIMEOUT_S,
    )
    assert res.returncode == 0, f"model init failed: {res.stderr}"
    return out


@pytest.fixture(scope="session")
def model_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# --------------------------------------------------------------------------- CLI reference


@pytest.fixture(scope="session")
def cli(bin_path, model_dir, cache_dir) -> Cli:
    return Cli(bin_path, model_dir, cache_dir)


# --------------------------------------------------------------------------- server



class Server:
    def __init__(self, proc: subprocess.Popen, address: str, log_path: Path):
        self.proc = proc
        self.address = address
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""


def _health_status(stubs: Stubs, channel, service: str, timeout: float):
    stub = stubs.health_grpc.HealthStub(channel)
    return stub.Check(stubs.health_pb.HealthCheckRequest(service=service), timeout=timeout).status


@pytest.fixture(scope="session")
def server(bin_path, model_dir, cache_dir, stubs, tmp_path_factory):
    import grpc

    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "wb")
    # gRPC only, on a free loopback port (HTTP is on by default: port 8000)
    cmd = [str(bin_path), "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--grpc-port", str(port), "--no-http"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(cache_dir))
    srv = Server(proc, address, log_path)
    serving = stubs.health_pb.HealthCheckResponse.SERVING
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        last = None
        with grpc.insecure_channel(address) as ch:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving:\n{srv.log()}")
                try:
                    last = _health_status(stubs, ch, "", timeout=1.0)
                    if last == serving:
                        break
                except grpc.RpcError as e:
                    last = e.code()
                if time.monotonic() > deadline:
                    pytest.fail(f"server not SERVING after {SERVER_START_TIMEOUT_S:.0f} s "
                                f"(last health: {last}):\n{srv.log()}")
                time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def channel(server):
    import grpc

    ch = grpc.insecure_channel(server.address)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def gen_stub(stubs, channel):
    return stubs.pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="session")
def health_stub(stubs, channel):
    return stubs.health_grpc.HealthStub(channel)
