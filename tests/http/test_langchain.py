"""LangChain's OpenAI integration (`langchain_openai.ChatOpenAI` and `OpenAI`) against
`remask serve` on the embedded default model (the `default_server` fixture): `.invoke`,
`.batch` of several prompts (concurrent requests: each answer is the one it gets alone),
`stop=[...]` (the answer ends before the stop string) and `.stream` (the chunks concatenate to
the answer). Greedy decoding on the fixed schedule, so every answer is deterministic; remask's
own sampler parameters go in `extra_body`."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import require_module  # noqa: E402

PIP = "pip install -r tests/http/requirements.txt"

# Greedy on the fixed schedule (deterministic); the end of turn still ends an answer.
EXTRA = {"steps": 32, "block_length": 16, "logits_eos_inf": True}
MAX_TOKENS = 32
PROMPTS = [
    "It was a fine morning, and Elizabeth",
    "In the beginning God created",
    "Call me Ishmael. Some years ago",
]
QUESTION = 'What does "river" mean?'


@pytest.fixture(scope="module")
def langchain_openai():
    return require_module("langchain_openai", PIP)


@pytest.fixture(scope="module")
def model_id(default_server) -> str:
    with urllib.request.urlopen(f"{default_server.base_url}/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


@pytest.fixture(scope="module")
def chat(langchain_openai, default_server, model_id):
    return langchain_openai.ChatOpenAI(
        model=model_id, base_url=default_server.base_url, api_key="unused", temperature=0,
        max_tokens=MAX_TOKENS, max_retries=0, timeout=120, extra_body=EXTRA,
    )


@pytest.fixture(scope="module")
def llm(langchain_openai, default_server, model_id):
    return langchain_openai.OpenAI(
        model=model_id, base_url=default_server.base_url, api_key="unused", temperature=0,
        max_tokens=MAX_TOKENS, max_retries=0, timeout=120, extra_body=EXTRA,
    )


def completion(srv, model_id: str, prompt: str, **kw) -> dict:
    """The same request sent without LangChain (the reference answer)."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **EXTRA, **kw}
    req = urllib.request.Request(f"{srv.base_url}/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def stop_string(text: str) -> str:
    """Two characters from the middle of `text` (or nearer its start) not found earlier in it."""
    for start in [*range(len(text) // 3, len(text) - 2), *range(len(text) // 3 - 1, 0, -1)]:
        s = text[start:start + 2]
        if s.strip() and text.find(s) == start:
            return s
    pytest.fail(f"no usable stop string in {text!r}")


# --------------------------------------------------------------------------- OpenAI (completions)


def test_llm_invoke_is_the_servers_answer(llm, default_server, model_id):
    want = completion(default_server, model_id, PROMPTS[0])["choices"][0]["text"]
    assert want.strip(), "the default model answered nothing"
    assert llm.invoke(PROMPTS[0]) == want


def test_llm_batch_answers_each_prompt_as_alone(llm, default_server, model_id):
    want = [completion(default_server, model_id, p)["choices"][0]["text"] for p in PROMPTS]
    assert llm.batch(PROMPTS) == want
    # one call with several prompts (LangChain sends them as a list in one request)
    got = llm.generate(PROMPTS)
    assert [g[0].text for g in got.generations] == want


def test_llm_stop_ends_the_answer_before_the_stop_string(llm):
    text = llm.invoke(PROMPTS[0])
    stop = stop_string(text)
    got = llm.invoke(PROMPTS[0], stop=[stop, "never-in-the-text-zz"])
    assert got == text[:text.index(stop)]
    assert stop not in got


def test_llm_stream_concatenates_to_the_answer(llm):
    text = llm.invoke(PROMPTS[1])
    chunks = list(llm.stream(PROMPTS[1]))
    assert len(chunks) >= 1
    assert "".join(chunks) == text


# --------------------------------------------------------------------------- ChatOpenAI


def test_chat_invoke(chat):
    msg = chat.invoke(QUESTION)
    assert isinstance(msg.content, str) and msg.content.strip()
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    usage = msg.usage_metadata
    assert usage["output_tokens"] >= 1 and usage["input_tokens"] >= 1
    # deterministic: the same answer again, and with a list of messages
    from langchain_core.messages import HumanMessage

    assert chat.invoke([HumanMessage(QUESTION)]).content == msg.content


def test_chat_batch_answers_each_prompt_as_alone(chat):
    questions = [QUESTION, 'What does "light" mean?', "Who was Elizabeth?"]
    alone = [chat.invoke(q).content for q in questions]
    assert [m.content for m in chat.batch(questions)] == alone
    # concurrency as LangChain would use it against a real server
    assert [m.content for m in chat.batch(questions, config={"max_concurrency": 3})] == alone


def test_chat_stop_ends_the_answer_before_the_stop_string(chat):
    text = chat.invoke(QUESTION).content
    stop = stop_string(text)
    got = chat.invoke(QUESTION, stop=[stop])
    assert got.content == text[:text.index(stop)]
    assert got.response_metadata["finish_reason"] == "stop"


def test_chat_stream_concatenates_to_the_answer(chat):
    text = chat.invoke(QUESTION).content
    chunks = list(chat.stream(QUESTION))
    assert len(chunks) >= 2  # one event per denoising step, then the last with finish_reason
    assert "".join(c.content for c in chunks) == text
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == text
    assert total.response_metadata.get("finish_reason") in ("stop", "length")


def test_chat_stream_with_stop_never_sends_the_stop_string(chat):
    text = chat.invoke(QUESTION).content
    stop = stop_string(text)
    streamed = "".join(c.content for c in chat.stream(QUESTION, stop=[stop]))
    assert streamed == text[:text.index(stop)]
