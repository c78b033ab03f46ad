"""Issue 13, "serve the way vLLM users expect": every request parameter is honoured or
refused (never silently ignored), `seed` unset draws a fresh seed that the result reports,
`/tokenize` and `/detokenize`, `GET /v1/models/{id}`, JSON bodies for 404 / 405 / 413,
`Retry-After` on 429 (test_openai_client.py) and the `Bearer` scheme in any case. See
conftest.py for the servers."""

from __future__ import annotations

import json

import openai
import pytest
import requests

TEXT = "Hello world"
CHAT_TEXT = "What is a diffusion language model?"
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
SAMPLING = {"steps": 16, "block_length": 16}
CLI_SAMPLING = {"gen_length": 16, "steps": 16, "block_length": 16}

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# (parameter, a value remask does not implement)
REFUSED = [
    ("presence_penalty", 0.5),
    ("frequency_penalty", -0.5),
    ("repetition_penalty", 1.2),
    ("logit_bias", {"5": 10}),
    ("best_of", 2),
    ("min_p", 0.1),
    ("min_tokens", 4),
    ("stop_token_ids", [5]),
    ("response_format", {"type": "json_object"}),
    ("tools", [TOOL]),
    ("tool_choice", "auto"),
    ("functions", [TOOL["function"]]),
    ("function_call", "auto"),
]

# the defaults of the same parameters: accepted, and the answer is the plain one
DEFAULTS = {
    "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
    "best_of": 1, "top_logprobs": 0, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "min_tokens": 0,
    "echo": False, "stop": [], "stop_token_ids": [], "response_format": {"type": "text"},
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "n": 1,
    "logprobs": None, "user": "pytest", "stream_options": None, "parallel_tool_calls": False,
}


def post(srv, path: str, body: dict, headers=AUTH) -> requests.Response:
    return requests.post(f"{srv.http_url}{path}", json=body, headers=headers, timeout=60)


def request_body(endpoint: str, model_id: str, **kw) -> tuple[str, dict]:
    if endpoint == "completions":
        return "/v1/completions", {"model": model_id, "prompt": TEXT, "max_tokens": 16, **SAMPLING, **kw}
    return "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": CHAT_TEXT}],
                                    "max_tokens": 16, **SAMPLING, **kw}


def assert_refused(r: requests.Response, param: str):
    assert r.status_code == 400, (param, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    assert err["param"] == param, err
    assert param in err["message"] and "not supported" in err["message"], err


# --------------------------------------------------------------------------- refused parameters


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("param,value", REFUSED, ids=[f"{p}={json.dumps(v)}" for p, v in REFUSED])
def test_unimplemented_parameter_is_refused(endpoint, param, value, server, model_id):
    path, body = request_body(endpoint, model_id, **{param: value})
    assert_refused(post(server, path, body), param)
    # streamed requests are refused before the stream starts
    assert_refused(post(server, path, {**body, "stream": True}), param)


# top_k / top_p are implemented (test_truncation.py): values vLLM accepts are accepted, others
# are 400 naming the field (vLLM: top_k -1 or 0 off, else >= 1; top_p in (0, 1])
TRUNCATION_ACCEPTED = [("top_k", 5), ("top_k", 1), ("top_k", 0), ("top_k", -1), ("top_k", 10**6),
                       ("top_p", 0.9), ("top_p", 1), ("top_p", 1e-9), ("top_k", None), ("top_p", None)]
TRUNCATION_REFUSED = [("top_k", -2), ("top_k", 1.5), ("top_k", "x"), ("top_k", True),
                      ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", "x")]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("param,value", TRUNCATION_ACCEPTED,
                         ids=[f"{p}={json.dumps(v)}" for p, v in TRUNCATION_ACCEPTED])
def test_top_k_top_p_are_accepted(endpoint, param, value, server, model_id):
    path, body = request_body(endpoint, model_id, temperature=1.0, seed=3, **{param: value})
    r = post(server, path, body)
    assert r.status_code == 200, (param, value, r.text)
    r = post(server, path, {**body, "stream": True})
    assert r.status_code == 200, (param, value, r.text)
    assert r.text.rstrip().endswith("data: [DONE]"), r.text


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("param,value", TRUNCATION_REFUSED,
                         ids=[f"{p}={json.dumps(v)}" for p, v in TRUNCATION_REFUSED])
def test_bad_top_k_top_p_are_refused_naming_the_parameter(endpoint, param, value, server, model_id):
    path, body = request_body(endpoint, model_id, temperature=1.0, **{param: value})
    for b in (body, {**body, "stream": True}):
        r = post(server, path, b)
        assert r.status_code == 400, (param, value, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, err
        assert param in err["message"], err


@pytest.mark.parametrize("endpoint,param,value", [
    ("completions", "logprobs", 6), ("completions", "logprobs", -1), ("completions", "logprobs", "x"),
    ("chat", "logprobs", 3), ("chat", "top_logprobs", 6),
])
def test_bad_logprobs_are_refused_naming_the_parameter(endpoint, param, value, server, model_id):
    extra = {"logprobs": True} if param == "top_logprobs" else {}
    path, body = request_body(endpoint, model_id, **{**extra, param: value})
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert param in r.json()["error"]["message"], r.text


def test_chat_top_logprobs_needs_logprobs(server, model_id):
    path, body = request_body("chat", model_id, top_logprobs=2)
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    # completions take logprobs as the count; top_logprobs is chat's
    path, body = request_body("completions", model_id, top_logprobs=2)
    assert_refused(post(server, path, body), "top_logprobs")


def test_chat_suffix_refused(server, model_id):
    path, body = request_body("chat", model_id, suffix=" the end.")
    assert_refused(post(server, path, body), "suffix")


def test_chat_echo_refused(server, model_id):
    path, body = request_body("chat", model_id, echo=True)
    assert_refused(post(server, path, body), "echo")


@pytest.mark.parametrize("logprobs", [0, 2])
def test_echo_with_logprobs_refused(server, model_id, logprobs):
    """A diffusion model computes no log-probabilities of the prompt, which vLLM returns here."""
    path, body = request_body("completions", model_id, echo=True, logprobs=logprobs)
    assert_refused(post(server, path, body), "echo")
    # Each alone is served.
    for alone in ({"echo": True}, {"logprobs": logprobs}):
        path, body = request_body("completions", model_id, **alone)
        assert post(server, path, body).status_code == 200


def test_refusal_through_the_openai_client(client, model_id):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_TEXT}],
                                       max_tokens=16, presence_penalty=1.0, extra_body=SAMPLING)
    assert ei.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, logit_bias={"5": 1},
                                  extra_body=SAMPLING)
    assert ei.value.body["param"] == "logit_bias"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_default_values_of_unimplemented_parameters_are_accepted(endpoint, server, cli, model_id):
    if endpoint == "completions":
        want = cli.generate(prompt=TEXT, **CLI_SAMPLING)
    else:
        want = cli.generate(prompt=CHAT_TEXT, chat=True, **CLI_SAMPLING)
    path, body = request_body(endpoint, model_id, **DEFAULTS)
    if endpoint == "chat":
        body["logprobs"] = False
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"] if endpoint == "completions" else choice["message"]["content"]) == want["text"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_fields_are_accepted_and_logged(endpoint, info_server, cli, model_id):
    import time

    name = f"remask_unknown_field_{endpoint}"
    path, body = request_body(endpoint, model_id, **{name: {"x": 1}})
    r = post(info_server, path, body, headers={})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5
    while name not in info_server.log():
        assert time.monotonic() < deadline, f"{name} not named in the server's log:\n{info_server.log()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- seed


@pytest.mark.parametrize("extra", [{"temperature": 0.9}, {"remasking": "random"}], ids=["temperature", "random"])
def test_unseeded_request_reports_its_seed_and_is_reproducible(extra, server, cli, model_id):
    path, body = request_body("completions", model_id, **extra)
    first = post(server, path, body).json()
    second = post(server, path, body).json()
    seeds = [first["remask"]["seed"], second["remask"]["seed"]]
    assert all(isinstance(s, int) and 0 <= s < 2**53 for s in seeds), seeds
    assert seeds[0] != seeds[1], "two unseeded requests ran with the same seed"
    # sending the reported seed back gives the same answer, and the CLI's with that seed
    again = post(server, path, {**body, "seed": seeds[0]}).json()
    assert again["remask"]["seed"] == seeds[0]
    assert again["remask"]["generated_ids"] == first["remask"]["generated_ids"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    want = cli.generate(prompt=TEXT, seed=seeds[0], **CLI_SAMPLING, **extra)
    assert first["remask"]["generated_ids"] == want["generated_ids"]


def test_seeded_request_reports_its_seed(client, cli, model_id):
    for seed in (0, 1234):
        got = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, temperature=0.9, seed=seed,
                                        extra_body=SAMPLING)
        assert got.model_extra["remask"]["seed"] == seed
        assert got.choices[0].text == cli.generate(prompt=TEXT, temperature=0.9, seed=seed, **CLI_SAMPLING)["text"]


def test_stream_reports_the_seed(server, model_id):
    path, body = request_body("chat", model_id, temperature=0.8, stream=True)
    r = requests.post(f"{server.http_url}{path}", json=body, headers=AUTH, stream=True, timeout=60)
    events = [json.loads(line[6:]) for line in (ln.decode() for ln in r.iter_lines())
              if line.startswith("data: {")]
    seed = events[-1]["remask"]["seed"]
    full = post(server, path, {**body, "stream": False, "seed": seed}).json()
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == full["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- tokenize, detokenize


def test_tokenize_prompt_matches_the_cli(server, cli, model_id, model_config):
    want = cli.generate(prompt=TEXT, **CLI_SAMPLING)
    r = post(server, "/tokenize", {"model": model_id, "prompt": TEXT})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["tokens"] == want["prompt_ids"]
    assert v["count"] == len(want["prompt_ids"])
    assert v["max_model_len"] == model_config["max_sequence_length"]
    # without special tokens: no BOS
    plain = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
    assert plain == want["prompt_ids"][len(want["prompt_ids"]) - len(plain):]
    assert len(plain) <= len(want["prompt_ids"])
    # round trip: the ids back to text, and that text to the same ids
    r = post(server, "/detokenize", {"model": model_id, "tokens": plain})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == TEXT
    text = post(server, "/detokenize", {"tokens": v["tokens"]}).json()["prompt"]
    assert post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"] == v["tokens"]


def test_tokenize_messages_matches_the_chat_prompt(server, cli, model_id):
    want = cli.generate(prompt=CHAT_TEXT, chat=True, **CLI_SAMPLING)
    r = post(server, "/tokenize", {"model": model_id, "messages": [{"role": "user", "content": CHAT_TEXT}]})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == want["prompt_ids"]
    # the chat endpoint reports the same prompt length
    path, body = request_body("chat", model_id)
    assert post(server, path, body).json()["usage"]["prompt_tokens"] == r.json()["count"]


@pytest.mark.parametrize("path,body,status", [
    ("/tokenize", {"prompt": TEXT}, 401),
    ("/tokenize", {"model": "no-such-model", "prompt": TEXT}, 404),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": TEXT, "messages": [{"role": "user", "content": TEXT}]}, 400),
    ("/detokenize", {"tokens": [1]}, 401),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
], ids=["tokenize-no-key", "tokenize-model", "tokenize-empty", "tokenize-both", "detokenize-no-key",
        "detokenize-out-of-vocab", "detokenize-not-ids"])
def test_tokenize_errors(path, body, status, server):
    r = post(server, path, body, headers={} if status == 401 else AUTH)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}


# --------------------------------------------------------------------------- models


def test_model_card(client, model_id, model_config):
    m = client.models.retrieve(model_id)
    assert m.id == model_id and m.object == "model"
    assert m.model_extra["max_model_len"] == model_config["max_sequence_length"]
    listed = client.models.list().data[0]
    assert listed.model_extra["max_model_len"] == model_config["max_sequence_length"]
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert ei.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------- errors axum makes


def assert_json_error(r: requests.Response, status: int):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == "invalid_request_error", err
    assert "param" in err and "code" in err, err
    return err


@pytest.mark.parametrize("method,path", [("GET", "/v1/nope"), ("POST", "/nope"), ("GET", "/")])
def test_unknown_route_404_json(method, path, server):
    r = requests.request(method, f"{server.http_url}{path}", headers=AUTH, timeout=10)
    err = assert_json_error(r, 404)
    assert path in err["message"]


@pytest.mark.parametrize("method,path", [("GET", "/v1/completions"), ("DELETE", "/v1/chat/completions"),
                                         ("POST", "/v1/models"), ("POST", "/health")])
def test_wrong_method_405_json(method, path, server):
    r = requests.request(method, f"{server.http_url}{path}", headers=AUTH, timeout=10)
    assert_json_error(r, 405)
    assert r.headers.get("allow"), r.headers


def test_body_too_large_413_json(server, model_id):
    body = json.dumps({"model": model_id, "prompt": "a" * (3 << 20), "max_tokens": 8})
    r = requests.post(f"{server.base_url}/completions", data=body,
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_json_error(r, 413)


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_bearer_scheme_is_case_insensitive(scheme, server, model_id):
    path, body = request_body("completions", model_id)
    r = post(server, path, body, headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200, r.text
    r = post(server, path, body, headers={"Authorization": f"{scheme} test-key-3"})
    assert r.status_code == 401, r.text
