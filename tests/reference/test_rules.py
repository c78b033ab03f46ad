"""remask's adaptive commit rules (--threshold, --factor, --entropy) and exact early stop,
against the independent numpy reference (llada_ref.generate with rule=..., early_stop=...).

Every comparison checks the ids AND the number of forwards, and that the reference took no
near-tie decision (argmax, rank order, threshold or entropy-sum margins > MARGIN). The rule
values are chosen for the tiny random checkpoints (f32 seed 11, bf16 seed 12: the f32 one is
unsure, median top probability ~0.3, entropy ~3 nats; the bf16 one is sure, ~0.7 and ~1 nat),
so that most steps commit several tokens; each case asserts that it does
(forwards <= gen / 2 and some step commits >= 3), since a run that commits one token per step
would not tell the rules apart.
"""

import json
import math
import subprocess

import pytest

from test_reference import (  # noqa: F401  (checkpoint is a fixture)
    BIN, ENV, MARGIN, chat_prompt_ids, checkpoint, eot_id, ids_arg, random_prompt, ref, remask)

RULE_FLAG = {"threshold": "--threshold", "factor": "--factor", "entropy": "--entropy"}

# Each case: checkpoint, prompt (ids from (length, seed) or chat text), geometry, rule and value,
# sampler options. "uneven": some block's steps commit different numbers of tokens (at least
# three distinct per-step counts over the run). "steps": passed to remask (ignored by the rule).
CASES = {
    "threshold_f32": dict(ckpt="f32", prompt=(7, 24), gen=32, block=16, rule="threshold",
                          value=0.2, uneven=True),
    "threshold_bf16": dict(ckpt="bf16", prompt=(7, 22), gen=24, block=8, rule="threshold",
                           value=0.5, uneven=True),
    "factor_f32": dict(ckpt="f32", prompt=(7, 23), gen=24, block=8, rule="factor", value=3.0,
                       uneven=True),
    "factor_bf16": dict(ckpt="bf16", prompt=(6, 24), gen=32, block=8, rule="factor", value=2.0,
                        uneven=True),
    "entropy_f32": dict(ckpt="f32", prompt=(7, 25), gen=24, block=8, rule="entropy", value=8.0,
                        uneven=True),
    "entropy_bf16": dict(ckpt="bf16", prompt=(7, 26), gen=32, block=8, rule="entropy",
                         value=3.0, uneven=True),
    "factor_one_long_block": dict(ckpt="f32", prompt=(5, 27), gen=32, block=32, rule="factor",
                                  value=4.0, uneven=True),
    "prompt_len1_threshold": dict(ckpt="bf16", prompt=(1, 28), gen=16, block=8,
                                  rule="threshold", value=0.5),
    "prompt_len1_entropy": dict(ckpt="f32", prompt=(1, 29), gen=16, block=8, rule="entropy",
                                value=8.0),
    "chat_entropy": dict(ckpt="f32", chat="What is the capital of France?", gen=16, block=8,
                         rule="entropy", value=8.0),
    "chat_factor": dict(ckpt="bf16", chat="Name three colours.", gen=16, block=8,
                        rule="factor", value=2.0),
    "steps_ignored": dict(ckpt="bf16", prompt=(6, 30), gen=24, block=8, rule="entropy",
                          value=3.0, steps=3),
    "temperature_threshold": dict(ckpt="bf16", prompt=(8, 32), gen=24, block=8,
                                  rule="threshold", value=0.35, temperature=0.8, seed=42),
    "temperature_entropy": dict(ckpt="f32", prompt=(8, 32), gen=24, block=8, rule="entropy",
                                value=8.0, temperature=0.7, seed=5),
    "cfg_factor": dict(ckpt="f32", prompt=(8, 33), gen=24, block=8, rule="factor", value=3.0,
                       cfg_scale=1.5),
    "temp_cfg_random_threshold": dict(ckpt="f32", prompt=(5, 34), gen=24, block=8,
                                      rule="threshold", value=0.5, temperature=1.0,
                                      cfg_scale=0.5, remasking="random", seed=3),
    "random_factor": dict(ckpt="bf16", prompt=(6, 35), gen=24, block=8, rule="factor",
                          value=3.0, remasking="random", seed=9),
    # On the "+eos" checkpoint, with the prompt searched (reference alone) for one where the
    # flag changes the output: -inf confidence / +inf entropy for a proposed EOS or EoT.
    "confidence_eos_eot_inf_entropy": dict(ckpt="f32+eos", prompt=(7, 36), gen=24, block=8,
                                           rule="entropy", value=8.0,
                                           confidence_eos_eot_inf=True,
                                           search="confidence_eos_eot_inf"),
    "logits_eos_inf_factor": dict(ckpt="f32+eos", prompt=(7, 37), gen=24, block=8,
                                  rule="factor", value=3.0, logits_eos_inf=True,
                                  search="logits_eos_inf"),
}
SEARCH_TRIES = 12


def sampler_opts(case):
    return dict(temperature=case.get("temperature", 0.0), cfg_scale=case.get("cfg_scale", 0.0),
                remasking=case.get("remasking", "low_confidence"), seed=case.get("seed", 0),
                logits_eos_inf=case.get("logits_eos_inf", False),
                confidence_eos_eot_inf=case.get("confidence_eos_eot_inf", False))


def ref_run(m, eot, case, prompt, early_stop, **over):
    opts = dict(sampler_opts(case), **over)
    return ref.generate(m, prompt, case["gen"], case.get("steps"), case["block"], eot_id=eot,
                        rule=case["rule"], rule_value=case.get("value"), early_stop=early_stop,
                        **opts)


def cli_args(c, case, prompt, early_stop=True):
    args = ["generate", "--model", c.dir, "--gen-length", case["gen"],
            "--block-length", case["block"], "--json"]
    if "chat" in case:
        args += ["--prompt", case["chat"], "--chat"]
    else:
        args += ["--prompt-ids", ids_arg(prompt)]
    if case["rule"] == "fixed":
        args += ["--steps", case["steps"]]
    else:
        args += [RULE_FLAG[case["rule"]], repr(float(case["value"]))]
        if "steps" in case:
            args += ["--steps", case["steps"]]
    o = sampler_opts(case)
    if o["temperature"]:
        args += ["--temperature", o["temperature"]]
    if o["cfg_scale"]:
        args += ["--cfg-scale", o["cfg_scale"]]
    args += ["--remasking", o["remasking"], "--seed", o["seed"]]
    if o["logits_eos_inf"]:
        args.append("--logits-eos-inf")
    if o["confidence_eos_eot_inf"]:
        args.append("--confidence-eos-eot-inf")
    if not early_stop:
        args.append("--no-early-stop")
    return args


def case_prompt(c, case):
    """The prompt ids of a case; for a "search" case the first seed (of SEARCH_TRIES) where the
    flag changes the reference's output with no near-tie decision."""
    m = c.model
    if "chat" in case:
        return chat_prompt_ids(c, case["chat"])
    n, seed0 = case["prompt"]
    if "search" not in case:
        return random_prompt(m, n, seed0)
    eot = eot_id(c)
    for j in range(SEARCH_TRIES):
        prompt = random_prompt(m, n, seed0 + 100 * j)
        on, d_on = ref_run(m, eot, case, prompt, True)
        off, _ = ref_run(m, eot, case, prompt, True, **{case["search"]: False})
        if (on != off).any() and ref.min_margin(d_on) > MARGIN:
            return prompt
    pytest.fail(f"no prompt among {SEARCH_TRIES} seeds where {case['search']} changes the "
                f"reference output")


def assert_busy(diag, gen, name):
    """Most steps commit several tokens."""
    per = diag["per_step"]
    assert diag["forwards"] == len(per) and sum(per) <= gen
    assert diag["forwards"] <= gen // 2, f"{name}: {diag['forwards']} forwards for {gen}: {per}"
    assert max(per) >= 3, f"{name}: no step commits 3 or more: {per}"
    assert 2 * sum(k >= 2 for k in per) >= len(per), f"{name}: most steps commit one: {per}"


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_reference(checkpoint, name):
    case = CASES[name]
    c = checkpoint(case["ckpt"])
    m, eot = c.model, eot_id(c)
    prompt = case_prompt(c, case)
    P, gen = len(prompt), case["gen"]
    out = json.loads(remask(*cli_args(c, case, prompt)))
    # remask stops early by default: the reference with early_stop=True is the same run
    want, diag = ref_run(m, eot, case, prompt, True)
    got = out["token_ids"]
    assert got[:P] == prompt, "prompt part of token_ids differs from the independent encoding"
    assert out["generated_ids"] == got[P:]
    assert got == want.tolist(), (
        f"{name}: remask and reference disagree\nremask:    {got[P:]}\n"
        f"reference: {want[P:].tolist()}\nreference per-step commits: {diag['per_step']}")
    assert out["forwards"] == diag["forwards"], (
        f"{name}: forwards remask {out['forwards']}, reference {diag['forwards']} "
        f"(per step {diag['per_step']})")
    assert out["steps"] == diag["steps"] == diag["forwards"], (out["steps"], diag["steps"])
    assert out["finish_reason"] == diag["finish_reason"]
    assert m.mask_token_id not in got[P:], "a mask token was left in the generation"
    assert ref.min_margin(diag) > MARGIN, diag
    assert_busy(diag, gen, name)
    if case.get("uneven"):
        assert len(set(diag["per_step"])) >= 3, f"{name}: even fill {diag['per_step']}"


# ------------------------------------------------------------------------------- early stop

# Run on the "+eos" checkpoint (whose EOS/EoT rows compete): the prompt is searched (by the
# reference alone, from the case's seed) for one where early stop ends the run with a non-empty
# answer and fewer forwards, and no near-tie decision in either run. "wait": also one where a
# stop token was committed while a mask still came before it, so that early stop had to go on.
EARLY_STOP_CASES = {
    "fixed": dict(ckpt="f32+eos", prompt=(6, 141), gen=32, block=8, rule="fixed", steps=16,
                  wait=True),
    "threshold": dict(ckpt="f32+eos", prompt=(6, 42), gen=32, block=8, rule="threshold",
                      value=0.3, wait=True),
    "factor": dict(ckpt="f32+eos", prompt=(6, 43), gen=32, block=8, rule="factor", value=3.0,
                   wait=True),
    "entropy": dict(ckpt="f32+eos", prompt=(6, 44), gen=32, block=8, rule="entropy",
                    value=8.0),
    "entropy_temperature": dict(ckpt="f32+eos", prompt=(6, 145), gen=32, block=8,
                                rule="entropy", value=8.0, temperature=0.5, seed=17),
}


def early_stop_prompt(c, case):
    m, eot = c.model, eot_id(c)
    n, seed0 = case["prompt"]
    for j in range(SEARCH_TRIES):
        prompt = random_prompt(m, n, seed0 + 100 * j)
        on, d_on = ref_run(m, eot, case, prompt, True)
        off, d_off = ref_run(m, eot, case, prompt, False)
        s = d_on["stopped_at"]
        if (s is not None and 1 <= s < case["gen"] - 1 and d_on["forwards"] < d_off["forwards"]
                and (d_on["stop_waits"] > 0 or not case.get("wait"))
                and min(ref.min_margin(d_on), ref.min_margin(d_off)) > MARGIN):
            return prompt, (on, d_on), (off, d_off)
    pytest.fail(f"no prompt among {SEARCH_TRIES} seeds where early stop ends the run early")


@pytest.mark.parametrize("name", list(EARLY_STOP_CASES))
def test_early_stop(checkpoint, name):
    case = EARLY_STOP_CASES[name]
    c = checkpoint(case["ckpt"])
    m, eot = c.model, eot_id(c)
    eos, stops = m.eos_token_id, {m.eos_token_id, eot}
    prompt, (want_on, d_on), (want_off, d_off) = early_stop_prompt(c, case)
    P, gen = len(prompt), case["gen"]
    on = json.loads(remask(*cli_args(c, case, prompt)))
    assert on["token_ids"] == want_on.tolist(), (
        f"early stop: remask {on['generated_ids']}\nreference {want_on[P:].tolist()}\n"
        f"reference stopped at {d_on['stopped_at']} after {d_on['forwards']} forwards")
    assert on["forwards"] == d_on["forwards"], (on["forwards"], d_on["forwards"])
    assert on["steps"] == d_on["steps"], (on["steps"], d_on["steps"])
    # what early stop promises: answer ++ stop ++ EOS..., in fewer forwards than the whole run,
    # with the answer of the run without early stop (the reference's here)
    s = d_on["stopped_at"]
    g_on = on["generated_ids"]
    answer = g_on[:s]
    assert not stops & set(answer) and m.mask_token_id not in answer
    assert g_on[s] in stops and g_on[s + 1:] == [eos] * (gen - s - 1) and len(g_on) == gen
    assert on["finish_reason"] == "stop"
    assert on["forwards"] < d_off["forwards"]
    g_ref_off = want_off[P:].tolist()
    assert next(i for i, t in enumerate(g_ref_off) if t in stops) == s
    assert g_ref_off[:s] == answer
    if case["rule"] != "fixed":
        assert max(d_on["per_step"]) >= 3, d_on["per_step"]
    # and remask's own run without early stop is the reference's, with the same answer
    off = json.loads(remask(*cli_args(c, case, prompt, early_stop=False)))
    assert off["token_ids"] == want_off.tolist(), (
        f"--no-early-stop: remask {off['generated_ids']}\nreference {want_off[P:].tolist()}")
    assert off["forwards"] == d_off["forwards"], (off["forwards"], d_off["forwards"])
    assert off["steps"] == d_off["steps"], (off["steps"], d_off["steps"])
    assert off["finish_reason"] == "stop"
    g_off = off["generated_ids"]
    first_stop = next(i for i, t in enumerate(g_off) if t in stops)
    assert first_stop == s and g_off[:s] == answer, "the answer differs without early stop"
    assert on["forwards"] < off["forwards"]


# ------------------------------------------------------------------------------- bad values

BAD_VALUES = {
    "tau_0": ["--threshold=0"],
    "tau_1.5": ["--threshold=1.5"],
    "tau_negative": ["--threshold=-0.5"],
    "tau_nan": ["--threshold=nan"],
    "factor_0": ["--factor=0"],
    "factor_negative": ["--factor=-1"],
    "factor_nan": ["--factor=NaN"],
    "gamma_-1": ["--entropy=-1"],
    "gamma_nan": ["--entropy=nan"],
    "threshold_and_factor": ["--threshold=0.5", "--factor=1"],
    "factor_and_entropy": ["--factor=1", "--entropy=1"],
    "threshold_and_entropy": ["--threshold=0.9", "--entropy=0.5"],
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_rule_values_exit_2(checkpoint, name):
    c = checkpoint("f32")
    flags = BAD_VALUES[name]
    r = subprocess.run([BIN, "generate", "--model", c.dir, "--prompt-ids", "1,2,3",
                        "--gen-length", "8", "--block-length", "8", *flags, "--json"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    names = [f.split("=")[0].lstrip("-") for f in flags]
    for n in names:
        assert n in r.stderr, f"the message does not name --{n}: {r.stderr!r}"
    if len(flags) == 1:
        rule, value = names[0], float(flags[0].split("=")[1])
        with pytest.raises(ValueError):
            ref.check_rule(rule, value)


def test_boundary_values_accepted(checkpoint):
    """tau = 1, gamma = 0 and a tiny f are valid; each matches the reference: one commit per
    step, except that factor commits both of the last two candidates (the second is the last,
    so failing it takes all)."""
    c = checkpoint("f32")
    for rule, value, forwards in (("threshold", 1.0, 8), ("entropy", 0.0, 8),
                                  ("factor", 1e-9, 7)):
        case = dict(prompt=(3, 50), gen=8, block=8, rule=rule, value=value)
        prompt = random_prompt(c.model, 3, 50)
        out = json.loads(remask(*cli_args(c, case, prompt)))
        want, diag = ref_run(c.model, eot_id(c), case, prompt, True)
        assert out["token_ids"] == want.tolist(), (rule, value)
        assert out["forwards"] == diag["forwards"] == forwards, (rule, diag["per_step"])
        assert ref.min_margin(diag) > MARGIN
