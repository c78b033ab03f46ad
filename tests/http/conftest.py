"""Fixtures for the test of remask's OpenAI-compatible HTTP API and its API keys.

Every server under test is a real `remask` process on loopback (free ports,
started once per session and only when a test asks for it):

  server         `remask serve --api-key test-key-1 --api-key test-key-2` (tiny model)
  open_server    `remask serve` without keys (tiny model)
  default_server `remask serve` without --model and without keys: the embedded default model
  info_server    the same, logging at info (REMASK_LOG=info: the log names ignored fields)
  queue_server   `remask serve --max-queue 1 --max-batch 1` (small model, for 429)
  front_server   `remask serve --max-batch 1` (small model) with --allowed-origins,
                 --served-model-name and a short --sse-keep-alive-s
  unready        `remask coordinator --workers 127.0.0.1:1 --stages 1`: a worker
                 nothing listens on, so the cluster never becomes ready (503)

Each has a gRPC port and an HTTP port, free loopback ports chosen here
(`--host 127.0.0.1 --port P --grpc-port Q`: never the defaults 8000 and 50051,
which parallel runs would share). The models
are fresh `remask model init --preset tiny|small --dtype f32` checkpoints in
temporary directories; the model id the API reports is the directory name.
Children get an environment with every `REMASK_*` variable removed and
`REMASK_CACHE_DIR` in a temporary directory. The gRPC stubs for
`proto/remask/v1/generation.proto` are generated at test time, as in tests/grpc.

Environment:
  REMASK_BIN   the remask binary (default: <repo>/target/release/remask)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import (  # noqa: E402  (tests/harness.py, shared with the other suite)
    Cli, Stubs, child_env, free_port, generate_stubs, remask_bin,
)

SERVER_START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0

API_KEYS = ("test-key-1", "test-key-2")


# --------------------------------------------------------------------------- binary, models


@pytest.fixture(scope="session")
def bin_path() -> Path:
    b = remask_bin()
    if not b.is_file():
        pytest.skip(f"remask binary not found at {b} (build it: cargo build --release, or set REMASK_BIN)")
    return b


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remask-cache")


def _init_model(bin_path: Path, cache_dir: Path, out: Path, preset: str) -> Path:
    res = subprocess.run(
        [str(bin_path), "model", "init", "--preset", preset, "--out", str(out), "--dtype", "f32"],
        capture_output=True, text=True, env=child_env(cache_dir), timeout=CLI_TIMEOUT_S,
    )
    assert res.returncode == 0, f"model init --preset {preset} failed: {res.stderr}"
    return out


@pytest.fixture(scope="session")
def model_dir(bin_path, cache_dir, tmp_path_factory) -> Path:
    return _init_model(bin_path, cache_dir, tmp_path_factory.mktemp("model") / "tiny", "tiny")


@pytest.fixture(scope="session")
def small_model_dir(bin_path, cache_dir, tmp_path_factory) -> Path:
    return _init_model(bin_path, cache_dir, tmp_path_factory.mktemp("model") / "small", "small")


@pytest.fixture(scope="session")
def model_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def model_id(model_dir) -> str:
    return model_dir.name


# --------------------------------------------------------------------------- CLI reference


@pytest.fixture(scope="session")
def cli(bin_path, model_dir, cache_dir) -> Cli:
    return Cli(bin_path, model_dir, cache_dir)


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(self, proc: subprocess.Popen, grpc_port: int, http_port: int, log_path: Path, cmd: list):
        self.proc = proc
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.log_path = log_path
        self.cmd = cmd

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def base_url(self) -> str:
        return f"{self.http_url}/v1"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return metric_value(self.metrics(), name, **labels)


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list:
    """[(labels dict, value)] of the samples named exactly `name`."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric_value(text: str, name: str, **labels) -> float:
    return sum(v for ls, v in metric_samples(text, name)
               if all(ls.get(k) == want for k, want in labels.items()))


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def start_server(args: list, *, bin_path: Path, cache_dir: Path, log_dir: Path, ready_status,
                 env: dict | None = None) -> Server:
    """Starts `remask ARGS --host 127.0.0.1 --port .. --grpc-port ..` and waits until
    GET /health answers with a status in `ready_status`."""
    gport, hport = free_port(), free_port()
    while hport == gport:
        hport = free_port()
    cmd = [str(bin_path), *args, "--host", "127.0.0.1", "--port", str(hport), "--grpc-port", str(gport)]
    log_path = log_dir / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**child_env(cache_dir), **(env or {})})
    log.close()  # the child holds its own descriptor
    srv = Server(proc, gport, hport, log_path, cmd)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving:\n{srv.log()}")
        last = _http_status(f"{srv.http_url}/health")
        if last in ready_status:
            return srv
        if time.monotonic() > deadline:
            stop_server(srv)
            raise AssertionError(f"/health not in {ready_status} after {SERVER_START_TIMEOUT_S:.0f} s "
                                 f"(last: {last}):\n{srv.log()}")
        time.sleep(0.05)


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=10)


def _server_fixture(args, request, tmp_path_factory, bin_path, cache_dir, ready_status=(200,), env=None):
    srv = start_server(args, bin_path=bin_path, cache_dir=cache_dir,
                       log_dir=tmp_path_factory.mktemp(request.fixturename), ready_status=ready_status, env=env)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def server(request, tmp_path_factory, bin_path, cache_dir, model_dir):
    args = ["serve", "--model", str(model_dir)]
    for k in API_KEYS:
        args += ["--api-key", k]
    yield from _server_fixture(args, request, tmp_path_factory, bin_path, cache_dir)


@pytest.fixture(scope="session")
def open_server(request, tmp_path_factory, bin_path, cache_dir, model_dir):
    yield from _server_fixture(["serve", "--model", str(model_dir)], request, tmp_path_factory,
                               bin_path, cache_dir)


@pytest.fixture(scope="session")
def default_server(request, tmp_path_factory, bin_path, cache_dir):
    """`remask serve` with no flags but the ports: the embedded default model (unpacked into
    the session's REMASK_CACHE_DIR), no API key."""
    yield from _server_fixture(["serve"], request, tmp_path_factory, bin_path, cache_dir)


@pytest.fixture(scope="session")
def info_server(request, tmp_path_factory, bin_path, cache_dir, model_dir):
    """`remask serve` without keys, logging at info (REMASK_LOG=info)."""
    yield from _server_fixture(["serve", "--model", str(model_dir)], request, tmp_path_factory,
                               bin_path, cache_dir, env={"REMASK_LOG": "info"})


@pytest.fixture(scope="session")
def queue_server(request, tmp_path_factory, bin_path, cache_dir, small_model_dir):
    args = ["serve", "--model", str(small_model_dir), "--max-queue", "1", "--max-batch", "1"]
    yield from _server_fixture(args, request, tmp_path_factory, bin_path, cache_dir)


@pytest.fixture(scope="session")
def front_server(request, tmp_path_factory, bin_path, cache_dir, small_model_dir):
    """`remask serve` (small model, one request at a time) with CORS for one origin, a served
    model name, and SSE keep-alive comments every 0.2 s."""
    args = ["serve", "--model", str(small_model_dir), "--max-batch", "1",
            "--allowed-origins", "https://app.example", "--served-model-name", "org/served-name",
            "--sse-keep-alive-s", "0.2"]
    yield from _server_fixture(args, request, tmp_path_factory, bin_path, cache_dir, env={"REMASK_LOG": "info"})


@pytest.fixture(scope="session")
def unready(request, tmp_path_factory, bin_path, cache_dir, model_dir):
    # 127.0.0.1:1: a worker address nothing listens on; ready as soon as /health answers at all
    args = ["coordinator", "--model", str(model_dir), "--workers", "127.0.0.1:1", "--stages", "1"]
    for k in API_KEYS:
        args += ["--api-key", k]
    yield from _server_fixture(args, request, tmp_path_factory, bin_path, cache_dir,
                               ready_status=tuple(range(100, 600)))


@pytest.fixture(scope="session")
def spawn_server(tmp_path_factory, bin_path, cache_dir):
    """spawn(args) starts `remask ARGS` as the fixtures above do (stopped at the end of the
    session), for a module's own model or flags."""
    started = []

    def spawn(args: list, env: dict | None = None) -> Server:
        srv = start_server(args, bin_path=bin_path, cache_dir=cache_dir,
                           log_dir=tmp_path_factory.mktemp("spawned"), ready_status=(200,), env=env)
        started.append(srv)
        return srv

    yield spawn
    for srv in started:
        stop_server(srv)


# --------------------------------------------------------------------------- clients


def openai_client(srv: Server, api_key: str = API_KEYS[0]):
    from openai import OpenAI

    # no retries: every status must reach the test as the server sent it
    return OpenAI(base_url=srv.base_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def make_client():
    """openai_client(server, api_key=...) as a fixture (test modules do not import conftest)."""
    return openai_client


@pytest.fixture(scope="session")
def client(server):
    c = openai_client(server)
    yield c
    c.close()


@pytest.fixture(scope="session")
def open_client(open_server):
    c = openai_client(open_server, api_key="unused")
    yield c
    c.close()


class Curl:
    """`curl` as a subprocess: (status, headers text, body text)."""

    def __init__(self):
        import shutil

        self.exe = shutil.which("curl")

    def __call__(self, method: str, url: str, *, headers: dict | None = None, data: str | None = None,
                 timeout: float = 60):
        cmd = [self.exe, "-sS", "-X", method, "-D", "-", "--max-time", str(timeout), url]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        if data is not None:
            cmd += ["--data-binary", data]
        res = subprocess.run(cmd, capture_output=True, timeout=timeout + 10)
        assert res.returncode == 0, f"curl failed ({res.returncode}): {res.stderr.decode(errors='replace')}"
        raw = res.stdout.decode("utf-8")
        head, _, body = raw.partition("\r\n\r\n")
        status = int(head.split()[1])
        return status, head, body


@pytest.fixture(scope="session")
def curl() -> Curl:
    c = Curl()
    if c.exe is None:
        pytest.skip("curl is not installed")
    return c


# --------------------------------------------------------------------------- gRPC stubs


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> Stubs:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("grpc_health")
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="session")
def grpc_channel(server):
    import grpc

    ch = grpc.insecure_channel(server.grpc_address)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()
