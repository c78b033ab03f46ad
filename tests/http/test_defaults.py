"""One set of defaults: a checkpoint's generation_config.json sets what requests leave
unset, the same way for the CLI (in process), gRPC and the HTTP API; flags override it.

The model is a copy of the tiny checkpoint with a generation_config.json that changes every
default remask reads (length, block length, temperature, remasking); the same request with
nothing set, through the three surfaces, gives the same answer and the same schedule.
"""

from __future__ import annotations

import json
import shutil

import pytest
import requests
from harness import Cli

GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_new_tokens": 24,
    "block_length": 8,
    "temperature": 0.7,
    "do_sample": True,
    "remasking": "random",
}
PROMPT = "The capital of France is"
SEED = 11


@pytest.fixture(scope="module")
def configured_model(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("configured") / "configured"
    shutil.copytree(model_dir, out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return out


@pytest.fixture(scope="module")
def configured_server(spawn_server, configured_model):
    return spawn_server(["serve", "--model", str(configured_model)])


def test_generation_config_sets_the_defaults_of_all_three(configured_model, configured_server, cache_dir,
                                                           bin_path, stubs):
    import grpc

    local = Cli(bin_path, configured_model, cache_dir).generate(prompt=PROMPT, seed=SEED, full_canvas=True)
    assert (local["gen_length"], local["block_length"]) == (24, 8), local
    # one step per token, over 3 blocks
    assert local["steps"] == 24, local

    with grpc.insecure_channel(configured_server.grpc_address) as ch:
        stub = stubs.pb_grpc.GenerationStub(ch)
        got = stub.Generate(stubs.pb.GenerateRequest(prompt=PROMPT, seed=SEED, full_canvas=True), timeout=60)
    assert list(got.generated_ids) == local["generated_ids"]
    assert (got.steps, got.forwards, got.text) == (local["steps"], local["forwards"], local["text"])

    r = requests.post(f"{configured_server.base_url}/completions", timeout=60,
                      json={"model": configured_model.name, "prompt": PROMPT, "seed": SEED, "full_canvas": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == local["text"]

    # an explicit setting wins over the checkpoint's: greedy, fixed length
    greedy = Cli(bin_path, configured_model, cache_dir).generate(
        prompt=PROMPT, seed=SEED, temperature=0.0, gen_length=16, full_canvas=True)
    assert (greedy["gen_length"], greedy["block_length"]) == (16, 8)
    r = requests.post(f"{configured_server.base_url}/completions", timeout=60,
                      json={"prompt": PROMPT, "seed": SEED, "temperature": 0, "max_tokens": 16,
                            "full_canvas": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy["text"]


def test_without_generation_config_the_builtin_defaults(cli):
    out = cli.generate(prompt=PROMPT, full_canvas=True)
    assert (out["gen_length"], out["block_length"], out["steps"]) == (128, 32, 128), out


def test_a_bad_generation_config_is_refused_naming_the_key(model_dir, tmp_path, bin_path, cache_dir):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "generation_config.json").write_text(json.dumps({"max_new_tokens": -3}))
    res = Cli(bin_path, bad, cache_dir).run(prompt=PROMPT)
    assert res.returncode == 2, res.stderr
    assert "max_new_tokens" in res.stderr and "generation_config.json" in res.stderr, res.stderr
