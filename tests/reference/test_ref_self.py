"""Self-checks of the numpy reference (no remask binary needed)."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llada_ref as ref  # noqa: E402
from ckpt_writer import make_config, make_weights, write_checkpoint  # noqa: E402


# ---------------------------------------------------------------------------- RNG

def test_splitmix64_anchor_values():
    # absorb(0, 0) = mix64(GOLDEN) and absorb(0, GOLDEN) = mix64(2 * GOLDEN) are the first two
    # outputs of SplitMix64 seeded with 0, published values.
    assert ref.absorb_int(0, 0) == 0xE220A8397B1DCDAF
    assert ref.absorb_int(0, ref.GOLDEN) == 0x6E789E6AA1B965F4
    assert ref.mix64_int(0) == 0
    assert ref.mix64_int(1) == 0x5692161D100B05E5


def test_rng_vectorised_equals_scalar():
    rng = np.random.default_rng(1234)
    hs = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    vs = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    vs[:50] = np.arange(50, dtype=np.uint64)            # small indices, as the sampler uses
    hs[50:60] = np.uint64(ref.MASK64)                   # extremes
    vs[60:70] = np.uint64(ref.MASK64)
    got_abs = ref.absorb_np(hs, vs)
    got_u = ref.uniform_np(hs, vs)
    for h, v, a, u in zip(hs.tolist(), vs.tolist(), got_abs.tolist(), got_u.tolist()):
        assert a == ref.absorb_int(h, v)
        assert u == ref.uniform_int(h, v)
        assert 0.0 < u < 1.0


def test_rng_keys_and_uniform_stats():
    key = ref.key_int(7, ref.STREAM_GUMBEL, 3, 11)
    assert key == ref.absorb_int(ref.absorb_int(ref.absorb_int(ref.absorb_int(0, 7), 1), 3), 11)
    u = ref.uniform_np(key, np.arange(20000, dtype=np.uint64))
    assert abs(u.mean() - 0.5) < 0.01 and u.min() > 0 and u.max() < 1
    assert len({ref.key_int(1, 1, 2, 3), ref.key_int(0, 1, 2, 3), ref.key_int(1, 2, 2, 3),
                ref.key_int(1, 1, 0, 3), ref.key_int(1, 1, 2, 0)}) == 5
    # 52 bits + 0.5 is exact in a float64: the extremes stay strictly inside (0, 1)
    assert (0 + 0.5) * 2.0 ** -52 > 0
    assert ((2**52 - 1) + 0.5) * 2.0 ** -52 < 1.0


# ---------------------------------------------------------------------------- schedule

def test_schedule():
    assert ref.schedule(20, 6) == [4, 4, 3, 3, 3, 3]
    assert ref.schedule(16, 8) == [2] * 8
    assert ref.schedule(8, 8) == [1] * 8
    assert ref.schedule(8, 1) == [8]
    assert ref.schedule(3, 5) == [1, 1, 1, 0, 0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("selfckpt")
    c = make_config()
    write_checkpoint(d, c, make_weights(c))
    return ref.load_checkpoint(str(d))


# ---------------------------------------------------------------------------- reader

def test_reader_dtypes_and_shards(tmp_path):
    c = make_config()
    w = make_weights(c, seed=3)
    write_checkpoint(tmp_path / "f32", c, w)
    write_checkpoint(tmp_path / "bf16", c, w, dtype="BF16", shards=3)
    write_checkpoint(tmp_path / "f16", c, w, dtype="F16")
    a = ref.load_checkpoint(str(tmp_path / "f32")).weights
    b = ref.load_checkpoint(str(tmp_path / "bf16")).weights
    h = ref.load_checkpoint(str(tmp_path / "f16")).weights
    assert set(a) == set(b) == set(h) == set(w)
    for n in w:
        assert a[n].dtype == b[n].dtype == h[n].dtype == np.float32
        np.testing.assert_array_equal(a[n], w[n])
        np.testing.assert_array_equal(h[n], w[n].astype(np.float16).astype(np.float32))
        # bf16 widening is exact: the low 16 bits are zero, the value within bf16 rounding
        assert not np.any(b[n].view(np.uint32) & 0xFFFF)
        np.testing.assert_allclose(b[n], w[n], rtol=2**-8, atol=0)


def test_bf16_known_bits(tmp_path):
    p = tmp_path / "x.safetensors"
    raw = np.array([0x3F80, 0xC000, 0x7F80, 0x0001], dtype="<u2").tobytes()
    hdr = json.dumps({"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + raw)
    t = ref.read_safetensors(str(p))["t"]
    assert t.shape == (2, 2) and t[0, 0] == 1.0 and t[0, 1] == -2.0 and t[1, 0] == np.inf
    assert t[1, 1] == np.float32(2.0 ** -133)


# ---------------------------------------------------------------------------- model

def test_rope_position_zero_is_identity_and_preserves_norm():
    cos, sin = ref.rope_cos_sin(5, 8, 500000.0)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 8)).astype(np.float32)
    y = ref.apply_rope(x, cos, sin)
    np.testing.assert_array_equal(y[:, :, 0], x[:, :, 0])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # rotate-half: pair (i, i + hd/2) rotates by pos * inv_freq[i]
    ang = 3 * (1.0 / 500000.0 ** (2 / 8))
    a, b = x[0, 0, 3, 1], x[0, 0, 3, 5]
    np.testing.assert_allclose(y[0, 0, 3, 1], a * math.cos(ang) - b * math.sin(ang), rtol=1e-5)
    np.testing.assert_allclose(y[0, 0, 3, 5], b * math.cos(ang) + a * math.sin(ang), rtol=1e-5)


def test_forward_shape_dtype_rows_independent_bidirectional(ckpt):
    ids = np.array([[1, 2, 3, 30, 5, 6], [7, 8, 9, 10, 11, 12]])
    out = ref.forward(ckpt, ids)
    assert out.shape == (2, 6, 40) and out.dtype == np.float32
    np.testing.assert_allclose(ref.forward(ckpt, ids[1:]), out[1:], rtol=1e-5, atol=1e-6)
    changed = ids.copy()
    changed[0, -1] = 20
    out2 = ref.forward(ckpt, changed)
    assert np.max(np.abs(out2[0, 0] - out[0, 0])) > 1e-3       # last token reaches position 0
    np.testing.assert_allclose(out2[1], out[1], rtol=1e-5, atol=1e-6)


def test_grouped_kv_heads_are_repeat_interleave(tmp_path):
    # kv head j serves query heads j*g .. (j+1)*g - 1: duplicating each kv head's rows g times
    # (interleaved) into a full multi-head checkpoint must give the same logits.
    c = make_config(n_heads=4, n_kv_heads=2)
    w = make_weights(c, seed=5)
    hd, g = c["d_model"] // c["n_heads"], 2
    full = dict(w)
    for i in range(c["n_layers"]):
        for nm in ("k_proj", "v_proj"):
            key = f"model.transformer.blocks.{i}.{nm}.weight"
            heads = w[key].reshape(c["n_kv_heads"], hd, c["d_model"])
            full[key] = np.repeat(heads, g, axis=0).reshape(-1, c["d_model"])
    write_checkpoint(tmp_path / "gqa", c, w)
    write_checkpoint(tmp_path / "mha", make_config(n_heads=4, n_kv_heads=None), full)
    ids = np.array([[1, 5, 9, 30, 2, 7, 7]])
    a = ref.forward(ref.load_checkpoint(str(tmp_path / "gqa")), ids)
    b = ref.forward(ref.load_checkpoint(str(tmp_path / "mha")), ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_tying_uses_wte(tmp_path):
    c = make_config(weight_tying=True, embedding_size=None)
    w = make_weights(c, seed=6)
    write_checkpoint(tmp_path / "tied", c, w)
    k = ref.load_checkpoint(str(tmp_path / "tied"))
    assert k.embedding_size == 38
    out = ref.forward(k, [[1, 2, 3]])
    assert out.shape == (1, 3, 38)
    c2 = make_config(weight_tying=False, embedding_size=None)
    w2 = dict(w, **{"model.transformer.ff_out.weight": w["model.transformer.wte.weight"]})
    write_checkpoint(tmp_path / "untied", c2, w2)
    np.testing.assert_array_equal(ref.forward(ref.load_checkpoint(str(tmp_path / "untied")), [[1, 2, 3]]), out)


def test_forward_against_naive_loops(ckpt):
    """A second, loop-per-head/per-position implementation of one forward pass."""
    ids = [4, 30, 17, 2, 9]
    T, d, H, hd = len(ids), ckpt.d_model, ckpt.n_heads, ckpt.head_dim
    g = H // ckpt.n_kv_heads
    W = lambda n: ckpt.w(n).astype(np.float64)  # noqa: E731

    def norm(v, wt):
        return v / math.sqrt(float(np.mean(v * v)) + ckpt.rms_norm_eps) * wt

    def rope(v, pos):
        out = np.empty_like(v)
        for j in range(hd // 2):
            ang = pos / ckpt.rope_theta ** (2 * j / hd)
            a, b = v[j], v[j + hd // 2]
            out[j] = a * math.cos(ang) - b * math.sin(ang)
            out[j + hd // 2] = b * math.cos(ang) + a * math.sin(ang)
        return out

    x = [W("wte.weight")[t].copy() for t in ids]
    for L in range(ckpt.n_layers):
        p = f"blocks.{L}."
        hs = [norm(v, W(p + "attn_norm.weight")) for v in x]
        q = [W(p + "q_proj.weight") @ h for h in hs]
        k = [W(p + "k_proj.weight") @ h for h in hs]
        v = [W(p + "v_proj.weight") @ h for h in hs]
        new = []
        for t in range(T):
            o = np.zeros(d)
            for head in range(H):
                kvh = head // g
                qh = rope(q[t][head * hd:(head + 1) * hd], t)
                s = [rope(k[u][kvh * hd:(kvh + 1) * hd], u) @ qh / math.sqrt(hd) for u in range(T)]
                e = np.exp(np.array(s) - max(s))
                pr = e / e.sum()
                o[head * hd:(head + 1) * hd] = sum(pr[u] * v[u][kvh * hd:(kvh + 1) * hd] for u in range(T))
            new.append(x[t] + W(p + "attn_out.weight") @ o)
        x = new
        out = []
        for t in range(T):
            h = norm(x[t], W(p + "ff_norm.weight"))
            a = W(p + "ff_proj.weight") @ h
            out.append(x[t] + W(p + "ff_out.weight") @ (a / (1 + np.exp(-a)) * (W(p + "up_proj.weight") @ h)))
        x = out
    logits = np.array([W("ff_out.weight") @ norm(v, W("ln_f.weight")) for v in x])
    got = ref.forward(ckpt, [ids])[0]
    assert np.max(np.abs(got - logits)) / np.max(np.abs(logits)) < 1e-5


# ---------------------------------------------------------------------------- sampler

def test_generate_validates_arguments(ckpt):
    with pytest.raises(ValueError):
        ref.generate(ckpt, [1, 2], gen_length=10, steps=4, block_length=4)
    with pytest.raises(ValueError):
        ref.generate(ckpt, [1, 2], gen_length=16, steps=3, block_length=8)


def test_generate_fills_every_mask_and_keeps_prompt(ckpt):
    x, diag = ref.generate(ckpt, [1, 2, 3], gen_length=12, steps=6, block_length=4)
    assert x[:3].tolist() == [1, 2, 3] and ckpt.mask_token_id not in x.tolist()
    assert diag["schedule"] == [[2, 2]] * 3 and diag["forwards"] == 6


def test_generate_commits_top_confidence_block_by_block(ckpt, monkeypatch):
    """With a scripted model: the sampler commits the most confident positions, block by block,
    ties broken by the lower position."""
    V, M = ckpt.embedding_size, ckpt.mask_token_id
    probs = {3: 0.5, 4: 0.9, 5: 0.9, 6: 0.99, 7: 0.99, 8: 0.99}   # position -> confidence
    seen = []

    def fake_forward(_ckpt, ids):
        ids = np.asarray(ids)
        seen.append(ids[0].copy())
        out = np.zeros((ids.shape[0], ids.shape[1], V), dtype=np.float32)
        for pos, p in probs.items():
            # token = pos (6 for the tied 6, 7, 8: identical rows make an exact
            # tie, whatever order the softmax sums in), with probability ~p
            tok = min(pos, 6)
            out[:, pos, :] = 0.0
            out[:, pos, tok] = math.log(p * (V - 1) / (1 - p))
        return out

    monkeypatch.setattr(ref, "forward", fake_forward)
    x, _ = ref.generate(ckpt, [1, 2, 0], gen_length=6, steps=4, block_length=3)
    # block 0 = positions 3,4,5 over 2 steps: [2, 1]; 4 and 5 tie -> 4 then 5 first
    assert [int(np.sum(s == M)) for s in seen] == [6, 4, 3, 1]
    assert seen[1][4] == 4 and seen[1][5] == 5 and seen[1][3] == M
    assert seen[3][6] == 6 and seen[3][7] == 6 and seen[3][8] == M  # block 1: three-way tie
    assert x.tolist() == [1, 2, 0, 3, 4, 5, 6, 6, 6]


# ---------------------------------------------------------------------------- commit rules

def C(*confs, start=10):
    """Candidates at positions start, start+1, ... with the given values."""
    return [(start + i, c) for i, c in enumerate(confs)]


def test_threshold_rule():
    chosen, mg = ref.select_threshold(C(0.2, 0.95, 0.5, 0.92), 0.9)
    assert chosen == [11, 13]                                    # >= tau, in rank order
    assert math.isclose(mg["threshold"], (0.92 - 0.9) / 0.92)    # 0.92 is the closest to tau
    assert ref.select_threshold(C(0.2, 0.95, 0.5, 0.9), 0.9)[0] == [11, 13]   # equality passes
    assert ref.select_threshold(C(0.2, 0.95, 0.5, 0.9), 0.9)[1]["threshold"] == 0.0  # a tie
    # nothing passes: still the single most confident one, ties to the lower position
    assert ref.select_threshold(C(0.2, 0.4, 0.4, 0.1), 0.9)[0] == [11]
    assert ref.select_threshold(C(0.3), 1.0)[0] == [10]
    assert ref.select_threshold(C(-math.inf, -math.inf), 0.5)[0] == [10]
    # tau = 1 commits only a certain prediction
    assert ref.select_threshold(C(0.999, 1.0, 0.2), 1.0)[0] == [11]
    # when nothing passes, the rank of the top two is a decision
    _, mg = ref.select_threshold(C(0.5, 0.49), 0.9)
    assert math.isclose(mg["order"], 0.01 / 0.5)


def test_factor_thresholds():
    f = 1.0
    assert ref.factor_threshold(f, 0) == -1.0
    assert ref.factor_threshold(f, 1) == 1 - 1 / 3     # n = 2: 1 - f / (n + 1)
    assert ref.factor_threshold(f, 2) == 1 - 1 / 4
    assert ref.factor_threshold(2.0, 4) == 1 - 2 / 6


def test_factor_rule():
    f = 1.0   # thresholds by rank: -1, 0.667, 0.75, 0.8, 0.833, ...
    # first failure in the middle (rank 2: 0.7 < 0.75): take ranks 0, 1
    assert ref.select_factor(C(0.9, 0.7, 0.3, 0.8, 0.1), f)[0] == [10, 13]
    # first failure at rank 1: take that many = 1
    assert ref.select_factor(C(0.9, 0.5, 0.4), f)[0] == [10]
    # first failure at the LAST candidate: all of them
    assert ref.select_factor(C(0.9, 0.8, 0.1), f)[0] == [10, 11, 12]
    # nothing fails: all
    assert ref.select_factor(C(0.99, 0.95, 0.9, 0.85), f)[0] == [10, 11, 12, 13]
    # two candidates always both go (the second is the last: failing it takes all)
    assert ref.select_factor(C(0.9, 0.01), 1e-9)[0] == [10, 11]
    assert ref.select_factor(C(0.01, 0.9), 1e-9)[0] == [11, 10]
    # one candidate
    assert ref.select_factor(C(0.2), f)[0] == [10]
    # rank 0 passes whatever it is (threshold -1) except -inf, which still takes one
    assert ref.select_factor(C(0.01, 0.001, 0.0001), f)[0] == [10]
    assert ref.select_factor(C(-math.inf, -math.inf, -math.inf), f)[0] == [10]
    # ties ranked by the lower position
    assert ref.select_factor(C(0.5, 0.9, 0.9, 0.2), f)[0] == [11, 12]
    # passing exactly at the threshold: 0.75 >= 1 - 1/4
    assert ref.select_factor(C(0.9, 0.8, 0.75, 0.1, 0.1), f)[0] == [10, 11, 12]
    # large f: every threshold <= 0, nothing fails
    assert ref.select_factor(C(0.01, 0.02, 0.03), 10.0)[0] == [12, 11, 10]


def test_factor_rule_margins():
    chosen, mg = ref.select_factor(C(0.9, 0.7, 0.3), 1.0)
    assert chosen == [10, 11, 12]                     # first failure at the last: all
    # compared: rank 1 (0.7 vs 2/3) and rank 2 (0.3 vs 0.75)
    assert math.isclose(mg["threshold"], (0.7 - 2 / 3) / 0.7)
    assert math.isclose(mg["order"], min(0.2 / 0.9, 0.4 / 0.7))


def test_entropy_rule():
    # sorted H: 0.1 (pos 12), 0.2 (pos 10), 0.5 (pos 13), 2.0 (pos 11)
    cands = C(0.2, 2.0, 0.1, 0.5)
    assert ref.select_entropy(cands, 0.0)[0] == [12]              # k >= 1 always
    assert ref.select_entropy(cands, 0.1)[0] == [12, 10]          # 0.1 <= 0.1
    assert ref.select_entropy(cands, 0.29)[0] == [12, 10]         # 0.1 + 0.2 > 0.29
    assert ref.select_entropy(cands, 0.3 + 1e-12)[0] == [12, 10, 13]
    assert ref.select_entropy(cands, 0.79)[0] == [12, 10, 13]     # 0.8 > 0.79
    assert ref.select_entropy(cands, 0.8 + 1e-12)[0] == [12, 10, 13, 11]
    assert ref.select_entropy(cands, 100.0)[0] == [12, 10, 13, 11]
    # the largest (last) entropy of the prefix does not count: a huge H still goes
    assert ref.select_entropy(C(0.1, 50.0), 0.1)[0] == [10, 11]
    # +inf entropies (a proposed EOS/EoT under confidence_eos_eot_inf) sort last
    assert ref.select_entropy(C(math.inf, 0.3, math.inf), 1.0)[0] == [11, 10]
    assert ref.select_entropy(C(math.inf, math.inf), 1.0)[0] == [10]
    # ties ranked by the lower position
    assert ref.select_entropy(C(0.5, 0.5, 0.5), 0.5)[0] == [10, 11]
    _, mg = ref.select_entropy(C(0.2, 2.0, 0.1, 0.5), 0.35)
    # partial sums compared: 0.1, 0.3, 0.8 (the first failure); neighbours up to the boundary
    assert math.isclose(mg["threshold"], 0.05 / 0.35)
    assert math.isclose(mg["order"], min(0.1 / 0.2, 0.3 / 0.5, 1.5 / 2.0))


def test_entropy_values():
    assert ref.entropy(np.zeros(7)) == pytest.approx(math.log(7), rel=1e-14)
    g = np.array([0.0, 0.0, -np.inf, 0.0, -np.inf])
    assert ref.entropy(g) == pytest.approx(math.log(3), rel=1e-14)       # -inf: p = 0
    assert ref.entropy(np.array([0.0, -800.0])) == 0.0                    # underflowed p
    p = np.array([0.5, 0.25, 0.25])
    assert ref.entropy(np.log(p) + 3.0) == pytest.approx(1.5 * math.log(2), rel=1e-14)


def test_fixed_rule_is_top_k():
    assert ref.select_fixed(C(0.2, 0.9, 0.9, 0.5), 2)[0] == [11, 12]
    assert ref.select_fixed(C(0.2, 0.9, 0.9, 0.5), 1)[0] == [11]


def test_check_rule():
    for rule, v in (("threshold", 0.5), ("threshold", 1.0), ("factor", 1e-9), ("factor", 7.0),
                    ("entropy", 0.0), ("entropy", 3.0), ("fixed", None)):
        ref.check_rule(rule, v)
    for rule, v in (("threshold", 0.0), ("threshold", 1.5), ("threshold", -0.1),
                    ("threshold", math.nan), ("factor", 0.0), ("factor", -1.0),
                    ("factor", math.nan), ("entropy", -1.0), ("entropy", -1e-12),
                    ("entropy", math.nan), ("entropy", None), ("magic", 1.0)):
        with pytest.raises(ValueError):
            ref.check_rule(rule, v)


def test_stop_index():
    M, E, T = 30, 31, 33
    assert ref.stop_index([5, 6, M, E], M, {E, T}) is None      # a mask comes first
    assert ref.stop_index([5, 6, E, M], M, {E, T}) == 2
    assert ref.stop_index([T, M, M], M, {E, T}) == 0
    assert ref.stop_index([5, 6, 7], M, {E, T}) is None          # no stop token


# ---------------------------------------------------------------------------- scripted model

def scripted(ckpt, table, calls=None):
    """A fake forward: position -> (token, probability) (after the mask logit is killed, the
    row is `token` with that probability and the other V - 2 ids uniform). `table` may be a
    function of the canvas. Records each canvas in `calls`."""
    V = ckpt.embedding_size

    def fake_forward(_ckpt, ids):
        ids = np.asarray(ids)
        if calls is not None:
            calls.append(ids[0].copy())
        rows = table(ids[0]) if callable(table) else table
        out = np.zeros((ids.shape[0], ids.shape[1], V), dtype=np.float32)
        for pos, (tok, p) in rows.items():
            if pos >= ids.shape[1]:
                continue
            out[:, pos, tok] = math.log(p * (V - 2) / (1 - p))
        return out

    return fake_forward


def test_threshold_generate_scripted(ckpt, monkeypatch):
    M = ckpt.mask_token_id
    # prompt 2, gen 8 in 2 blocks of 4; block 0: 0.9, 0.8 pass 0.7; 0.3, 0.2 do not
    table = {2: (5, 0.3), 3: (6, 0.9), 4: (7, 0.2), 5: (8, 0.8),
             6: (9, 0.95), 7: (10, 0.95), 8: (11, 0.95), 9: (12, 0.1)}
    calls = []
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table, calls))
    x, d = ref.generate(ckpt, [1, 2], 8, None, 4, rule="threshold", rule_value=0.7)
    assert d["per_step"] == [2, 1, 1, 3, 1] and d["forwards"] == 5
    assert x.tolist() == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [int(np.sum(c == M)) for c in calls] == [8, 6, 5, 4, 1]
    assert d["finish_reason"] == "length"


def test_factor_and_entropy_generate_scripted(ckpt, monkeypatch):
    table = {2: (5, 0.97), 3: (6, 0.9), 4: (7, 0.85), 5: (8, 0.1), 6: (9, 0.3), 7: (10, 0.6)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table))
    # f = 1: 0.97, 0.9 (>= 2/3), 0.85 (>= 3/4), 0.6 < 0.8 at rank 3 -> take 3; then
    # 0.6, 0.3 (< 2/3, not the last) -> take 1; then 0.3, 0.1 (fails, the last) -> both
    x, d = ref.generate(ckpt, [1, 2], 6, None, 6, rule="factor", rule_value=1.0)
    assert d["per_step"] == [3, 1, 2] and x.tolist() == [1, 2, 5, 6, 7, 8, 9, 10]
    # the entropy of a row with p on one token and the rest uniform over V - 2
    V = ckpt.embedding_size

    def H(p):
        q = (1 - p) / (V - 2)
        return -(p * math.log(p) + (V - 2) * q * math.log(q))
    hs = sorted(H(p) for _, p in table.values())
    gamma = hs[0] + hs[1] + hs[2] / 2     # ranks 0, 1 fit; adding rank 2 does not -> k = 3
    x, d = ref.generate(ckpt, [1, 2], 6, None, 6, rule="entropy", rule_value=gamma)
    assert d["per_step"][0] == 3 and sum(d["per_step"]) == 6
    assert x.tolist() == [1, 2, 5, 6, 7, 8, 9, 10]


def test_adaptive_rng_step_is_global(ckpt, monkeypatch):
    """Under an adaptive rule the RNG's step index is the global count of steps taken; under
    fixed it is b * steps_per_block + i, skipped (k = 0) steps included."""
    table = {p: (5 + p, 0.5) for p in range(2, 8)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table))
    seen = []
    real_key = ref.key_int

    def spy(seed, stream, step, pos):
        if stream == ref.STREAM_GUMBEL:
            seen.append(step)
        return real_key(seed, stream, step, pos)

    monkeypatch.setattr(ref, "key_int", spy)
    # tau 0.99 > every confidence: one per step, 3 per block, 2 blocks -> steps 0..5
    _, d = ref.generate(ckpt, [1, 2], 6, None, 3, rule="threshold", rule_value=0.99,
                        temperature=0.5, seed=1)
    assert d["forwards"] == 6 and sorted(set(seen)) == [0, 1, 2, 3, 4, 5]
    seen.clear()
    # fixed, 2 masks per block over 3 steps: schedule [1, 1, 0], step indices 0, 1, (2) | 3, 4
    _, d = ref.generate(ckpt, [1, 2], 4, 6, 2, temperature=0.5, seed=1)
    assert d["forwards"] == 4 and sorted(set(seen)) == [0, 1, 3, 4]


def test_early_stop_scripted(ckpt, monkeypatch):
    M, E = ckpt.mask_token_id, ckpt.eos_token_id
    T = 33   # an EoT id
    # gen 8 in 2 blocks of 4, fixed 1 per step; EOS proposed at position 3 (generation index 1)
    table = {2: (5, 0.9), 3: (E, 0.8), 4: (7, 0.7), 5: (8, 0.6),
             6: (9, 0.9), 7: (10, 0.9), 8: (11, 0.9), 9: (12, 0.9)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table))
    x, d = ref.generate(ckpt, [1, 2], 8, 8, 4, early_stop=True)
    assert x.tolist() == [1, 2, 5, E] + [E] * 6 and d["forwards"] == 2
    assert d["stopped_at"] == 1 and d["finish_reason"] == "stop"
    y, e = ref.generate(ckpt, [1, 2], 8, 8, 4, early_stop=False)
    assert y.tolist() == [1, 2, 5, E, 7, 8, 9, 10, 11, 12] and e["forwards"] == 8
    assert e["stopped_at"] is None and e["finish_reason"] == "stop"

    # the stop token is committed first, behind a mask: the run goes on until the gap is filled
    table2 = {**table, 2: (5, 0.85), 3: (E, 0.95)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table2))
    x, d = ref.generate(ckpt, [1, 2], 8, 8, 4, early_stop=True)
    assert x.tolist() == [1, 2, 5, E] + [E] * 6 and d["forwards"] == 2
    assert d["stop_waits"] == 1

    # EoT stops too (when its id is given); committed tokens after it become EOS
    table3 = {**table, 2: (5, 0.5), 3: (T, 0.4), 4: (7, 0.95), 5: (8, 0.3)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table3))
    x, d = ref.generate(ckpt, [1, 2], 8, None, 4, early_stop=True, eot_id=T,
                        rule="threshold", rule_value=0.9)
    # step 0: 7 at 4 (0.95) | step 1: 5 at 2 (0.5) | step 2: EoT at 3 -> stop, 4.. = EOS
    assert x.tolist() == [1, 2, 5, T] + [E] * 6 and d["forwards"] == 3
    assert d["per_step"] == [1, 1, 1] and d["stopped_at"] == 1
    # without eot_id it is an ordinary token
    x, d = ref.generate(ckpt, [1, 2], 8, None, 4, early_stop=True,
                        rule="threshold", rule_value=0.9)
    assert d["stopped_at"] is None and d["finish_reason"] == "length" and M not in x.tolist()

    # no stop token: early stop changes nothing
    table4 = {p: (5 + p, 0.9) for p in range(2, 10)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table4))
    a, da = ref.generate(ckpt, [1, 2], 8, 4, 4, early_stop=True)
    b, db = ref.generate(ckpt, [1, 2], 8, 4, 4)
    assert a.tolist() == b.tolist() and da["forwards"] == db["forwards"] == 4


def test_confidence_eos_eot_inf_entropy_is_inf(ckpt, monkeypatch):
    E = ckpt.eos_token_id
    # EOS is the surest proposal, but with confidence_eos_eot_inf its entropy is +inf: last
    table = {2: (E, 0.99), 3: (6, 0.5), 4: (7, 0.6)}
    monkeypatch.setattr(ref, "forward", scripted(ckpt, table))
    x, d = ref.generate(ckpt, [1, 2], 3, None, 3, rule="entropy", rule_value=0.0,
                        confidence_eos_eot_inf=True)
    assert d["per_step"] == [1, 1, 1] and x.tolist() == [1, 2, E, 6, 7]
    assert d["neg_inf_confidences"] == 3
    x, d = ref.generate(ckpt, [1, 2], 3, None, 3, rule="entropy", rule_value=0.0)
    assert d["per_step"] == [1, 1, 1] and d["neg_inf_confidences"] == 0
