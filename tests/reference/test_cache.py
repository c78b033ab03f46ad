"""Fast-dLLM's K/V cache (`remask generate --cache prefix|dual`) against the independent numpy
reference (llada_ref.generate with cache=...).

The reference's cached forward (llada_ref.forward with a KVCache) is checked first on its own:
on a canvas unchanged since the store it gives the full forward's logits for the fed rows; on a
changed canvas it equals a loop-per-head float64 re-implementation that takes the K/V of the
unfed positions from the store; and generate() feeds what the modes say, block by block. Then
every comparison with remask checks the ids, the forward and step counts and finish_reason,
that the reference took no near-tie decision, and that the cache changed the result (the
reference without a cache, everything else equal, gives other ids): a case the stale store never
affects would test nothing.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llada_ref as ref  # noqa: E402
from ckpt_writer import make_config, make_weights, write_checkpoint  # noqa: E402
from test_reference import (  # noqa: E402,F401  (checkpoint is a fixture)
    BIN, ENV, MARGIN, chat_prompt_ids, checkpoint, eot_id, ids_arg, random_prompt, remask)
from test_rules import cli_args, ref_run  # noqa: E402


# ---------------------------------------------------------------------------- the reference

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cacheckpt")
    c = make_config()
    write_checkpoint(d, c, make_weights(c, seed=7))
    return ref.load_checkpoint(str(d))


def rel_err(got, want):
    return float(np.max(np.abs(got.astype(np.float64) - want))) / float(np.max(np.abs(want)))


def stored(m, ids):
    """A KVCache filled by the full forward of ids, and that forward's logits."""
    cache = ref.KVCache()
    return cache, ref.forward(m, ids, cache)


def test_full_forward_that_stores_is_the_forward(ckpt):
    ids = np.array([[1, 2, 3, 30, 30, 30, 30, 9, 30, 30], [30, 30, 30, 30, 30, 6, 30, 9, 30, 30]])
    cache, logits = stored(ckpt, ids)
    np.testing.assert_array_equal(logits, ref.forward(ckpt, ids))
    assert len(cache.keys) == len(cache.values) == ckpt.n_layers
    for k, v in zip(cache.keys, cache.values):
        assert k.shape == v.shape == (2, ckpt.n_kv_heads, 10, ckpt.head_dim)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_step_on_unchanged_canvas_is_the_full_forward(ckpt, mode):
    """Nothing changed since the store: the fed rows' logits are the full forward's."""
    rng = np.random.default_rng(3)
    for T, lo, block in ((10, 3, 4), (12, 1, 3), (9, 5, 4), (16, 4, 12)):
        ids = rng.integers(0, ckpt.vocab_size, size=(2, T))
        ids[:, lo:] = np.where(rng.random((2, T - lo)) < 0.6, ckpt.mask_token_id, ids[:, lo:])
        cache, full = stored(ckpt, ids)
        cache.fed = (lo, T) if mode == "prefix" else (lo, lo + block)
        got = ref.forward(ckpt, ids, cache)
        hi = cache.fed[1]
        assert got.shape == (2, hi - lo, ckpt.embedding_size) and got.dtype == np.float32
        assert rel_err(got, full[:, lo:hi]) < 1e-5, (mode, T, lo)


def naive_forward(m, ids, rows, store=None):
    """float64, loops per position and head: the logits of `rows` (positions) of canvas ids,
    attending to every position, the K/V of positions outside `rows` from store[layer][pos]
    (all fresh when store is None); returns (logits, this call's K/V per layer and position)."""
    T, d, H, hd = len(ids), m.d_model, m.n_heads, m.head_dim
    g = H // m.n_kv_heads
    W = lambda n: m.w(n).astype(np.float64)  # noqa: E731

    def norm(v, wt):
        return v / math.sqrt(float(np.mean(v * v)) + m.rms_norm_eps) * wt

    def rope(v, pos):
        out = np.empty_like(v)
        for j in range(hd // 2):
            ang = pos / m.rope_theta ** (2 * j / hd)
            a, b = v[j], v[j + hd // 2]
            out[j] = a * math.cos(ang) - b * math.sin(ang)
            out[j + hd // 2] = b * math.cos(ang) + a * math.sin(ang)
        return out

    def heads(vec, pos=None):
        hs = [vec[j * hd:(j + 1) * hd] for j in range(len(vec) // hd)]
        return [rope(h, pos) for h in hs] if pos is not None else hs

    x = {t: W("wte.weight")[ids[t]].copy() for t in rows}
    fresh = []
    for L in range(m.n_layers):
        p = f"blocks.{L}."
        hs = {t: norm(x[t], W(p + "attn_norm.weight")) for t in rows}
        kv = {t: (heads(W(p + "k_proj.weight") @ hs[t], t), heads(W(p + "v_proj.weight") @ hs[t]))
              for t in rows}
        fresh.append(kv)
        every = {u: kv[u] if u in kv else store[L][u] for u in range(T)}
        new = {}
        for t in rows:
            qs = heads(W(p + "q_proj.weight") @ hs[t], t)
            o = np.zeros(d)
            for head in range(H):
                kvh = head // g
                s = np.array([every[u][0][kvh] @ qs[head] / math.sqrt(hd) for u in range(T)])
                pr = np.exp(s - s.max())
                pr /= pr.sum()
                o[head * hd:(head + 1) * hd] = sum(pr[u] * every[u][1][kvh] for u in range(T))
            y = x[t] + W(p + "attn_out.weight") @ o
            h = norm(y, W(p + "ff_norm.weight"))
            a = W(p + "ff_proj.weight") @ h
            up = W(p + "up_proj.weight") @ h
            new[t] = y + W(p + "ff_out.weight") @ (a / (1 + np.exp(-a)) * up)
        x = new
    logits = np.array([W("ff_out.weight") @ norm(x[t], W("ln_f.weight")) for t in rows])
    return logits, fresh


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_step_on_changed_canvas_against_naive_loops(ckpt, mode):
    """Tokens committed since the store, inside and outside the fed rows: the fed rows are
    recomputed, every other position's K/V is the stale stored one (never the canvas's)."""
    M = ckpt.mask_token_id
    before = [4, 17, 2, M, M, M, M, M, M, M, M, M]      # prompt 3, blocks 3..7, 7..11
    after = [4, 17, 2, 9, M, 21, M, M, M, M, M, M]      # two commits in the block 3..7
    lo, hi = 3, (len(before) if mode == "prefix" else 7)
    rows = list(range(lo, hi))
    _, store = naive_forward(ckpt, before, list(range(len(before))))
    want, _ = naive_forward(ckpt, after, rows, store)
    cache, _ = stored(ckpt, [before])
    cache.fed = (lo, hi)
    got = ref.forward(ckpt, [after], cache)[0]
    assert rel_err(got, want) < 1e-5
    # the stale store is what it uses: not the full forward of the new canvas
    assert rel_err(got, ref.forward(ckpt, [after])[0, lo:hi]) > 1e-3
    # ids outside the fed rows are never read (their K/V come from the store)
    elsewhere = list(after)
    elsewhere[0] = 11
    if mode == "dual":
        elsewhere[9] = 12
    np.testing.assert_array_equal(ref.forward(ckpt, [elsewhere], cache)[0], got)
    # and a cached step writes nothing into the store
    np.testing.assert_array_equal(ref.forward(ckpt, [after], cache)[0], got)


def spy_forward(monkeypatch, log):
    """Wrap ref.forward: log (batch, length, fed range or "full" or "store") of every call, and
    for a cached call how far its logits are from the full forward of the same canvas."""
    real = ref.forward

    def spy(m, ids, cache=None):
        ids = np.asarray(ids)
        out = real(m, ids, cache) if cache is not None else real(m, ids)
        if cache is None or cache.fed is None:
            log.append((ids.shape[0], ids.shape[1], "full" if cache is None else "store", None))
        else:
            lo, hi = cache.fed
            log.append((ids.shape[0], ids.shape[1], cache.fed,
                        rel_err(out, real(m, ids)[:, lo:hi])))
        return out

    monkeypatch.setattr(ref, "forward", spy)


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_generate_feeds_what_the_mode_says(ckpt, monkeypatch, mode, cfg):
    """Prompt 3, gen 12 in blocks of 4 at 3, 7, 11, 2 steps per block: each block's first
    forward is full and stores, its second feeds [start, 15) (prefix) or [start, start + 4)
    (dual), with the stale store (its logits are not the full forward's)."""
    log = []
    spy_forward(monkeypatch, log)
    x, d = ref.generate(ckpt, [1, 2, 3], 12, 6, 4, cfg_scale=cfg, cache=mode)
    B = 2 if cfg > 0 else 1
    assert d["forwards"] == 6 and d["cache"] == mode and ckpt.mask_token_id not in x.tolist()
    if mode == "none":
        assert [e[:3] for e in log] == [(B, 15, "full")] * 6 and d["full_forwards"] == 6
        return
    fed = {s: (s, 15) if mode == "prefix" else (s, s + 4) for s in (3, 7, 11)}
    assert [e[:3] for e in log] == [c for s in (3, 7, 11) for c in ((B, 15, "store"),
                                                                     (B, 15, fed[s]))]
    assert d["full_forwards"] == 3
    assert all(e[3] > 1e-4 for e in log if e[3] is not None), log


@pytest.mark.parametrize("rule,value", [("threshold", 0.9), ("factor", 0.5), ("entropy", 1.0)])
def test_adaptive_block_stores_once(ckpt, monkeypatch, rule, value):
    """Under an adaptive rule a block runs until it has no mask: one full forward, then only
    cached ones; the store is rebuilt by the next block's first forward."""
    log = []
    spy_forward(monkeypatch, log)
    _, d = ref.generate(ckpt, [5, 6], 12, None, 6, rule=rule, rule_value=value, cache="dual")
    assert d["forwards"] == len(log) == len(d["per_step"]) and sum(d["per_step"]) == 12
    kinds = [e[2] for e in log]
    assert kinds.count("store") == 2 == d["full_forwards"] and kinds[0] == "store"
    second = kinds.index("store", 1)
    assert set(kinds[1:second]) <= {(2, 8)} and set(kinds[second + 1:]) <= {(8, 14)}
    assert sum(d["per_step"][:second]) == 6


def test_one_step_per_block_is_uncached(ckpt):
    """Every forward is a block's first (full) one: the cache changes nothing."""
    runs = [ref.generate(ckpt, [1, 9], 12, 3, 4, cache=mode) for mode in ref.CACHES]
    for x, d in runs[1:]:
        assert x.tolist() == runs[0][0].tolist() and d["full_forwards"] == d["forwards"] == 3


def test_unknown_cache_mode_is_refused(ckpt):
    with pytest.raises(ValueError):
        ref.generate(ckpt, [1, 2], 8, 4, 8, cache="bogus")


# ---------------------------------------------------------------------------- against remask

# Each case: checkpoint, prompt ((length, seed) or chat text), geometry, rule (fixed with
# steps, or an adaptive rule and value), cache mode, sampler options. The seeds are chosen (with
# the reference alone) so that the case's mode generates other ids than no cache AND than the
# other mode, with no near-tie decision.
CASES = {
    "fixed_prefix_f32": dict(ckpt="f32", prompt=(7, 361), gen=32, block=8, rule="fixed",
                             steps=16, cache="prefix"),
    "fixed_dual_bf16_uneven": dict(ckpt="bf16", prompt=(6, 1962), gen=30, block=10, rule="fixed",
                                   steps=9, cache="dual"),
    "threshold_prefix_f32": dict(ckpt="f32", prompt=(7, 363), gen=24, block=8,
                                 rule="threshold", value=0.3, cache="prefix"),
    "threshold_dual_f32": dict(ckpt="f32", prompt=(7, 64), gen=32, block=8, rule="threshold",
                               value=0.2, cache="dual"),
    "factor_prefix_f32": dict(ckpt="f32", prompt=(7, 165), gen=24, block=8, rule="factor",
                              value=3.0, cache="prefix"),
    "factor_dual_bf16": dict(ckpt="bf16", prompt=(6, 1666), gen=32, block=8, rule="factor",
                             value=2.0, cache="dual"),
    "entropy_dual_f32": dict(ckpt="f32", prompt=(7, 67), gen=24, block=8, rule="entropy",
                             value=8.0, cache="dual"),
    "entropy_prefix_bf16": dict(ckpt="bf16", prompt=(7, 968), gen=32, block=8,
                                rule="entropy", value=3.0, cache="prefix"),
    "prompt_len1_threshold_prefix": dict(ckpt="bf16", prompt=(1, 969), gen=24, block=8,
                                         rule="threshold", value=0.7, cache="prefix"),
    "prompt_len1_fixed_dual": dict(ckpt="f32", prompt=(1, 70), gen=24, block=8, rule="fixed",
                                   steps=12, cache="dual"),
    "chat_factor_dual": dict(ckpt="bf16", chat="Name three colours.", gen=24, block=8,
                             rule="factor", value=2.0, cache="dual"),
    "chat_fixed_prefix": dict(ckpt="f32", chat="What is the capital of France?", gen=32,
                              block=8, rule="fixed", steps=16, cache="prefix"),
    "cfg_threshold_dual": dict(ckpt="f32", prompt=(8, 71), gen=24, block=8, rule="threshold",
                               value=0.3, cfg_scale=1.5, cache="dual"),
    "cfg_fixed_prefix": dict(ckpt="bf16", prompt=(8, 572), gen=24, block=8, rule="fixed",
                             steps=12, cfg_scale=1.5, cache="prefix"),
    "temperature_factor_prefix": dict(ckpt="bf16", prompt=(8, 973), gen=24, block=8,
                                      rule="factor", value=2.0, temperature=0.8, seed=42,
                                      cache="prefix"),
    "temp_cfg_random_fixed_dual": dict(ckpt="f32", prompt=(5, 74), gen=24, block=8,
                                       rule="fixed", steps=12, temperature=1.0, cfg_scale=0.5,
                                       remasking="random", seed=3, cache="dual"),
}


def cache_prompt(c, case):
    if "chat" in case:
        return chat_prompt_ids(c, case["chat"])
    return random_prompt(c.model, *case["prompt"])


@pytest.mark.parametrize("name", list(CASES))
def test_cache_matches_reference(checkpoint, name):
    case = CASES[name]
    c = checkpoint(case["ckpt"])
    m, eot = c.model, eot_id(c)
    prompt = cache_prompt(c, case)
    P, mode = len(prompt), case["cache"]
    out = json.loads(remask(*cli_args(c, case, prompt), "--cache", mode))
    # remask stops early by default: the reference with early_stop=True is the same run
    want, diag = ref_run(m, eot, case, prompt, True, cache=mode)
    got = out["token_ids"]
    assert out["cache"] == mode
    assert got[:P] == prompt, "prompt part of token_ids differs from the independent encoding"
    assert out["generated_ids"] == got[P:]
    assert got == want.tolist(), (
        f"{name}: remask and reference disagree\nremask:    {got[P:]}\n"
        f"reference: {want[P:].tolist()}\nreference per-step commits: {diag['per_step']}")
    assert out["forwards"] == diag["forwards"], (
        f"{name}: forwards remask {out['forwards']}, reference {diag['forwards']} "
        f"(per step {diag['per_step']})")
    assert out["steps"] == diag["steps"], (out["steps"], diag["steps"])
    assert out["finish_reason"] == diag["finish_reason"]
    assert m.mask_token_id not in got[P:], "a mask token was left in the generation"
    assert ref.min_margin(diag) > MARGIN, diag
    # the cache matters here: without it the reference generates other ids
    plain, _ = ref_run(m, eot, case, prompt, True)
    assert plain[P:].tolist() != want[P:].tolist(), f"{name}: the cache changes nothing"
    other, _ = ref_run(m, eot, case, prompt, True, cache={"prefix": "dual"}.get(mode, "prefix"))
    assert other[P:].tolist() != want[P:].tolist(), f"{name}: prefix and dual agree"
    assert diag["full_forwards"] < diag["forwards"]


def test_cache_none_is_the_default(checkpoint):
    c = checkpoint("f32")
    case = CASES["threshold_dual_f32"]
    prompt = cache_prompt(c, case)
    default = json.loads(remask(*cli_args(c, case, prompt)))
    none = json.loads(remask(*cli_args(c, case, prompt), "--cache", "none"))
    want, diag = ref_run(c.model, eot_id(c), case, prompt, True)
    assert default["cache"] == none["cache"] == "none"
    assert default["token_ids"] == none["token_ids"] == want.tolist()
    assert default["forwards"] == none["forwards"] == diag["forwards"]
    assert ref.min_margin(diag) > MARGIN


def test_bad_cache_mode_exits_2(checkpoint):
    c = checkpoint("f32")
    r = subprocess.run([BIN, "generate", "--model", c.dir, "--prompt-ids", "1,2,3",
                        "--gen-length", "8", "--block-length", "8", "--steps", "4",
                        "--cache", "bogus", "--json"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "--cache" in r.stderr, f"the message does not name --cache: {r.stderr!r}"
