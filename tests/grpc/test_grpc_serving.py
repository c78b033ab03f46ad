"""Issue 13 on gRPC: stop strings (GenerateRequest.stop, GenerateResponse.matched_stop), the
request id (`x-request-id` metadata in and out, GenerateResponse.request_id), the Tokenize rpc,
gzip, and ModelInfo without filesystem paths. See conftest.py for the server."""

from __future__ import annotations

import grpc
import pytest

SETTINGS = dict(gen_length=32, steps=32, block_length=16)


def generate(stubs, gen_stub, metadata=(), compression=None, **kw):
    req = stubs.pb.GenerateRequest(prompt="Hello world", **{**SETTINGS, **kw})
    return gen_stub.Generate.with_call(req, timeout=30, metadata=metadata, compression=compression)


def test_stop_string_ends_the_answer(stubs, gen_stub):
    plain, _ = generate(stubs, gen_stub)
    text = plain.text
    stop = next((text[i:i + 2] for i in range(len(text) // 3, len(text) - 2)
                 if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {text!r}")
    got, _ = generate(stubs, gen_stub, stop=[stop])
    assert got.text == text[:text.index(stop)]
    assert got.matched_stop == stop and got.HasField("matched_stop")
    assert got.finish_reason == stubs.pb.FINISH_REASON_STOP
    assert got.completion_tokens <= plain.completion_tokens
    assert not plain.HasField("matched_stop")


@pytest.mark.parametrize("stop", [["a"] * 5, [""], ["x" * 1025]])
def test_bad_stop_strings_are_invalid_argument(stubs, gen_stub, stop):
    with pytest.raises(grpc.RpcError) as ei:
        generate(stubs, gen_stub, stop=stop)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop" in ei.value.details()


def test_request_id_in_and_out(stubs, gen_stub):
    got, call = generate(stubs, gen_stub, metadata=[("x-request-id", "grpc-trace-7")])
    assert got.request_id == "grpc-trace-7"
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-trace-7"
    fresh, call = generate(stubs, gen_stub)
    assert fresh.request_id and dict(call.initial_metadata())["x-request-id"] == fresh.request_id
    with pytest.raises(grpc.RpcError) as ei:
        generate(stubs, gen_stub, metadata=[("x-request-id", "x" * 200)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_gzip_requests_and_answers(stubs, gen_stub):
    plain, _ = generate(stubs, gen_stub)
    zipped, _ = generate(stubs, gen_stub, compression=grpc.Compression.Gzip)
    assert list(zipped.token_ids) == list(plain.token_ids)


def test_tokenize_matches_generate(stubs, gen_stub, model_config):
    pb = stubs.pb
    tok = gen_stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
    got, _ = generate(stubs, gen_stub)
    assert list(tok.token_ids) == list(got.token_ids[:got.prompt_length])
    assert tok.count == len(tok.token_ids)
    assert tok.max_model_len == model_config["max_sequence_length"]
    bare = gen_stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special_tokens=False), timeout=10)
    assert len(bare.token_ids) < len(tok.token_ids)
    chat = gen_stub.Tokenize(pb.TokenizeRequest(text="Hello world", chat=True), timeout=10)
    want, _ = gen_stub.Generate.with_call(pb.GenerateRequest(prompt="Hello world", chat=True, **SETTINGS), timeout=30)
    assert list(chat.token_ids) == list(want.token_ids[:want.prompt_length])
    with pytest.raises(grpc.RpcError) as ei:
        gen_stub.Tokenize(pb.TokenizeRequest(text="x", chat=True, add_special_tokens=True), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_info_names_no_path(stubs, gen_stub, model_dir):
    info = gen_stub.ModelInfo(stubs.pb.ModelInfoRequest(), timeout=10)
    assert info.model == model_dir.name
    assert "/" not in info.model
