"""An independent numpy reference of LLaDA: checkpoint reader, forward pass and sampler.

Written from /work/shared/LLADA.md (and the sampler contract in tests/reference/README.md),
not from the Rust code. Everything is plain numpy; all model math is float32, the sampler's
Gumbel noise and softmax confidences are float64.
"""

import json
import math
import os

import numpy as np

F32 = np.float32


# --------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
# --------------------------------------------------------------------------------------------

def _widen(raw, dtype, shape):
    """Raw little-endian bytes (a uint8 array) -> float32 array of `shape`."""
    if dtype == "F32":
        arr = raw.view("<f4").astype(F32)
    elif dtype == "BF16":
        # bf16 is the top half of an f32: widening is exact.
        arr = (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(F32)
    elif dtype == "F16":
        arr = raw.view("<f2").astype(F32)
    else:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}")
    return arr.reshape(shape)


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def _split(data, path):
    if data.size < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    header_len = int.from_bytes(data[:8].tobytes(), "little")
    header = json.loads(data[8:8 + header_len].tobytes().decode("utf-8"))
    return header, data[8 + header_len:]


def read_safetensors_header(path):
    """The JSON header of one .safetensors file (name -> {dtype, shape, data_offsets})."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(header_len).decode("utf-8"))


def read_safetensors(path):
    """Return {name: float32 ndarray} for every tensor of one .safetensors file."""
    header, body = _split(np.fromfile(path, dtype=np.uint8), path)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        expected = _ITEMSIZE.get(info["dtype"], 0) * math.prod(shape)
        if end - begin != expected or end > body.size:
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {begin}..{end}")
        tensors[name] = _widen(body[begin:end], info["dtype"], shape)
    return tensors


# --------------------------------------------------------------------------------------------
# Checkpoint: config.json + model.safetensors, or shards listed in model.safetensors.index.json.
# --------------------------------------------------------------------------------------------

class Checkpoint:
    def __init__(self, config, weights):
        self.config = config
        self.weights = weights
        c = config
        self.d_model = int(c["d_model"])
        self.n_heads = int(c["n_heads"])
        self.n_kv_heads = int(c.get("n_kv_heads") or self.n_heads)
        self.n_layers = int(c["n_layers"])
        self.mlp_hidden_size = int(c["mlp_hidden_size"])
        self.vocab_size = int(c["vocab_size"])
        self.embedding_size = int(c.get("embedding_size") or self.vocab_size)
        self.rope_theta = float(c["rope_theta"])
        self.rms_norm_eps = float(c["rms_norm_eps"])
        self.max_sequence_length = int(c["max_sequence_length"])
        self.mask_token_id = int(c["mask_token_id"])
        self.eos_token_id = int(c["eos_token_id"])
        self.weight_tying = bool(c.get("weight_tying", False))
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim * self.n_heads != self.d_model or self.n_heads % self.n_kv_heads:
            raise ValueError("inconsistent head counts in config.json")

    def w(self, name):
        return self.weights["model.transformer." + name]

    def head(self):
        return self.w("wte.weight") if self.weight_tying else self.w("ff_out.weight")


def load_checkpoint(directory):
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(directory, "model.safetensors.index.json")
    weights = {}
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for file in sorted(set(weight_map.values())):
            shard = read_safetensors(os.path.join(directory, file))
            for name, arr in shard.items():
                if weight_map.get(name) != file:
                    raise ValueError(f"{file}: tensor {name} not mapped to this shard")
                weights[name] = arr
        missing = set(weight_map) - set(weights)
        if missing:
            raise ValueError(f"tensors missing from shards: {sorted(missing)}")
    else:
        weights = read_safetensors(os.path.join(directory, "model.safetensors"))
    ckpt = Checkpoint(config, weights)
    if ckpt.weight_tying and "model.transformer.ff_out.weight" in weights:
        raise ValueError("weight_tying checkpoint has an output head")
    return ckpt


# --------------------------------------------------------------------------------------------
# The model (block_type "llama"), float32 throughout.
# --------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    return (x * (F32(1.0) / np.sqrt(var + F32(eps)))).astype(F32) * weight


def rope_cos_sin(T, head_dim, theta):
    """cos/sin tables [T, head_dim] for positions 0..T-1 (rotate-half layout)."""
    exponents = np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)
    inv_freq = F32(1.0) / np.power(F32(theta), exponents, dtype=F32)
    ang = np.arange(T, dtype=F32)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(F32), np.sin(ang).astype(F32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x: [B, heads, T, head_dim]."""
    return (x * cos + rotate_half(x) * sin).astype(F32)


def softmax_f32(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return (e / e.sum(axis=-1, keepdims=True)).astype(F32)


def silu(x):
    with np.errstate(over="ignore"):
        return (x / (F32(1.0) + np.exp(-x))).astype(F32)


def attention(ckpt, h, i, cos, sin):
    B, T, _ = h.shape
    H, KV, hd = ckpt.n_heads, ckpt.n_kv_heads, ckpt.head_dim
    p = f"blocks.{i}."
    q = (h @ ckpt.w(p + "q_proj.weight").T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    k = (h @ ckpt.w(p + "k_proj.weight").T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    v = (h @ ckpt.w(p + "v_proj.weight").T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # kv head j serves query heads j*g .. (j+1)*g-1 (repeat_interleave, as HF Llama).
    g = H // KV
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * F32(1.0 / math.sqrt(hd))  # no mask: bidirectional
    out = softmax_f32(scores) @ v                                        # [B, H, T, hd]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return out @ ckpt.w(p + "attn_out.weight").T


def forward(ckpt, ids):
    """ids: int array [B, T] -> float32 logits [B, T, embedding_size]."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError("ids must be [B, T]")
    T = ids.shape[1]
    eps = ckpt.rms_norm_eps
    cos, sin = rope_cos_sin(T, ckpt.head_dim, ckpt.rope_theta)
    x = ckpt.w("wte.weight")[ids].astype(F32)
    for i in range(ckpt.n_layers):
        p = f"blocks.{i}."
        h = rms_norm(x, ckpt.w(p + "attn_norm.weight"), eps)
        x = (x + attention(ckpt, h, i, cos, sin)).astype(F32)
        h = rms_norm(x, ckpt.w(p + "ff_norm.weight"), eps)
        gate = silu(h @ ckpt.w(p + "ff_proj.weight").T)
        up = h @ ckpt.w(p + "up_proj.weight").T
        x = (x + (gate * up) @ ckpt.w(p + "ff_out.weight").T).astype(F32)
    x = rms_norm(x, ckpt.w("ln_f.weight"), eps)
    return (x @ ckpt.head().T).astype(F32)


# --------------------------------------------------------------------------------------------
# Counter-based RNG: every draw is a pure function of (seed, stream, step, pos, index).
# Scalar version on Python ints, vectorised version on np.uint64 (which wraps mod 2^64).
# --------------------------------------------------------------------------------------------

MASK64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15
STREAM_GUMBEL = 1
STREAM_REMASK = 2


def mix64_int(z):
    z &= MASK64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z


def absorb_int(h, v):
    return mix64_int(h ^ ((v + GOLDEN) & MASK64))


def key_int(seed, stream, step, pos):
    h = 0
    for word in (seed, stream, step, pos):
        h = absorb_int(h, word & MASK64)
    return h


def uniform_int(key, i):
    return ((absorb_int(key, i) >> 12) + 0.5) * 2.0 ** -52


def mix64_np(z):
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def absorb_np(h, v):
    h = np.asarray(h, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix64_np(h ^ (v + np.uint64(GOLDEN)))


def uniform_np(key, index):
    """float64 uniforms in (0, 1): key and index broadcast (uint64 arrays or ints)."""
    bits = absorb_np(key, index) >> np.uint64(12)
    return (bits.astype(np.float64) + 0.5) * 2.0 ** -52


# --------------------------------------------------------------------------------------------
# The sampler (LLaDA's generate() with the counter RNG).
# --------------------------------------------------------------------------------------------

def schedule(n, steps):
    """Tokens committed at each step of a block with n masks: the first n % steps get one more."""
    base, rem = divmod(n, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def guided_logits(ckpt, x, P, cfg_scale):
    """[L, V] float32 logits of canvas x, with classifier-free guidance when cfg_scale > 0."""
    if cfg_scale > 0:
        un_x = x.copy()
        un_x[:P] = ckpt.mask_token_id
        both = forward(ckpt, np.stack([x, un_x]))
        cond, un = both[0], both[1]
        return (un + F32(cfg_scale + 1.0) * (cond - un)).astype(F32)
    return forward(ckpt, x[None, :])[0]


def _top2_margin(row):
    """(best - second best) / max |finite value| of a score row."""
    finite = row[np.isfinite(row)]
    top = np.sort(finite)[-2:]
    if top.size < 2:
        return math.inf
    scale = max(float(np.max(np.abs(finite))), 1e-30)
    return float(top[1] - top[0]) / scale


def generate(ckpt, prompt_ids, gen_length, steps, block_length, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", seed=0, logits_eos_inf=False,
             confidence_eos_eot_inf=False, eot_id=None):
    """Return (x, diagnostics): x is the int64 canvas (prompt then generation).

    diagnostics["argmax_margin"]: smallest relative gap between the best and second-best score
    of any argmax taken at a committed position. diagnostics["confidence_margin"]: smallest
    relative gap between the k-th and (k+1)-th confidence among eligible positions (pairs of
    -inf confidences are skipped: their order is fixed by position, not by numerics).
    """
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError("gen_length, block_length and steps must be positive")
    if gen_length % block_length:
        raise ValueError("gen_length must be a multiple of block_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError("steps must be a multiple of the number of blocks")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}")
    steps_per_block = steps // num_blocks
    mask, eos = ckpt.mask_token_id, ckpt.eos_token_id

    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    P = prompt.size
    x = np.concatenate([prompt, np.full(gen_length, mask, dtype=np.int64)])
    positions = np.arange(x.size)
    diag = {"argmax_margin": math.inf, "confidence_margin": math.inf,
            "schedule": [], "forwards": 0, "neg_inf_confidences": 0}

    for b in range(num_blocks):
        block_end = P + (b + 1) * block_length
        n = int(np.sum(x[P + b * block_length:block_end] == mask))
        ks = schedule(n, steps_per_block)
        diag["schedule"].append(ks)
        for i, k in enumerate(ks):
            step = b * steps_per_block + i
            if k == 0:
                continue
            eligible = positions[(x == mask) & (positions < block_end)]
            guided = guided_logits(ckpt, x, P, cfg_scale)
            diag["forwards"] += 1
            # the mask token is never proposed (committing it would leave the
            # position masked); remask's spec, stricter than LLaDA's generate()
            guided[:, mask] = -np.inf
            if logits_eos_inf:
                guided[:, eos] = -np.inf

            x0, conf, margins = {}, {}, {}
            for pos in eligible:
                g = guided[pos]
                if temperature == 0:
                    score = g
                else:
                    u = uniform_np(key_int(seed, STREAM_GUMBEL, step, int(pos)),
                                   np.arange(g.size, dtype=np.uint64))
                    score = g.astype(np.float64) - temperature * np.log(-np.log(u))
                tok = int(np.argmax(score))
                margins[pos] = _top2_margin(score)
                if remasking == "low_confidence":
                    g64 = g.astype(np.float64)
                    m = np.max(g64)
                    c = math.exp(g64[tok] - m) / float(np.sum(np.exp(g64 - m)))
                else:
                    c = uniform_int(key_int(seed, STREAM_REMASK, step, int(pos)), 0)
                if confidence_eos_eot_inf and (tok == eos or (eot_id is not None and tok == eot_id)):
                    c = -math.inf
                    diag["neg_inf_confidences"] += 1
                x0[pos], conf[pos] = tok, c

            ranked = sorted(eligible, key=lambda p: (-conf[p], p))
            for p in ranked[:k]:
                x[p] = x0[p]
                diag["argmax_margin"] = min(diag["argmax_margin"], margins[p])
            if len(ranked) > k:
                hi, lo = conf[ranked[k - 1]], conf[ranked[k]]
                if hi != -math.inf:
                    rel = (hi - lo) / abs(hi) if hi != 0 else math.inf
                    diag["confidence_margin"] = min(diag["confidence_margin"], rel)
    return x, diag
