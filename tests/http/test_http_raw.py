"""remask's HTTP API on the wire: `curl` for status codes, headers and bodies
(keys, /health, /metrics, invalid JSON), `requests` for the raw server-sent
events of a stream. See conftest.py for the servers."""

from __future__ import annotations

import json

import pytest
import requests

TEXT = "Hello world"
CHAT_TEXT = "What is a diffusion language model?"
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}

METRIC_NAMES = [
    "remask:num_requests_running{model_name=",
    "remask:num_requests_waiting{model_name=",
    "remask:request_success_total",
    "remask:e2e_request_latency_seconds_bucket",
    "remask:time_per_denoising_step_seconds",
    "remask:tokens_committed_per_forward",
    "remask:forwards_per_request",
    "remask:stage_forward_time_seconds",
    "remask:workers",
    "remask:shard_coverage",
    "remask:prompt_tokens_total",
    "remask:generation_tokens_total",
    "remask:request_queue_time_seconds",
]


def completion_body(model_id, **kw):
    return json.dumps({"model": model_id, "prompt": TEXT, "max_tokens": 16, "steps": 16, "block_length": 16, **kw})


def assert_error_shape(body: str, kind: str | None = None, code=None) -> dict:
    v = json.loads(body)
    assert set(v) == {"error"}, v
    err = v["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "param" in err and "code" in err, err
    if kind is not None:
        assert err["type"] == kind, err
    if code is not None:
        assert err["code"] == code, err
    return err


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


# --------------------------------------------------------------------------- keys


def test_completion_with_bearer_key(curl, server, cli, model_id):
    want = cli.generate(prompt=TEXT, gen_length=16, steps=16, block_length=16)
    status, head, body = curl("POST", f"{server.base_url}/completions", headers={**AUTH, **JSON},
                              data=completion_body(model_id))
    assert status == 200, body
    assert header(head, "content-type").startswith("application/json")
    v = json.loads(body)
    assert v["object"] == "text_completion"
    assert v["choices"][0]["text"] == want["text"]
    assert v["usage"]["completion_tokens"] == 16


def test_second_key_accepted(curl, server, model_id):
    status, _, body = curl("POST", f"{server.base_url}/completions",
                           headers={"Authorization": "Bearer test-key-2", **JSON}, data=completion_body(model_id))
    assert status == 200, body


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer test-key-3"},
    {"Authorization": "Bearer "},
    {"Authorization": KEY},                     # no `Bearer ` scheme
    {"Authorization": "Basic dGVzdC1rZXktMQ=="},
    {"Authorization": "Bearer test-key-1x"},
    {"Authorization": "Bearer test-key-"},
], ids=["none", "wrong", "empty", "no-scheme", "basic", "longer", "prefix"])
def test_completion_without_valid_key_401(headers, curl, server, model_id):
    status, head, body = curl("POST", f"{server.base_url}/completions", headers={**headers, **JSON},
                              data=completion_body(model_id))
    assert status == 401, body
    assert header(head, "content-type").startswith("application/json")
    assert_error_shape(body, kind="invalid_request_error", code="invalid_api_key")


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
])
def test_other_v1_routes_need_a_key(method, path, curl, server, model_id):
    data = json.dumps({"model": model_id, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 16}) \
        if method == "POST" else None
    status, _, body = curl(method, f"{server.http_url}{path}", headers=JSON, data=data)
    assert status == 401, body
    assert_error_shape(body, code="invalid_api_key")
    status, _, body = curl(method, f"{server.http_url}{path}", headers={**AUTH, **JSON}, data=data)
    assert status == 200, body


def test_health_needs_no_key(curl, server):
    status, head, body = curl("GET", f"{server.http_url}/health")
    assert status == 200
    assert header(head, "content-type").startswith("application/json")
    assert json.loads(body) == {"status": "ok"}


def test_open_server_completion_without_key(curl, open_server, model_id):
    status, _, body = curl("POST", f"{open_server.base_url}/completions", headers=JSON,
                           data=completion_body(model_id))
    assert status == 200, body
    assert json.loads(body)["object"] == "text_completion"


def _read_response(sock) -> tuple[str, bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    head = head.decode("latin-1")
    length = int(header(head, "content-length") or 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return head, body


def test_connection_survives_or_is_announced_closed_after_401(server):
    """HTTP/1.1 keep-alive: after a response, the server either serves the next request on the
    same connection or said `Connection: close` in that response (RFC 9112, 9.6)."""
    import socket

    body = json.dumps({"model": "x", "prompt": "a" * 2000, "max_tokens": 16}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        # headers and the start of the body; the rest only after the 401 came back
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        head, payload = _read_response(s)
        assert head.split()[1] == "401", head
        assert_error_shape(payload.decode(), code="invalid_api_key")
        if "close" in (header(head, "connection") or "").lower():
            return  # announced: the client will not reuse the connection
        try:
            s.sendall(body[100:])
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head2, _ = _read_response(s)
        except (OSError, AssertionError) as e:
            pytest.fail(f"the server closed the connection after `{head.splitlines()[0]}` without "
                        f"`Connection: close`: {e!r}")
        assert head2.split()[1] == "200", head2


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("data", [
    '{"model": "tiny", "prompt": ',            # truncated
    "not json at all",
    "",
    '{"model": "tiny", "max_tokens": 16}',     # no prompt
    '{"prompt": "Hi", "max_tokens": "sixteen"}',
    '{"prompt": {"text": "Hi"}, "max_tokens": 16}',
    '{"prompt": ["a", 5], "max_tokens": 16}',  # a text and a token id: neither shape
], ids=["truncated", "garbage", "empty", "no-prompt", "max_tokens-string", "prompt-object", "prompt-mixed"])
def test_invalid_json_400(data, curl, server):
    status, head, body = curl("POST", f"{server.base_url}/completions", headers={**AUTH, **JSON}, data=data)
    assert status == 400, body
    assert header(head, "content-type").startswith("application/json")
    assert_error_shape(body, kind="invalid_request_error")


@pytest.mark.parametrize("data", [
    '{"messages": [{"role": "user", "content": "Hi"}',
    '{"max_tokens": 16}',
    '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
    '{"messages": [{"role": "user", "content": 5}]}',
], ids=["truncated", "no-messages", "image-part", "content-number"])
def test_chat_invalid_json_400(data, curl, server):
    status, _, body = curl("POST", f"{server.base_url}/chat/completions", headers={**AUTH, **JSON}, data=data)
    assert status == 400, body
    assert_error_shape(body, kind="invalid_request_error")


def test_bad_requests_via_curl(curl, server, model_id):
    url = f"{server.base_url}/completions"
    h = {**AUTH, **JSON}
    for kw in ({"max_tokens": 10, "block_length": 4}, {"steps": 32}, {"remasking": "nope"}, {"n": 0}):
        status, _, body = curl("POST", url, headers=h, data=completion_body(model_id, **kw))
        assert status == 400, (kw, body)
        assert_error_shape(body, kind="invalid_request_error")
    status, _, body = curl("POST", url, headers=h, data=completion_body("no-such-model"))
    assert status == 404, body
    assert_error_shape(body, kind="invalid_request_error", code="model_not_found")


# --------------------------------------------------------------------------- metrics


def test_metrics_need_no_key_and_name_everything(curl, server, model_id):
    # one finished request first, so that every labelled family has a sample
    status, _, body = curl("POST", f"{server.base_url}/completions", headers={**AUTH, **JSON},
                           data=completion_body(model_id))
    assert status == 200, body
    status, head, text = curl("GET", f"{server.http_url}/metrics")
    assert status == 200
    ctype = header(head, "content-type")
    assert ctype.startswith("application/openmetrics-text") or ctype.startswith("text/plain"), ctype
    for name in METRIC_NAMES:
        assert name in text, f"{name} missing from /metrics"
    label = f'model_name="{model_id}"'
    for sample in ("remask:num_requests_running", "remask:prompt_tokens_total", "remask:generation_tokens_total",
                   "remask:e2e_request_latency_seconds_count", "remask:request_queue_time_seconds_count",
                   "remask:time_per_denoising_step_seconds_count", "remask:tokens_committed_per_forward_count",
                   "remask:forwards_per_request_count",
                   "remask:stage_forward_time_seconds_count", "remask:workers", "remask:shard_coverage"):
        assert any(line.startswith(sample + "{") and label in line for line in text.splitlines()), \
            f"no {sample}{{{label}...}} sample"


def _value(text, name, **labels):
    """The sum of the samples named exactly `name` whose labels include `labels`."""
    import re

    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', line)
        if not m or m.group(1) != name:
            continue
        ls = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(ls.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"no sample {name} {labels}"
    return total


def test_metrics_grow_after_a_request(curl, server, client, model_id):
    label = {"model_name": model_id}
    _, _, before = curl("GET", f"{server.http_url}/metrics")
    got = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16,
                                    extra_body={"steps": 8, "block_length": 16})
    _, _, after = curl("GET", f"{server.http_url}/metrics")

    def delta(name, **labels):
        return _value(after, name, **labels) - (_value(before, name, **labels) if name in before else 0.0)

    reason = got.choices[0].finish_reason
    assert delta("remask:request_success_total", **label) == 1
    assert delta("remask:request_success_total", finished_reason=reason, **label) == 1
    assert delta("remask:prompt_tokens_total", **label) == got.usage.prompt_tokens
    # the answer's tokens (before any stop token), not the canvas
    completion = got.usage.completion_tokens
    assert delta("remask:generation_tokens_total", **label) == completion
    assert completion == 16 or (completion < 16 and reason == "stop")
    assert delta("remask:e2e_request_latency_seconds_count", **label) == 1
    assert delta("remask:e2e_request_latency_seconds_sum", **label) > 0
    assert delta("remask:request_queue_time_seconds_count", **label) == 1
    # one sample per forward pass, each committing 2 tokens (8 steps for 16
    # tokens, fewer when the answer ended early)
    forwards = got.model_extra["remask"]["forwards"]
    assert 1 <= forwards <= 8 and (forwards == 8 or reason == "stop")
    assert delta("remask:tokens_committed_per_forward_count", **label) == forwards
    assert delta("remask:tokens_committed_per_forward_sum", **label) == 2 * forwards
    assert delta("remask:forwards_per_request_count", **label) == 1
    assert delta("remask:forwards_per_request_sum", **label) == forwards
    assert delta("remask:time_per_denoising_step_seconds_count", **label) >= forwards
    assert delta("remask:stage_forward_time_seconds_count", **label) >= forwards
    # the +Inf bucket of a histogram is its count
    assert delta("remask:e2e_request_latency_seconds_bucket", le="+Inf", **label) == 1
    assert _value(after, "remask:num_requests_running", **label) == 0
    assert _value(after, "remask:num_requests_waiting", **label) == 0
    assert _value(after, "remask:workers", **label) == 1
    assert _value(after, "remask:shard_coverage", **label) == 1.0


# --------------------------------------------------------------------------- raw SSE


def read_sse(url: str, body: dict) -> tuple[requests.Response, list[str]]:
    r = requests.post(url, json=body, headers=AUTH, stream=True, timeout=60)
    lines = [line.decode("utf-8") for line in r.iter_lines()]
    return r, [line for line in lines if line]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("steps,block", [(16, 16), (8, 16), (16, 8)], ids=["1-per-step", "2-per-step", "2-blocks"])
def test_raw_sse_one_event_per_step(endpoint, steps, block, server, cli, model_id, model_config):
    if endpoint == "completions":
        want = cli.generate(prompt=TEXT, gen_length=16, steps=steps, block_length=block)
        url = f"{server.base_url}/completions"
        body = {"model": model_id, "prompt": TEXT}
    else:
        want = cli.generate(prompt=CHAT_TEXT, chat=True, gen_length=16, steps=steps, block_length=block)
        url = f"{server.base_url}/chat/completions"
        body = {"model": model_id, "messages": [{"role": "user", "content": CHAT_TEXT}]}
    body.update(max_tokens=16, steps=steps, block_length=block, stream=True)
    r, lines = read_sse(url, body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines), [ln for ln in lines if not ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "data: [DONE]" not in lines[:-1]
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    # one event per denoising step, then the final one
    assert len(events) == steps + 1, f"{len(events)} events for {steps} steps"
    prompt_len = len(want["token_ids"]) - len(want["generated_ids"])
    generated = [None] * 16
    object_ = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    for i, ev in enumerate(events[:-1]):
        assert ev["object"] == object_
        assert ev["model"] == model_id
        assert len(ev["choices"]) == 1 and ev["choices"][0]["finish_reason"] is None
        rm = ev["remask"]
        assert set(rm) >= {"step", "positions", "tokens"}
        assert rm["step"] == i
        assert len(rm["positions"]) == len(rm["tokens"]) == 16 // steps
        for p, t in zip(rm["positions"], rm["tokens"]):
            assert prompt_len <= p < prompt_len + 16, f"position {p} outside the answer"
            assert generated[p - prompt_len] is None, f"position {p} committed twice"
            generated[p - prompt_len] = t
    assert generated == want["generated_ids"]
    final = events[-1]
    # the result's own fields, not a step's
    assert "step" not in final["remask"] and final["remask"]["forwards"] == steps
    assert final["choices"][0]["finish_reason"] == ("stop" if model_config["eos_token_id"] in want["generated_ids"]
                                                    else "length")
    assert len({ev["id"] for ev in events}) == 1
    if endpoint == "completions":
        text = "".join(ev["choices"][0]["text"] for ev in events)
    else:
        text = "".join(ev["choices"][0]["delta"].get("content") or "" for ev in events)
    assert text == want["text"]


def test_raw_sse_via_curl(curl, server, model_id):
    status, head, body = curl("POST", f"{server.base_url}/completions", headers={**AUTH, **JSON},
                              data=completion_body(model_id, stream=True))
    assert status == 200
    assert header(head, "content-type").startswith("text/event-stream")
    data = [line for line in body.splitlines() if line]
    assert all(line.startswith("data: ") for line in data)
    assert data[-1] == "data: [DONE]"
    assert len(data) == 16 + 2
    events = [json.loads(line[6:]) for line in data[:-1]]
    assert [e["remask"]["step"] for e in events[:-1]] == list(range(16))
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")


# --------------------------------------------------------------------------- unready cluster


def test_unready_health_503(curl, unready):
    status, head, body = curl("GET", f"{unready.http_url}/health")
    assert status == 503, body
    assert header(head, "content-type").startswith("application/json")
    assert json.loads(body)["status"] != "ok"


def test_unready_completion_503(curl, unready, model_id):
    status, _, body = curl("POST", f"{unready.base_url}/completions", headers={**AUTH, **JSON},
                           data=completion_body(model_id))
    assert status == 503, body
    assert_error_shape(body, kind="server_error")


def test_unready_metrics(curl, unready, model_id):
    status, _, text = curl("GET", f"{unready.http_url}/metrics")
    assert status == 200
    assert _value(text, "remask:workers", model_name=model_id) == 0
    assert _value(text, "remask:shard_coverage", model_name=model_id) == 0


def test_huge_prompt_is_refused_before_tokenizing(server, model_id):
    """1.5 MB of prompt (under the 2 MB body limit) is refused for its size at once, in
    OpenAI's error shape, for completions and chat alike."""
    import time

    text = "word " * 300_000
    for path, body in (("completions", {"prompt": text}),
                       ("chat/completions", {"messages": [{"role": "user", "content": text}]})):
        t = time.monotonic()
        r = requests.post(f"{server.base_url}/{path}", headers=AUTH, timeout=60,
                          json={"model": model_id, "max_tokens": 8, **body})
        took = time.monotonic() - t
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "bytes" in err["message"], err
        assert took < 1.0, f"{path}: refusing took {took:.2f} s"
