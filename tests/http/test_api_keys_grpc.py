"""API keys on the gRPC side of the same server (`--api-key test-key-1
--api-key test-key-2`): the Generation service needs `authorization: Bearer
<key>` metadata, the health service does not; `remask generate --endpoint`
sends its `--api-key`. See conftest.py for the servers."""

from __future__ import annotations

import pytest

grpc = pytest.importorskip("grpc")

TEXT = "Hello world"
GOOD = [("authorization", "Bearer test-key-1")]
GOOD2 = [("authorization", "Bearer test-key-2")]


def small_request(pb):
    return pb.GenerateRequest(prompt_ids=[5, 17, 42], gen_length=8, steps=8, block_length=8)


@pytest.fixture(scope="module")
def gen_stub(stubs, grpc_channel):
    return stubs.pb_grpc.GenerationStub(grpc_channel)


@pytest.fixture(scope="module")
def health_stub(stubs, grpc_channel):
    return stubs.health_grpc.HealthStub(grpc_channel)


@pytest.mark.parametrize("metadata", [
    None,
    [("authorization", "Bearer test-key-3")],
    [("authorization", "test-key-1")],
    [("authorization", "Bearer ")],
    [("x-api-key", "test-key-1")],
], ids=["none", "wrong", "no-scheme", "empty", "other-header"])
def test_generate_without_valid_key_unauthenticated(metadata, stubs, gen_stub):
    with pytest.raises(grpc.RpcError) as ei:
        gen_stub.Generate(small_request(stubs.pb), metadata=metadata, timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in ei.value.details()


def test_generate_stream_and_model_info_need_a_key(stubs, gen_stub):
    with pytest.raises(grpc.RpcError) as ei:
        list(gen_stub.GenerateStream(small_request(stubs.pb), timeout=30))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as ei:
        gen_stub.ModelInfo(stubs.pb.ModelInfoRequest(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("metadata", [GOOD, GOOD2, [("authorization", "bearer test-key-1")],
                                      [("authorization", "BEARER test-key-2")]],
                         ids=["key-1", "key-2", "lower-case-scheme", "upper-case-scheme"])
def test_generate_with_key_matches_cli(metadata, stubs, gen_stub, cli):
    want = cli.generate(prompt_ids=[5, 17, 42], gen_length=8, steps=8, block_length=8)
    resp = gen_stub.Generate(small_request(stubs.pb), metadata=metadata, timeout=30)
    assert list(resp.token_ids) == want["token_ids"]
    assert resp.text == want["text"]


def test_generate_stream_and_model_info_with_key(stubs, gen_stub, model_config):
    msgs = list(gen_stub.GenerateStream(small_request(stubs.pb), metadata=GOOD, timeout=30))
    assert msgs and msgs[-1].HasField("done")
    info = gen_stub.ModelInfo(stubs.pb.ModelInfoRequest(), metadata=GOOD, timeout=30)
    assert info.vocab_size == model_config["vocab_size"]


def test_health_needs_no_key(stubs, health_stub):
    hp = stubs.health_pb
    for service in ("", "remask.v1.Generation"):
        resp = health_stub.Check(hp.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == hp.HealthCheckResponse.SERVING, service


# --------------------------------------------------------------------------- CLI


def test_cli_endpoint_with_key(cli, server):
    want = cli.generate(prompt=TEXT, gen_length=16, steps=16, block_length=16)
    got = cli.generate(prompt=TEXT, gen_length=16, steps=16, block_length=16,
                       endpoint=server.grpc_address, api_key="test-key-2")
    assert got["token_ids"] == want["token_ids"]
    assert got["text"] == want["text"]


@pytest.mark.parametrize("api_key", [None, "test-key-3"], ids=["missing", "wrong"])
def test_cli_endpoint_without_valid_key_exits_2(api_key, cli, server):
    res = cli.run(prompt=TEXT, gen_length=16, steps=16, block_length=16,
                  endpoint=server.grpc_address, api_key=api_key)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "API key" in res.stderr
    assert res.stdout.strip() == ""


def test_cli_endpoint_open_server_without_key(cli, open_server):
    want = cli.generate(prompt=TEXT, gen_length=16, steps=16, block_length=16)
    got = cli.generate(prompt=TEXT, gen_length=16, steps=16, block_length=16, endpoint=open_server.grpc_address)
    assert got["text"] == want["text"]
