"""top-k / top-p of the draw at temperature > 0, on the embedded default model (a trained
model: its distributions are peaked, as a real checkpoint's): honoured the same way by the CLI
in process (`remask generate --top-k --top-p`), the CLI against a server (`--endpoint`),
gRPC (`GenerateRequest.top_k` / `top_p`, reported in `settings`) and the HTTP API (vLLM's
`top_k` / `top_p` fields, -1 or 0 for an off top_k); top_k = 1 is greedy decoding whatever
the temperature; the truncation changes answers (it is not ignored); and a checkpoint's
generation_config.json `top_k` / `top_p` are the defaults of requests that leave them unset,
an explicit value winning. The servers: `default_server` (conftest.py: `remask serve` on the
embedded model) and one spawned on a copy of models/remask-demo with a generation_config.json.
"""

from __future__ import annotations

import json
import shutil

import pytest
import requests
from harness import REPO, Cli

DEMO = REPO / "models" / "remask-demo"  # the files the binary embeds
PROMPT = "The capital of France is"
CHAT = "What is the capital of France?"
LENGTHS = {"gen_length": 16, "steps": 16, "block_length": 16}
HTTP_LENGTHS = {"max_tokens": 16, "steps": 16, "block_length": 16}
SEED = 1

# (top_k, top_p) requests; None: unset
TRUNCATIONS = [(3, None), (None, 0.8), (20, 0.9)]


@pytest.fixture(scope="module")
def demo(bin_path, cache_dir) -> Cli:
    return Cli(bin_path, DEMO, cache_dir)


def truncation(top_k, top_p) -> dict:
    return {k: v for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None}


def grpc_generate(srv, stubs, **fields):
    import grpc

    with grpc.insecure_channel(srv.grpc_address) as ch:
        stub = stubs.pb_grpc.GenerationStub(ch)
        return stub.Generate(stubs.pb.GenerateRequest(**fields), timeout=60)


def completion(srv, **body) -> dict:
    r = requests.post(f"{srv.base_url}/completions", json={"prompt": PROMPT, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- (a) one answer


@pytest.mark.parametrize("top_k,top_p", TRUNCATIONS, ids=[f"k={k},p={p}" for k, p in TRUNCATIONS])
def test_the_same_truncated_answer_through_cli_grpc_and_http(top_k, top_p, demo, default_server, stubs):
    t = truncation(top_k, top_p)
    want = demo.generate(prompt=PROMPT, temperature=1.0, seed=SEED, **LENGTHS, **t)
    assert (want["top_k"], want["top_p"]) == (top_k or 0, top_p or 1.0), want

    remote = demo.generate(prompt=PROMPT, temperature=1.0, seed=SEED, endpoint=default_server.grpc_address,
                           **LENGTHS, **t)
    assert remote["generated_ids"] == want["generated_ids"]
    assert (remote["top_k"], remote["top_p"]) == (want["top_k"], want["top_p"])

    got = grpc_generate(default_server, stubs, prompt=PROMPT, temperature=1.0, seed=SEED, gen_length=16,
                        steps=16, block_length=16, **t)
    assert list(got.generated_ids) == want["generated_ids"]
    assert got.settings.top_k == (top_k or 0)
    assert got.settings.top_p == pytest.approx(top_p or 1.0)

    http = completion(default_server, temperature=1.0, seed=SEED, **HTTP_LENGTHS, **t)
    assert http["remask"]["generated_ids"] == want["generated_ids"]
    assert http["choices"][0]["text"] == want["text"]


def test_the_same_truncated_chat_answer_through_cli_and_http(demo, default_server):
    want = demo.generate(prompt=CHAT, chat=True, temperature=1.0, seed=SEED, top_k=5, top_p=0.9, **LENGTHS)
    r = requests.post(f"{default_server.base_url}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": CHAT}], "temperature": 1.0, "seed": SEED,
        "top_k": 5, "top_p": 0.9, **HTTP_LENGTHS})
    assert r.status_code == 200, r.text
    assert r.json()["remask"]["generated_ids"] == want["generated_ids"]
    assert r.json()["choices"][0]["message"]["content"] == want["text"]


# --------------------------------------------------------------------------- (b) top_k = 1 is greedy


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_top_k_1_is_greedy_at_any_temperature(seed, demo, default_server):
    greedy = demo.generate(prompt=PROMPT, temperature=0.0, seed=seed, **LENGTHS)
    one = demo.generate(prompt=PROMPT, temperature=1.0, top_k=1, seed=seed, **LENGTHS)
    assert one["generated_ids"] == greedy["generated_ids"]
    # the sampled answer without truncation is another one (seed 1: the test shows something)
    if seed == 1:
        assert demo.generate(prompt=PROMPT, temperature=1.0, seed=seed, **LENGTHS)["generated_ids"] \
            != greedy["generated_ids"]
    for body in ({"temperature": 1.5, "top_k": 1}, {"temperature": 0.7, "top_k": 1, "top_p": 0.5},
                 # at temperature 0 they change nothing (vLLM's greedy ignores them too)
                 {"temperature": 0, "top_k": 3, "top_p": 0.1}):
        got = completion(default_server, seed=seed, **HTTP_LENGTHS, **body)
        assert got["remask"]["generated_ids"] == greedy["generated_ids"], body


# --------------------------------------------------------------------------- (c) not ignored


def test_truncation_changes_the_answer_and_settings_report_it(demo, default_server, stubs):
    seeds = range(1, 9)
    common = dict(prompt=PROMPT, temperature=1.0, gen_length=16, steps=16, block_length=16)
    plain = {s: list(grpc_generate(default_server, stubs, seed=s, **common).generated_ids) for s in seeds}
    for t in ({"top_k": 3}, {"top_p": 0.8}, {"top_k": 20, "top_p": 0.9}):
        changed = []
        for s in seeds:
            got = grpc_generate(default_server, stubs, seed=s, **common, **t)
            assert got.settings.top_k == t.get("top_k", 0), got.settings
            assert got.settings.top_p == pytest.approx(t.get("top_p", 1.0)), got.settings
            changed.append(list(got.generated_ids) != plain[s])
        assert any(changed), f"{t} gives the untruncated answer for every seed: ignored?"
    # unset: off, and reported as off
    got = grpc_generate(default_server, stubs, seed=1, **common)
    assert (got.settings.top_k, got.settings.top_p) == (0, 1.0)
    # HTTP's -1 is off, the untruncated answer
    http = completion(default_server, temperature=1.0, seed=1, top_k=-1, top_p=1, **HTTP_LENGTHS)
    assert http["remask"]["generated_ids"] == plain[1]


# --------------------------------------------------------------------------- (d) generation_config.json

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 4091, "temperature": 1.0, "do_sample": True,
                     "top_k": 3, "top_p": 0.8}


@pytest.fixture(scope="module")
def configured_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("truncation") / "remask-demo-truncated"
    shutil.copytree(DEMO, out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return out


@pytest.fixture(scope="module")
def configured_server(spawn_server, configured_model):
    return spawn_server(["serve", "--model", str(configured_model)])


def test_generation_config_top_k_top_p_are_the_defaults(configured_model, configured_server, demo, bin_path,
                                                        cache_dir, stubs):
    # the file's settings, given explicitly to the plain checkpoint
    want = demo.generate(prompt=PROMPT, temperature=1.0, top_k=3, top_p=0.8, seed=SEED, **LENGTHS)
    untruncated = demo.generate(prompt=PROMPT, temperature=1.0, seed=SEED, **LENGTHS)
    assert want["generated_ids"] != untruncated["generated_ids"], "pick a seed where the defaults matter"

    local = Cli(bin_path, configured_model, cache_dir).generate(prompt=PROMPT, seed=SEED, **LENGTHS)
    assert (local["top_k"], local["top_p"]) == (3, 0.8), local
    assert local["generated_ids"] == want["generated_ids"]

    got = grpc_generate(configured_server, stubs, prompt=PROMPT, seed=SEED, gen_length=16, steps=16,
                        block_length=16)
    assert (got.settings.top_k, got.settings.top_p) == (3, pytest.approx(0.8))
    assert got.settings.temperature == 1.0
    assert list(got.generated_ids) == want["generated_ids"]

    http = completion(configured_server, seed=SEED, **HTTP_LENGTHS)
    assert http["remask"]["generated_ids"] == want["generated_ids"]


def test_explicit_top_k_top_p_win_over_generation_config(configured_model, configured_server, demo, bin_path,
                                                         cache_dir, stubs):
    untruncated = demo.generate(prompt=PROMPT, temperature=1.0, seed=SEED, **LENGTHS)
    # off, explicitly: HTTP -1 / 1, gRPC 0 / 1, the CLI 0 / 1
    http = completion(configured_server, seed=SEED, top_k=-1, top_p=1.0, **HTTP_LENGTHS)
    assert http["remask"]["generated_ids"] == untruncated["generated_ids"]
    got = grpc_generate(configured_server, stubs, prompt=PROMPT, seed=SEED, gen_length=16, steps=16,
                        block_length=16, top_k=0, top_p=1.0)
    assert (got.settings.top_k, got.settings.top_p) == (0, 1.0)
    assert list(got.generated_ids) == untruncated["generated_ids"]
    local = Cli(bin_path, configured_model, cache_dir).generate(prompt=PROMPT, seed=SEED, top_k=0, top_p=1.0,
                                                                **LENGTHS)
    assert local["generated_ids"] == untruncated["generated_ids"]

    # one field given, the other the file's: top_k 20 with the file's top_p 0.8
    want = demo.generate(prompt=PROMPT, temperature=1.0, top_k=20, top_p=0.8, seed=SEED, **LENGTHS)
    got = grpc_generate(configured_server, stubs, prompt=PROMPT, seed=SEED, gen_length=16, steps=16,
                        block_length=16, top_k=20)
    assert (got.settings.top_k, got.settings.top_p) == (20, pytest.approx(0.8))
    assert list(got.generated_ids) == want["generated_ids"]
    http = completion(configured_server, seed=SEED, top_k=20, **HTTP_LENGTHS)
    assert http["remask"]["generated_ids"] == want["generated_ids"]

    # greedy, explicitly: the truncation defaults change nothing
    greedy = demo.generate(prompt=PROMPT, temperature=0.0, **LENGTHS)
    http = completion(configured_server, seed=SEED, temperature=0, **HTTP_LENGTHS)
    assert http["remask"]["generated_ids"] == greedy["generated_ids"]
