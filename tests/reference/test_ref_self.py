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
