"""`logprobs` / `top_logprobs` on both endpoints through the `openai` client: each answer
token's log-probability at the step that committed it and the most likely alternatives
there, computed by the head reduction (full logits never leave the backend). See
conftest.py for the servers."""

from __future__ import annotations

import json
import math

import requests

TEXT = "Hello world"
CHAT_TEXT = "What is a diffusion language model?"
SAMPLING = {"steps": 16, "block_length": 16}
CLI_SAMPLING = {"gen_length": 16, "steps": 16, "block_length": 16}
AUTH = {"Authorization": "Bearer test-key-1"}


def test_completions_logprobs(client, cli, model_id):
    want = cli.generate(prompt=TEXT, **CLI_SAMPLING)
    got = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, logprobs=3,
                                    extra_body=SAMPLING)
    choice = got.choices[0]
    assert choice.text == want["text"]
    lp = choice.logprobs
    n = got.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert n > 0
    assert "".join(lp.tokens) == choice.text
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0 and math.isfinite(logprob)
        assert 1 <= len(top) <= 3
        values = list(top.values())  # a JSON object: its order is not the ranking
        assert all(v <= 0.0 for v in values)
        # greedy: the chosen token is the most likely one at its step
        assert math.isclose(max(values), logprob, abs_tol=1e-9), (token, logprob, top)
        assert top.get(token) is not None and math.isclose(top[token], logprob, abs_tol=1e-9)
    # logprobs=0: the tokens' own log-probabilities, no alternatives
    zero = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, logprobs=0,
                                     extra_body=SAMPLING)
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert all(t == {} for t in zero.choices[0].logprobs.top_logprobs)
    # not asked for: null
    plain = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, extra_body=SAMPLING)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text


def test_chat_logprobs(client, cli, model_id):
    want = cli.generate(prompt=CHAT_TEXT, chat=True, **CLI_SAMPLING)
    got = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_TEXT}],
                                         max_tokens=16, logprobs=True, top_logprobs=2, extra_body=SAMPLING)
    choice = got.choices[0]
    assert choice.message.content == want["text"]
    content = choice.logprobs.content
    assert len(content) == got.usage.completion_tokens > 0
    assert b"".join(bytes(c.bytes) for c in content) == choice.message.content.encode()
    for c in content:
        assert c.logprob <= 0.0
        assert bytes(c.bytes).decode(errors="replace") == c.token
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].token == c.token
        assert math.isclose(c.top_logprobs[0].logprob, c.logprob, abs_tol=1e-9)
    # logprobs without top_logprobs: no alternatives
    only = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_TEXT}],
                                          max_tokens=16, logprobs=True, extra_body=SAMPLING)
    assert [c.logprob for c in only.choices[0].logprobs.content] == [c.logprob for c in content]
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)


def test_sampled_tokens_have_their_own_logprobs(client, model_id):
    # temperature > 0: the sampled token's log-probability at temperature 1, not the top one's
    got = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, logprobs=5, temperature=1.5,
                                    seed=3, extra_body=SAMPLING)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == got.usage.completion_tokens
    assert all(v <= max(top.values()) + 1e-9 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    again = client.completions.create(model=model_id, prompt=TEXT, max_tokens=16, logprobs=5, temperature=1.5,
                                      seed=3, extra_body=SAMPLING)
    assert again.choices[0].logprobs.token_logprobs == lp.token_logprobs


def _events(r):
    out = []
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_streamed_logprobs_follow_the_text(server, client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_TEXT}],
                                           max_tokens=16, logprobs=True, top_logprobs=2, extra_body=SAMPLING)
    body = {"model": model_id, "messages": [{"role": "user", "content": CHAT_TEXT}], "max_tokens": 16,
            "logprobs": True, "top_logprobs": 2, "stream": True, **SAMPLING}
    with requests.post(f"{server.http_url}/v1/chat/completions", json=body, headers=AUTH, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200, r.text
        events = _events(r)
    text, entries = "", []
    for e in events:
        for ch in e["choices"]:
            text += ch["delta"].get("content") or ""
            if ch.get("logprobs"):
                entries += ch["logprobs"]["content"]
                # each chunk's tokens never run ahead of the text sent so far
                assert text.encode().startswith(b"".join(bytes(x["bytes"]) for x in entries))
    assert text == whole.choices[0].message.content
    assert [x["logprob"] for x in entries] == [c.logprob for c in whole.choices[0].logprobs.content]
    # completions stream: text_offset continues across chunks
    body = {"model": model_id, "prompt": TEXT, "max_tokens": 16, "logprobs": 1, "stream": True, **SAMPLING}
    with requests.post(f"{server.http_url}/v1/completions", json=body, headers=AUTH, stream=True,
                       timeout=60) as r:
        events = _events(r)
    text, tokens, offsets = "", [], []
    for e in events:
        for ch in e["choices"]:
            text += ch["text"]
            if ch.get("logprobs"):
                tokens += ch["logprobs"]["tokens"]
                offsets += ch["logprobs"]["text_offset"]
    assert "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_chat_bytes_join_under_sampling(client, model_id):
    # a random model's sampled answer is full of tokens that hold part of a character
    got = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_TEXT}],
                                         max_tokens=16, logprobs=True, temperature=1.5, seed=3,
                                         extra_body=SAMPLING)
    content = got.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == got.choices[0].message.content
