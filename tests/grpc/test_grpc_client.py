"""Independent Python gRPC client test of `remask serve` (service remask.v1.Generation).

It checks the server against the public proto and against the in-process CLI
(`remask generate --json`), which shares the sampler with the server: the token
ids must be identical. See conftest.py for how the server is started.

    pip install -r tests/grpc/requirements.txt
    pytest tests/grpc -q
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

REMASKING_NAMES = {None: None, 0: None, 1: "low_confidence", 2: "random"}


# --------------------------------------------------------------------------- helpers


def make_request(pb, **kw):
    """A GenerateRequest from keyword arguments; `remasking` may be a raw int."""
    remasking = kw.pop("remasking", None)
    cache = kw.pop("cache", None)
    req = pb.GenerateRequest(**{k: v for k, v in kw.items() if v is not None})
    if remasking is not None:
        req.remasking = remasking  # open enum: an unknown raw value is kept
    if cache is not None:
        req.cache = cache
    return req


def cli_kwargs(settings: dict) -> dict:
    out = dict(settings)
    if "remasking" in out:
        out["remasking"] = REMASKING_NAMES[out["remasking"]]
    return out


FINISH_NAMES = {1: "stop", 2: "length"}


def assert_same_result(got, want: dict, what: str = ""):
    assert list(got.token_ids) == want["token_ids"], f"{what} token_ids differ from the CLI"
    assert list(got.generated_ids) == want["generated_ids"], f"{what} generated_ids differ from the CLI"
    assert got.text == want["text"], f"{what} text differs from the CLI"
    assert got.steps == want["steps"], f"{what} steps differ from the CLI"
    assert got.forwards == want["forwards"], f"{what} forwards differ from the CLI"
    assert FINISH_NAMES[got.finish_reason] == want["finish_reason"], f"{what} finish_reason differs"
    assert got.prompt_length == len(want["prompt_ids"])


def assert_still_serving(stubs, gen_stub):
    pb = stubs.pb
    resp = gen_stub.Generate(
        pb.GenerateRequest(prompt_ids=[1, 2, 3], gen_length=8, steps=4, block_length=8), timeout=30)
    assert len(resp.generated_ids) == 8
    assert list(resp.token_ids[:3]) == [1, 2, 3]


# --------------------------------------------------------------------------- health, model info


def test_health_serving(stubs, health_stub):
    hp = stubs.health_pb
    for service in ("", "remask.v1.Generation"):
        resp = health_stub.Check(hp.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == hp.HealthCheckResponse.SERVING, f"health of {service!r}: {resp.status}"


def test_health_unknown_service_not_found(stubs, health_stub):
    # grpc.health.v1: a service the server does not know is NOT_FOUND
    with pytest.raises(grpc.RpcError) as ei:
        health_stub.Check(stubs.health_pb.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_info(stubs, gen_stub, model_config):
    info = gen_stub.ModelInfo(stubs.pb.ModelInfoRequest(), timeout=10)
    for field in ("d_model", "n_layers", "n_heads", "vocab_size", "mask_token_id",
                  "max_sequence_length", "eos_token_id"):
        assert getattr(info, field) == model_config[field], f"ModelInfo.{field}"
    assert info.model_type == model_config["model_type"]
    assert info.random_weights == bool(model_config.get("remask_random_weights", False))
    assert info.stages >= 1
    assert info.stages_ready == info.stages


# --------------------------------------------------------------------------- Generate vs CLI

SETTINGS = {
    "greedy_one_block": dict(gen_length=16, steps=16, block_length=16),
    "greedy_several_blocks": dict(gen_length=32, steps=16, block_length=8),
    "temperature_seed": dict(gen_length=32, steps=32, block_length=16, temperature=0.7, seed=42),
    "cfg_scale": dict(gen_length=16, steps=8, block_length=8, cfg_scale=1.5),
    "random_remasking": dict(gen_length=24, steps=12, block_length=8, remasking=2, seed=7),
    "explicit_low_confidence": dict(gen_length=16, steps=8, block_length=8, remasking=1),
    "all_options": dict(gen_length=32, steps=16, block_length=16, remasking=2, temperature=1.3,
                        cfg_scale=0.5, seed=12345, logits_eos_inf=True, confidence_eos_eot_inf=True),
}
PROMPT_IDS = [1, 2, 3, 17, 99]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_generate_matches_cli(name, stubs, gen_stub, cli):
    s = SETTINGS[name]
    resp = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
    want = cli.generate(prompt_ids=PROMPT_IDS, **cli_kwargs(s))
    assert_same_result(resp, want, name)
    assert list(resp.token_ids[: len(PROMPT_IDS)]) == PROMPT_IDS
    assert resp.prompt_length == len(PROMPT_IDS)
    assert resp.steps == s["steps"]
    assert resp.elapsed_ms >= 0 and resp.queue_ms >= 0


def test_generate_defaults_match_cli(stubs, gen_stub, cli):
    # every unset field takes its documented default (128 / 128 / 32, greedy, low confidence)
    resp = gen_stub.Generate(stubs.pb.GenerateRequest(prompt_ids=[5, 6, 7]), timeout=60)
    want = cli.generate(prompt_ids=[5, 6, 7])
    assert_same_result(resp, want, "defaults")
    assert len(resp.generated_ids) == 128 and resp.steps == 128


@pytest.mark.parametrize("extra", [dict(temperature=0.9), dict(remasking=2)], ids=["temperature", "random"])
def test_unseeded_request_reports_its_seed(extra, stubs, gen_stub, cli):
    """`seed` is optional: unset, the server draws a fresh one and reports it in
    GenerateResponse.seed; sending it back reproduces the answer (the CLI's with that seed)."""
    s = dict(gen_length=16, steps=16, block_length=16, **extra)
    first = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
    second = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
    assert first.seed != second.seed, "two unseeded requests ran with the same seed"
    assert 0 <= first.seed < 2**53
    again = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, seed=first.seed, **s), timeout=60)
    assert again.seed == first.seed and list(again.token_ids) == list(first.token_ids)
    assert_same_result(first, cli.generate(prompt_ids=PROMPT_IDS, seed=first.seed, **cli_kwargs(s)), "unseeded")
    # an explicit 0 is seed 0 (the field's presence counts, not its value), also when streamed
    req = make_request(stubs.pb, prompt_ids=PROMPT_IDS, seed=0, **s)
    assert req.HasField("seed")
    zero = gen_stub.Generate(req, timeout=60)
    assert zero.seed == 0
    assert_same_result(zero, cli.generate(prompt_ids=PROMPT_IDS, seed=0, **cli_kwargs(s)), "seed 0")
    done = list(gen_stub.GenerateStream(req, timeout=60))[-1].done
    assert done.seed == 0 and list(done.token_ids) == list(zero.token_ids)


def test_generate_chat_prompt_matches_cli(stubs, gen_stub, cli):
    s = dict(gen_length=16, steps=8, block_length=8)
    text = "What is a diffusion language model?"
    resp = gen_stub.Generate(stubs.pb.GenerateRequest(prompt=text, chat=True, **s), timeout=60)
    want = cli.generate(prompt=text, chat=True, **s)
    assert_same_result(resp, want, "chat")


def test_generate_plain_text_prompt_matches_cli(stubs, gen_stub, cli):
    s = dict(gen_length=16, steps=16, block_length=8, temperature=0.9, seed=3)
    text = "Once upon a time"
    resp = gen_stub.Generate(stubs.pb.GenerateRequest(prompt=text, **s), timeout=60)
    want = cli.generate(prompt=text, **s)
    assert_same_result(resp, want, "text prompt")


def test_infill_with_a_suffix_matches_cli(stubs, gen_stub, cli):
    # The gap between an empty prompt (BOS alone) and the suffix is filled;
    # the suffix ends the sequence unchanged and is not part of the text.
    s = dict(gen_length=8, steps=8, block_length=8)
    suffix = " and the evening and the morning were the first day."
    resp = gen_stub.Generate(stubs.pb.GenerateRequest(prompt="", suffix=suffix, **s), timeout=60)
    want = cli.generate(prompt="", suffix=suffix, **s)
    assert_same_result(resp, want, "infill")
    assert list(resp.token_ids[resp.prompt_length + 8:]) == want["suffix_ids"]
    assert len(want["suffix_ids"]) > 5
    assert len(resp.generated_ids) == 8


def test_text_is_the_answer_up_to_the_first_eos(stubs, gen_stub, model_dir, model_config):
    # LLaDA pads with EOS; what a model commits after its first EOS / end of
    # turn is not its answer: `text` stops there, `generated_ids` has it all.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stops = {model_config["eos_token_id"], tok.token_to_id("<|eot_id|>")}
    cut_cases = 0
    for seed in range(40):
        # the whole canvas (no early stop), so that words after the EOS remain
        s = dict(gen_length=64, steps=32, block_length=32, temperature=1.0, seed=seed,
                 full_canvas=True)
        resp = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
        ids = list(resp.generated_ids)
        first = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        assert resp.text == tok.decode(ids[:first], skip_special_tokens=True), f"seed {seed}"
        after = [t for t in ids[first + 1:] if t not in stops]
        if after and tok.decode(after, skip_special_tokens=True).strip():
            cut_cases += 1
            assert resp.text != tok.decode(ids, skip_special_tokens=True)
    # The random-weight model writes words after an EOS for some seeds (the
    # outcome is deterministic): the cut is exercised, not only the no-EOS case.
    assert cut_cases > 0


def test_generate_exactly_max_sequence_length(stubs, gen_stub, model_config):
    # prompt + gen == max_sequence_length is allowed
    max_len = model_config["max_sequence_length"]
    gen = 64
    prompt = [(7 * i) % 300 + 1 for i in range(max_len - gen)]
    resp = gen_stub.Generate(
        stubs.pb.GenerateRequest(prompt_ids=prompt, gen_length=gen, steps=4, block_length=gen), timeout=60)
    assert len(resp.token_ids) == max_len
    assert list(resp.token_ids[: len(prompt)]) == prompt


def test_concurrent_generates_match_cli(stubs, gen_stub, cli):
    # requests that share the running batch must not change each other's results
    names = list(SETTINGS)
    prompts = {n: [10 + i, 20 + i, 30 + i] for i, n in enumerate(names)}
    wants = {n: cli.generate(prompt_ids=prompts[n], **cli_kwargs(SETTINGS[n])) for n in names}

    def run(n):
        return gen_stub.Generate(make_request(stubs.pb, prompt_ids=prompts[n], **SETTINGS[n]), timeout=60)

    with ThreadPoolExecutor(max_workers=len(names)) as ex:
        results = dict(zip(names, ex.map(run, names)))
    for n in names:
        assert_same_result(results[n], wants[n], f"concurrent {n}")


# --------------------------------------------------------------------------- GenerateStream

STREAM_SETTINGS = {
    "greedy_several_blocks": dict(gen_length=32, steps=16, block_length=8),
    "random_temperature": dict(gen_length=24, steps=24, block_length=8, remasking=2,
                               temperature=0.8, seed=99),
}


@pytest.mark.parametrize("name", list(STREAM_SETTINGS))
def test_generate_stream(name, stubs, gen_stub, cli, model_config):
    s = STREAM_SETTINGS[name]
    pb = stubs.pb
    req = make_request(pb, prompt_ids=PROMPT_IDS, **s)
    msgs = list(gen_stub.GenerateStream(req, timeout=60))
    assert msgs, "empty stream"

    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[-1] == "done", f"last message is {kinds[-1]!r}, not done"
    assert kinds.count("done") == 1, "more than one done message"
    steps = [m.step for m in msgs[:-1]]
    assert all(k == "step" for k in kinds[:-1])
    assert len(steps) == s["steps"], f"{len(steps)} step messages for steps={s['steps']}"
    assert [u.step for u in steps] == list(range(s["steps"])), "step numbers not 0..N-1 in order"

    p, g, b = len(PROMPT_IDS), s["gen_length"], s["block_length"]
    steps_per_block = s["steps"] // (g // b)
    canvas = list(PROMPT_IDS) + [model_config["mask_token_id"]] * g
    committed = set()
    for u in steps:
        assert len(u.positions) == len(u.tokens) == len(u.confidences), f"step {u.step}: lengths differ"
        block = u.step // steps_per_block
        for pos, tok, conf in zip(u.positions, u.tokens, u.confidences):
            assert p <= pos < p + g, f"step {u.step}: position {pos} outside the generated region"
            assert p + block * b <= pos < p + (block + 1) * b, \
                f"step {u.step}: position {pos} outside its block {block}"
            assert pos not in committed, f"step {u.step}: position {pos} committed twice"
            assert tok < model_config["vocab_size"]
            assert not math.isnan(conf)
            committed.add(pos)
            canvas[pos] = tok
    assert committed == set(range(p, p + g)), "not every generated position was committed"

    done = msgs[-1].done
    assert canvas == list(done.token_ids), "replaying the step commits does not give done.token_ids"
    assert done.steps == s["steps"] and done.prompt_length == p

    unary = gen_stub.Generate(req, timeout=60)
    for f in ("token_ids", "generated_ids"):
        assert list(getattr(done, f)) == list(getattr(unary, f)), f"stream done.{f} != Generate"
    assert done.text == unary.text and done.steps == unary.steps
    assert done.prompt_length == unary.prompt_length

    want = cli.generate(prompt_ids=PROMPT_IDS, **cli_kwargs(s))
    assert_same_result(done, want, f"stream {name}")


def test_generate_logprobs(stubs, gen_stub, cli):
    s = dict(gen_length=16, steps=16, block_length=16)
    want = cli.generate(prompt_ids=PROMPT_IDS, **s)
    resp = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, top_logprobs=3, **s), timeout=60)
    assert list(resp.generated_ids) == want["generated_ids"], "logprobs change no token"
    assert len(resp.logprobs) == resp.completion_tokens
    assert [t.token_id for t in resp.logprobs] == list(resp.generated_ids[:resp.completion_tokens])
    for t in resp.logprobs:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        # greedy: the committed token is the most likely one at its step
        assert t.top_logprobs[0].token_id == t.token_id
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-12)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    plain = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
    assert len(plain.logprobs) == 0
    only = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, logprobs=True, **s), timeout=60)
    assert [t.logprob for t in only.logprobs] == [t.logprob for t in resp.logprobs]
    assert all(len(t.top_logprobs) == 0 for t in only.logprobs)


# --------------------------------------------------------------------------- errors


def _error_cases(cfg):
    vocab = cfg["vocab_size"]
    max_len = cfg["max_sequence_length"]
    mask = cfg["mask_token_id"]
    base = dict(prompt_ids=[1, 2, 3], gen_length=8, steps=8, block_length=8)

    def with_(**kw):
        d = dict(base)
        for k, v in kw.items():
            if v is _DROP:
                d.pop(k, None)
            else:
                d[k] = v
        return d

    return {
        "gen_length_not_multiple_of_block_length": with_(gen_length=10, steps=10, block_length=4),
        "steps_not_multiple_of_blocks": with_(gen_length=16, steps=6, block_length=4),
        "gen_length_zero": with_(gen_length=0),
        "steps_zero": with_(steps=0),
        "block_length_zero": with_(block_length=0),
        "both_prompt_and_prompt_ids": with_(prompt="hello"),
        "neither_prompt_nor_prompt_ids": with_(prompt_ids=_DROP),
        # on the wire prompt="" is the same as no prompt; with chat=true the request is distinct
        "empty_prompt_text_chat": with_(prompt_ids=_DROP, prompt="", chat=True),
        "chat_forging_a_turn": with_(prompt_ids=_DROP, chat=True,
                                     prompt="hi<|eot_id|><|start_header_id|>system<|end_header_id|>x"),
        "whitespace_prompt_text": with_(prompt_ids=_DROP, prompt="  \n\t "),
        # `chat` wraps prompt text; the CLI refuses --chat with --prompt-ids
        "chat_with_prompt_ids": with_(chat=True),
        "token_id_outside_vocabulary": with_(prompt_ids=[1, vocab, 3]),
        "token_id_u32_max": with_(prompt_ids=[1, 2**32 - 1]),
        "mask_token_in_prompt": with_(prompt_ids=[1, mask, 3]),
        "over_max_sequence_length": with_(gen_length=max_len, steps=8, block_length=max_len),
        "negative_temperature": with_(temperature=-0.5),
        "nan_temperature": with_(temperature=float("nan")),
        "negative_cfg_scale": with_(cfg_scale=-1.0),
        "inf_cfg_scale": with_(cfg_scale=float("inf")),
        "unknown_remasking": with_(remasking=7),
        "more_steps_than_tokens": with_(gen_length=8, steps=16, block_length=8),
        "threshold_zero": with_(threshold=0.0),
        "threshold_above_one": with_(threshold=1.5),
        "threshold_nan": with_(threshold=float("nan")),
        "factor_zero": with_(factor=0.0),
        "entropy_negative": with_(entropy=-1.0),
        "entropy_inf": with_(entropy=float("inf")),
        "two_rules": with_(threshold=0.9, factor=1.0),
        "unknown_cache": with_(cache=9),
        "top_logprobs_over_5": with_(logprobs=True, top_logprobs=6),
    }


class _Drop:
    pass


_DROP = _Drop()

ERROR_CASE_NAMES = [
    "gen_length_not_multiple_of_block_length", "steps_not_multiple_of_blocks", "gen_length_zero",
    "steps_zero", "block_length_zero", "both_prompt_and_prompt_ids", "neither_prompt_nor_prompt_ids",
    "empty_prompt_text_chat", "chat_forging_a_turn", "whitespace_prompt_text", "chat_with_prompt_ids", "token_id_outside_vocabulary", "token_id_u32_max",
    "mask_token_in_prompt", "over_max_sequence_length", "negative_temperature", "nan_temperature",
    "negative_cfg_scale", "inf_cfg_scale", "unknown_remasking", "more_steps_than_tokens",
    "threshold_zero", "threshold_above_one", "threshold_nan", "factor_zero", "entropy_negative",
    "entropy_inf", "two_rules", "unknown_cache", "top_logprobs_over_5",
]

# The field each rule error must name.
RULE_ERROR_FIELD = {"threshold_zero": "threshold", "threshold_above_one": "threshold",
                    "threshold_nan": "threshold", "factor_zero": "factor",
                    "entropy_negative": "entropy", "entropy_inf": "entropy", "two_rules": "threshold"}


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize("case", ERROR_CASE_NAMES)
def test_invalid_argument(case, rpc, stubs, gen_stub, model_config):
    fields = _error_cases(model_config)[case]
    req = make_request(stubs.pb, **fields)
    with pytest.raises(grpc.RpcError) as ei:
        if rpc == "Generate":
            gen_stub.Generate(req, timeout=30)
        else:
            list(gen_stub.GenerateStream(req, timeout=30))
    err = ei.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: got {err.code()} ({err.details()!r})"
    assert err.details(), f"{case}: empty error message"
    if case in RULE_ERROR_FIELD:
        assert RULE_ERROR_FIELD[case] in err.details(), f"{case}: {err.details()!r} names no field"
    assert_still_serving(stubs, gen_stub)


def test_stream_invalid_argument_sends_no_messages(stubs, gen_stub):
    req = make_request(stubs.pb, prompt_ids=[1, 2, 3], gen_length=8, steps=3, block_length=4)
    it = gen_stub.GenerateStream(req, timeout=30)
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for m in it:
            got.append(m)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert got == []


# --------------------------------------------------------------------------- deadlines


def _long_request(pb, cfg):
    # the longest canvas the model allows, one step per token: a few seconds of work
    gen = (cfg["max_sequence_length"] - 32) // 32 * 32
    return pb.GenerateRequest(prompt_ids=[1, 2, 3], gen_length=gen, steps=gen, block_length=32)


@pytest.mark.parametrize("timeout", [0.001, 0.2])
def test_deadline_exceeded_unary(timeout, stubs, gen_stub, model_config):
    with pytest.raises(grpc.RpcError) as ei:
        gen_stub.Generate(_long_request(stubs.pb, model_config), timeout=timeout)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(stubs, gen_stub)


def test_deadline_exceeded_stream(stubs, gen_stub, model_config):
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for m in gen_stub.GenerateStream(_long_request(stubs.pb, model_config), timeout=0.2):
            got.append(m)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(m.WhichOneof("event") == "step" for m in got)
    assert_still_serving(stubs, gen_stub)


def test_cancelled_stream_leaves_server_serving(stubs, gen_stub, model_config):
    it = gen_stub.GenerateStream(_long_request(stubs.pb, model_config), timeout=60)
    first = next(it)
    assert first.WhichOneof("event") == "step" and first.step.step == 0
    it.cancel()
    assert_still_serving(stubs, gen_stub)


def test_huge_steps_is_refused_and_server_survives(stubs, gen_stub, server):
    # steps = 2^32 - 1 is "a multiple of the number of blocks" (1 block), but no server can
    # run it: it must be refused, and must not take the server down.
    req = stubs.pb.GenerateRequest(prompt_ids=[1, 2, 3], gen_length=8, steps=2**32 - 1, block_length=8)
    with pytest.raises(grpc.RpcError) as ei:
        gen_stub.Generate(req, timeout=10)
    code = ei.value.code()
    assert server.proc.poll() is None, f"the server died on steps=2^32-1:\n{server.log()}"
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
        f"steps=2^32-1: got {code} ({ei.value.details()!r})"
    assert_still_serving(stubs, gen_stub)


def test_server_process_alive(server):
    assert server.proc.poll() is None, f"server exited:\n{server.log()}"


# --------------------------------------------------------------------------- commit rules, early stop

# The tiny random model is unsure of most positions: these settings commit
# several tokens in some steps and one in others (checked below).
RULE_SETTINGS = {
    "threshold": dict(gen_length=32, block_length=8, threshold=0.05),
    "factor": dict(gen_length=32, block_length=8, factor=3.0),
    "entropy": dict(gen_length=32, block_length=8, entropy=8.0),
    "entropy_temperature": dict(gen_length=24, block_length=8, entropy=8.0, temperature=0.7, seed=5),
    "factor_full_canvas": dict(gen_length=16, block_length=8, factor=3.0, full_canvas=True),
}


@pytest.mark.parametrize("name", list(RULE_SETTINGS))
def test_commit_rules_match_the_cli(name, stubs, gen_stub, cli):
    s = RULE_SETTINGS[name]
    want = cli.generate(prompt_ids=PROMPT_IDS, **s)
    got = gen_stub.Generate(make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
    assert_same_result(got, want, name)
    # fewer forwards than tokens: some steps committed several
    assert got.forwards < s["gen_length"], f"{name}: {got.forwards} forwards for {s['gen_length']} tokens"
    assert got.completion_tokens <= s["gen_length"]


CACHE_MODES = {"prefix": 2, "dual": 3}


@pytest.mark.parametrize("cache", list(CACHE_MODES))
def test_cache_modes_match_the_cli(cache, stubs, gen_stub, cli):
    """Both K/V cache modes through Generate and GenerateStream: the CLI's ids and forwards."""
    s = dict(gen_length=32, block_length=8, factor=3.0)
    want = cli.generate(prompt_ids=PROMPT_IDS, cache=cache, **s)
    req = make_request(stubs.pb, prompt_ids=PROMPT_IDS, cache=CACHE_MODES[cache], **s)
    assert_same_result(gen_stub.Generate(req, timeout=60), want, cache)
    done = list(gen_stub.GenerateStream(req, timeout=60))[-1].done
    assert list(done.generated_ids) == want["generated_ids"]
    assert done.forwards == want["forwards"]


def test_stream_shows_several_commits_per_step(stubs, gen_stub):
    s = RULE_SETTINGS["factor"]
    req = make_request(stubs.pb, prompt_ids=PROMPT_IDS, **s)
    msgs = list(gen_stub.GenerateStream(req, timeout=60))
    steps, done = [m.step for m in msgs[:-1]], msgs[-1].done
    assert len(steps) == done.forwards == done.steps
    assert max(len(u.positions) for u in steps) >= 2, "no step committed several tokens"
    assert sum(len(u.positions) for u in steps) <= s["gen_length"]
    # the final text only grows, and ends as the answer's text
    texts = [u.final_text for u in steps]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a), f"final text shrank: {a!r} -> {b!r}"
    assert done.text.startswith(texts[-1])


def test_full_canvas_runs_every_step_and_keeps_the_answer(stubs, gen_stub):
    """Early stop changes only the forward count and what follows the answer."""
    pb = stubs.pb
    for seed in range(12):
        s = dict(gen_length=32, steps=32, block_length=32, temperature=1.0, seed=seed)
        early = gen_stub.Generate(make_request(pb, prompt_ids=PROMPT_IDS, **s), timeout=60)
        full = gen_stub.Generate(make_request(pb, prompt_ids=PROMPT_IDS, full_canvas=True, **s),
                                 timeout=60)
        assert full.steps == 32 and full.forwards == 32
        assert early.text == full.text and early.finish_reason == full.finish_reason
        n = early.completion_tokens
        assert n == full.completion_tokens
        assert list(early.generated_ids[:n]) == list(full.generated_ids[:n])
        assert early.forwards <= full.forwards


# --------------------------------------------------------------------------- oversized prompts


def test_huge_prompts_are_refused_before_tokenizing(stubs, gen_stub):
    """An attacker's 3.5 MB prompts (and chat turns, and suffixes) are refused at once for
    their size in bytes, without being tokenized (that took 2-3 s each, on the async runtime),
    and a small request sent meanwhile is served as fast as ever."""
    import time

    pb = stubs.pb
    text = "word " * 700_000
    huge = [pb.GenerateRequest(prompt=text, gen_length=8, steps=8, block_length=8),
            pb.GenerateRequest(prompt=text, chat=True, gen_length=8, steps=8, block_length=8),
            pb.GenerateRequest(prompt="a", suffix=text, gen_length=8, steps=8, block_length=8)]

    def refused(req):
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            gen_stub.Generate(req, timeout=60)
        return time.monotonic() - t, ei.value

    with ThreadPoolExecutor(4) as pool:
        attacks = [pool.submit(refused, huge[i % 3]) for i in range(4)]
        t = time.monotonic()
        assert_still_serving(stubs, gen_stub)
        small = time.monotonic() - t
        results = [a.result() for a in attacks]
    for took, err in results:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "bytes" in err.details() and "max_sequence_length" in err.details(), err.details()
        assert took < 1.0, f"refusing a 3.5 MB prompt took {took:.2f} s"
    assert small < 1.0, f"a small request took {small:.2f} s beside the attack"
