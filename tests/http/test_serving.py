"""Issue 13, the parameters and the surface vLLM users expect: `stop` (the answer ends before the
first stop string and the request finishes once that text is final), `n` > 1 and lists of
prompts (one canvas each in the running batch), `echo`, `X-Request-Id`, CORS
(`--allowed-origins`), `--served-model-name`, SSE keep-alive comments. See conftest.py for the
servers."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

TEXT = "Hello world"
CHAT = [{"role": "user", "content": "What is a diffusion language model?"}]
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Greedy, the fixed schedule: deterministic.
SAMPLING = {"max_tokens": 32, "steps": 32, "block_length": 16}


def post(srv, path: str, body: dict, headers=AUTH, **kw) -> requests.Response:
    return requests.post(f"{srv.http_url}{path}", json=body, headers=headers, timeout=60, **kw)


def complete(srv, model_id, **kw) -> dict:
    r = post(srv, "/v1/completions", {"model": model_id, "prompt": TEXT, **SAMPLING, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def stop_string(text: str) -> str:
    """A stop string from the middle of `text` (or nearer its start) that does not occur earlier."""
    for start in [*range(len(text) // 3, len(text) - 2), *range(len(text) // 3 - 1, 0, -1)]:
        s = text[start:start + 2]
        if s.strip() and text.find(s) == start:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


def sse(r: requests.Response) -> list[dict]:
    r.encoding = "utf-8"
    events = []
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: "):]))
    return events


# --------------------------------------------------------------------------- stop


def test_stop_ends_the_answer_before_the_stop_string(server, model_id):
    plain = complete(server, model_id)
    text = plain["choices"][0]["text"]
    stop = stop_string(text)
    got = complete(server, model_id, stop=[stop, "never-in-the-text-zz"])
    choice = got["choices"][0]
    assert choice["text"] == text[:text.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == stop
    # the tokens through the stop string, as vLLM counts them
    assert 1 <= got["usage"]["completion_tokens"] <= plain["usage"]["completion_tokens"]
    assert got["remask"]["forwards"] <= plain["remask"]["forwards"]
    # a plain string works the same as a list of one
    again = complete(server, model_id, stop=stop)
    assert again["choices"][0]["text"] == choice["text"]


def test_stop_gives_the_cli_answer(server, model_id, cli):
    """`remask generate --stop` in process and through gRPC (`--endpoint`) answers as HTTP does."""
    plain = complete(server, model_id)
    stop = stop_string(plain["choices"][0]["text"])
    got = complete(server, model_id, stop=[stop], seed=0)
    want = {"steps": 32, "block_length": 16, "gen_length": 32}
    for kw in ({}, {"endpoint": server.grpc_address, "api_key": KEY}):
        out = cli.generate(prompt=TEXT, stop=[stop], **want, **kw)
        assert out["text"] == got["choices"][0]["text"], kw
        assert (out["finish_reason"], out["matched_stop"]) == ("stop", stop), kw
        assert out["completion_tokens"] == got["usage"]["completion_tokens"], kw
        assert out["forwards"] == got["remask"]["forwards"], kw


def test_stop_finishes_the_request_once_the_text_is_final(server, model_id):
    """The fixed schedule with one block commits left to right on most canvases: a stop string
    early in the answer ends the request long before the canvas is complete."""
    body = {"max_tokens": 32, "steps": 32, "block_length": 32}
    plain = complete(server, model_id, **body)
    text = plain["choices"][0]["text"]
    first = text.strip()[:1]
    if not first:
        pytest.skip("the answer is empty")
    got = complete(server, model_id, stop=[first], **body)
    assert got["choices"][0]["matched_stop"] == first
    assert got["remask"]["forwards"] < plain["remask"]["forwards"] or plain["remask"]["forwards"] <= 2


def test_stop_in_a_stream_never_sends_the_stop_string(server, model_id):
    plain = complete(server, model_id)
    text = plain["choices"][0]["text"]
    stop = stop_string(text)
    r = post(server, "/v1/completions",
             {"model": model_id, "prompt": TEXT, **SAMPLING, "stop": [stop], "stream": True}, stream=True)
    events = sse(r)
    streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert streamed == text[:text.index(stop)]
    final = events[-1]["choices"][0]
    assert final["finish_reason"] == "stop" and final["matched_stop"] == stop


def test_stop_through_the_openai_client(client, model_id):
    plain = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=32,
                                           extra_body={"steps": 32, "block_length": 16})
    text = plain.choices[0].message.content
    stop = stop_string(text)
    got = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=32, stop=[stop],
                                         extra_body={"steps": 32, "block_length": 16})
    assert got.choices[0].message.content == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].model_extra["matched_stop"] == stop


@pytest.mark.parametrize("stop,why", [
    (["a", "b", "c", "d", "e"], "at most 4"),
    ([""], "empty"),
    (["x" * 1025], "1024"),
    ([5], "string"),
    ({"s": 1}, "string"),
])
def test_bad_stop_is_refused(stop, why, server, model_id):
    r = post(server, "/v1/completions", {"model": model_id, "prompt": TEXT, **SAMPLING, "stop": stop})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stop" and why in err["message"], err


def test_stop_with_full_canvas_is_refused(server, model_id):
    r = post(server, "/v1/completions",
             {"model": model_id, "prompt": TEXT, **SAMPLING, "stop": ["x"], "full_canvas": True})
    assert r.status_code == 400 and "full_canvas" in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------- n, lists of prompts, echo


def test_n_choices_are_seeds_in_a_row(server, model_id):
    sampled = {**SAMPLING, "temperature": 1.0}
    got = complete(server, model_id, n=3, seed=40, **sampled)
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    for i, choice in enumerate(got["choices"]):
        alone = complete(server, model_id, seed=40 + i, **sampled)
        assert choice["text"] == alone["choices"][0]["text"], i
        assert choice["remask"]["seed"] == 40 + i
    prompt_tokens = complete(server, model_id)["usage"]["prompt_tokens"]
    # the prompt is counted once, the answers each
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    assert got["usage"]["completion_tokens"] == sum(
        complete(server, model_id, seed=40 + i, **sampled)["usage"]["completion_tokens"] for i in range(3))


def test_a_list_of_prompts_gives_one_choice_each(server, model_id):
    prompts = ["Hello world", "Once upon a time", [5, 17, 42]]
    got = complete(server, model_id, prompt=prompts)
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    total = 0
    for p, choice in zip(prompts, got["choices"]):
        alone = complete(server, model_id, prompt=p)
        assert choice["text"] == alone["choices"][0]["text"], p
        total += alone["usage"]["prompt_tokens"]
    assert got["usage"]["prompt_tokens"] == total


def test_several_choices_stream_with_their_index(server, model_id):
    body = {"model": model_id, "prompt": ["Hello world", "Once upon a time"], **SAMPLING, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    events = sse(post(server, "/v1/completions", body, stream=True))
    texts = ["", "", "", ""]
    finished = set()
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1, 2, 3}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    whole = complete(server, model_id, prompt=["Hello world", "Once upon a time"], n=2)
    assert texts == [c["text"] for c in whole["choices"]]


def test_echo_puts_the_prompt_before_the_answer(server, model_id):
    plain = complete(server, model_id)["choices"][0]["text"]
    assert complete(server, model_id, echo=True)["choices"][0]["text"] == TEXT + plain
    events = sse(post(server, "/v1/completions",
                      {"model": model_id, "prompt": TEXT, **SAMPLING, "echo": True, "stream": True}, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events) == TEXT + plain


def test_too_many_choices_are_refused(server, model_id):
    r = post(server, "/v1/completions", {"model": model_id, "prompt": ["a"] * 10, **SAMPLING, "n": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


# --------------------------------------------------------------------------- request ids


def test_request_id_is_taken_returned_and_logged(info_server, model_id):
    r = post(info_server, "/v1/completions", {"model": model_id, "prompt": TEXT, **SAMPLING},
             headers={"X-Request-Id": "trace-42.a"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-42.a"
    assert r.json()["id"] == "cmpl-trace-42.a"
    deadline = time.monotonic() + 5
    while "trace-42.a" not in info_server.log():
        assert time.monotonic() < deadline, info_server.log()
        time.sleep(0.05)
    fresh = post(info_server, "/v1/completions", {"model": model_id, "prompt": TEXT, **SAMPLING}, headers={})
    assert len(fresh.headers["x-request-id"]) >= 8
    assert fresh.json()["id"] == "cmpl-" + fresh.headers["x-request-id"]


def test_bad_request_id_is_refused(server, model_id):
    r = post(server, "/v1/completions", {"model": model_id, "prompt": TEXT, **SAMPLING},
             headers={**AUTH, "X-Request-Id": "x" * 129})
    assert r.status_code == 400 and "x-request-id" in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------- CORS, name, keep-alive


def test_cors_only_for_allowed_origins(front_server, server):
    url = f"{front_server.http_url}/v1/completions"
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = requests.options(url, headers=pre, timeout=10)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = requests.options(url, headers={**pre, "Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers
    # without --allowed-origins: no CORS headers at all
    default = requests.options(f"{server.http_url}/v1/completions", headers=pre, timeout=10)
    assert not any(h.lower().startswith("access-control-") for h in default.headers), default.headers


def test_served_model_name(front_server):
    listed = requests.get(f"{front_server.http_url}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["org/served-name"]
    r = post(front_server, "/v1/completions", {"model": "org/served-name", "prompt": TEXT, **SAMPLING}, headers={})
    assert r.status_code == 200 and r.json()["model"] == "org/served-name", r.text


def test_sse_keep_alive_while_waiting(front_server):
    """With --max-batch 1, a stream waits behind a long request: comments keep it alive."""
    # about 1 s of steps on two cores: five keep-alive periods
    long = {"model": "org/served-name", "prompt": TEXT, "max_tokens": 64, "steps": 64, "block_length": 64}
    blocker = threading.Thread(target=post, args=(front_server, "/v1/completions", long), kwargs={"headers": {}})
    blocker.start()
    time.sleep(0.1)
    r = post(front_server, "/v1/completions",
             {"model": "org/served-name", "prompt": TEXT, **SAMPLING, "stream": True}, headers={}, stream=True)
    r.encoding = "utf-8"
    comments, data = 0, 0
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith(":"):
            comments += data == 0
        elif line.startswith("data: "):
            data += 1
    blocker.join()
    assert data > 0 and comments >= 1, (comments, data)
