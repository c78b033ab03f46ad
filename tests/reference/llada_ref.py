"""An independent numpy reference of LLaDA: checkpoint reader, forward pass and sampler.

Written from docs/LLADA.md (and the sampler contract in tests/reference/README.md),
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


def attention(ckpt, h, i, cos, sin, cache=None):
    """h: [B, n, d] (the fed rows), cos/sin: their RoPE rows. cache: see KVCache."""
    B, T, _ = h.shape
    H, KV, hd = ckpt.n_heads, ckpt.n_kv_heads, ckpt.head_dim
    p = f"blocks.{i}."
    q = (h @ ckpt.w(p + "q_proj.weight").T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    k = (h @ ckpt.w(p + "k_proj.weight").T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    v = (h @ ckpt.w(p + "v_proj.weight").T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None and cache.fed is None:
        cache.keys.append(k)            # a full forward: store every position's K/V (after RoPE)
        cache.values.append(v)
    elif cache is not None:
        # a cached step: the fed rows' K/V are fresh (and not stored), every other position's
        # come from the store of this layer; the queries (fed rows) attend to all positions
        lo, hi = cache.fed
        keys, values = cache.keys[i].copy(), cache.values[i].copy()
        keys[:, :, lo:hi], values[:, :, lo:hi] = k, v
        k, v = keys, values
    # kv head j serves query heads j*g .. (j+1)*g-1 (repeat_interleave, as HF Llama).
    g = H // KV
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * F32(1.0 / math.sqrt(hd))  # no mask: bidirectional
    out = softmax_f32(scores) @ v                                        # [B, H, T, hd]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, H * hd)
    return out @ ckpt.w(p + "attn_out.weight").T


class KVCache:
    """Fast-dLLM's K/V store of a batch of sequences (cache modes "prefix" and "dual"): every
    layer's keys and values after RoPE, [B, n_kv_heads, T, head_dim], at the absolute positions
    0..T-1 of the sequence.

    fed None: the next forward(ckpt, ids, cache) is the full forward, and it (re)fills the store.
    fed (lo, hi): the next forwards feed only rows lo..hi-1 of ids (their embeddings, q/k/v with
    RoPE at their absolute positions, attention over all T positions with the K/V of the others
    taken from the store, attn_out/MLP/norm/head for those rows) and return their logits
    [B, hi - lo, V]; the fresh K/V are not written into the store.
    """

    def __init__(self):
        self.keys, self.values, self.fed = [], [], None


def forward(ckpt, ids, cache=None):
    """ids: int array [B, T] -> float32 logits [B, T, embedding_size]; with a KVCache, the full
    forward that fills it (cache.fed None), or only the fed rows' logits (see KVCache)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError("ids must be [B, T]")
    T = ids.shape[1]
    lo, hi = (0, T) if cache is None or cache.fed is None else cache.fed
    if cache is not None and cache.fed is None:
        cache.keys, cache.values = [], []
    elif cache is not None and not (
            0 <= lo < hi <= T and cache.keys[0].shape[:3] == (ids.shape[0], ckpt.n_kv_heads, T)):
        raise ValueError("the fed rows or the sequences do not match the K/V store")
    eps = ckpt.rms_norm_eps
    cos, sin = rope_cos_sin(T, ckpt.head_dim, ckpt.rope_theta)
    cos, sin = cos[lo:hi], sin[lo:hi]         # absolute positions of the fed rows
    x = ckpt.w("wte.weight")[ids[:, lo:hi]].astype(F32)
    for i in range(ckpt.n_layers):
        p = f"blocks.{i}."
        h = rms_norm(x, ckpt.w(p + "attn_norm.weight"), eps)
        x = (x + attention(ckpt, h, i, cos, sin, cache)).astype(F32)
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


def guided_logits(ckpt, x, P, cfg_scale, cache=None):
    """[L, V] float32 logits of canvas x, with classifier-free guidance when cfg_scale > 0 (the
    unconditional sequence, prompt masked, is the second row of the batch: its own K/V store).
    With a KVCache whose fed is (lo, hi), the [hi - lo, V] logits of those rows."""
    fwd = forward if cache is None else (lambda m, ids: forward(m, ids, cache))
    if cfg_scale > 0:
        un_x = x.copy()
        un_x[:P] = ckpt.mask_token_id
        both = fwd(ckpt, np.stack([x, un_x]))
        cond, un = both[0], both[1]
        return (un + F32(cfg_scale + 1.0) * (cond - un)).astype(F32)
    return fwd(ckpt, x[None, :])[0]


def _top2_margin(row):
    """(best - second best) / max |finite value| of a score row."""
    finite = row[np.isfinite(row)]
    top = np.sort(finite)[-2:]
    if top.size < 2:
        return math.inf
    scale = max(float(np.max(np.abs(finite))), 1e-30)
    return float(top[1] - top[0]) / scale


def _rel(a, b):
    """Relative distance |a - b| / max(|a|, |b|) of two decision values; inf when either is not
    finite (an infinite value is never a near-tie: its side is fixed, not numerical)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def _adjacent_margin(values, upto):
    """Smallest _rel between neighbours values[j], values[j + 1] for j < upto (pairs that are
    both infinite are skipped: their order is fixed by position)."""
    m = math.inf
    for j in range(min(upto, len(values) - 1)):
        a, b = values[j], values[j + 1]
        if math.isinf(a) and math.isinf(b):
            continue
        m = min(m, _rel(a, b))
    return m


# Every rule below takes the candidates as a list of (position, value) and returns
# (positions to commit, in rank order; {"threshold": margin, "order": margin}), where
# "threshold" is the smallest relative distance of a compared value to what it was compared
# with, and "order" the smallest relative gap between neighbours in the order whose swap could
# change the decision.

def _by_confidence(cands):
    return sorted(cands, key=lambda pc: (-pc[1], pc[0]))  # descending, ties: lower position


def select_threshold(cands, tau):
    """Every candidate with confidence >= tau, and always the most confident one."""
    ranked = _by_confidence(cands)
    chosen = [p for p, c in ranked if c >= tau]
    if not chosen:
        chosen = [ranked[0][0]]
    th = min([_rel(c, tau) for _, c in ranked] or [math.inf])
    order = math.inf
    if len(chosen) == 1 and len(ranked) > 1 and ranked[0][1] < tau:
        # nothing passed: which one is the most confident decides
        if ranked[0][1] != -math.inf:
            order = _rel(ranked[0][1], ranked[1][1])
    return chosen, {"threshold": th, "order": order}


def factor_threshold(f, i):
    """The threshold of 0-based rank i under factor f: -1 for i = 0, else 1 - f / (n + 1), n = i + 1."""
    return -1.0 if i == 0 else 1.0 - f / (i + 2)


def select_factor(cands, f):
    """Fast-dLLM's dynamic rule: ranked c_1 >= c_2 >= ..., take up to the first failure of
    c_n >= 1 - f/(n+1); at least one; all when the first failure is the last or none fails."""
    ranked = _by_confidence(cands)
    c = [v for _, v in ranked]
    n = len(c)
    fail = None
    for i in range(n):
        if c[i] < factor_threshold(f, i):
            fail = i
            break
    if fail is None or fail == n - 1:
        take = n
    elif fail == 0:
        take = 1
    else:
        take = fail
    last = n - 1 if fail is None else fail       # the last rank that was compared
    th = min([_rel(c[i], factor_threshold(f, i)) for i in range(1, last + 1)] or [math.inf])
    return [p for p, _ in ranked[:take]], {"threshold": th, "order": _adjacent_margin(c, last)}


def select_entropy(cands, gamma):
    """EB-sampler: ranked H_1 <= H_2 <= ... (ties: lower position), the longest prefix 1..k with
    H_1 + ... + H_{k-1} <= gamma (so k >= 1)."""
    ranked = sorted(cands, key=lambda ph: (ph[1], ph[0]))
    h = [v for _, v in ranked]
    k, s, th = 1, 0.0, math.inf
    for j in range(1, len(h)):
        s += h[j - 1]
        th = min(th, _rel(s, gamma))
        if s <= gamma:
            k = j + 1
        else:
            break
    return [p for p, _ in ranked[:k]], {"threshold": th, "order": _adjacent_margin(h, k)}


def select_fixed(cands, k):
    """The k most confident (ties: lower position); the margin is that of the k-th to the next."""
    ranked = _by_confidence(cands)
    order = math.inf
    if len(ranked) > k:
        hi, lo = ranked[k - 1][1], ranked[k][1]
        if hi != -math.inf:
            order = (hi - lo) / abs(hi) if hi != 0 else math.inf
    return [p for p, _ in ranked[:k]], {"threshold": math.inf, "order": order}


def entropy(g64):
    """-sum p log p of softmax(g64) (float64; -inf entries have p = 0 and contribute 0)."""
    m = np.max(g64)
    e = np.exp(g64 - m)
    p = e / np.sum(e)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


RULES = ("fixed", "threshold", "factor", "entropy")
CACHES = ("none", "prefix", "dual")


def check_rule(rule, value):
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}")
    if rule == "fixed":
        return
    v = float(value) if value is not None else math.nan
    # comparisons with NaN are false: NaN is refused by every rule
    if not {"threshold": 0 < v <= 1, "factor": v > 0, "entropy": v >= 0}[rule]:
        raise ValueError(f"bad value {value!r} for rule {rule}")


def stop_index(gen, mask, stops):
    """Index of the first stop token of the generated span when everything before it is
    committed, else None (a mask comes first, or there is no stop token)."""
    for s, t in enumerate(gen):
        if t == mask:
            return None
        if t in stops:
            return s
    return None


def min_margin(diag):
    """The smallest of all decision margins of a generate() run."""
    return min(diag["argmax_margin"], diag["confidence_margin"], diag["threshold_margin"],
               diag["entropy_margin"])


def generate(ckpt, prompt_ids, gen_length, steps, block_length, temperature=0.0, cfg_scale=0.0,
             remasking="low_confidence", seed=0, logits_eos_inf=False,
             confidence_eos_eot_inf=False, eot_id=None, rule="fixed", rule_value=None,
             early_stop=False, cache="none"):
    """Return (x, diagnostics): x is the int64 canvas (prompt then generation).

    rule: "fixed" (LLaDA's schedule: `steps` over the blocks), or an adaptive rule that loops
    each block until it has no mask ("threshold" tau, "factor" f, "entropy" gamma, given as
    rule_value; `steps` is ignored and may be None). The step index keying the RNG is
    b * steps_per_block + i under fixed, the global 0-based count of steps taken otherwise.
    early_stop: after each step's commits, when the first non-committed-or-stop position of the
    generated span is a stop token (EOS, or eot_id) at s, set generation[s+1:] to EOS and stop.

    diagnostics: "argmax_margin", smallest relative gap between the best and second-best score
    of any argmax taken at a committed position; "confidence_margin", smallest relative gap
    between neighbouring confidences in the rank order where a swap would change the decision
    (fixed: the k-th and (k+1)-th; -inf pairs skipped); "threshold_margin", smallest relative
    distance of a confidence to tau or to factor's 1 - f/(n+1), or of a partial entropy sum to
    gamma; "entropy_margin", smallest relative gap between neighbouring entropies in the order
    up to the commit boundary; "forwards", "per_step" (commits of each step that ran a
    forward), "steps" (steps taken, those of the fixed schedule that commit nothing included),
    "schedule" (fixed only), "stopped_at" (index in the generation of the stop token
    early stop ended on, else None), "stop_waits" (steps after which early stop found a
    committed stop token with a mask before it, so went on), "finish_reason" ("stop" when the
    generation holds EOS or EoT, else "length"), "cache", "full_forwards" (forwards over the
    whole sequence: all of them without a cache, the first of each block with one).

    cache: "none", or Fast-dLLM's K/V cache: the first forward of each block is the full one
    and stores every layer's K/V (KVCache); every later step of the block feeds only
    [block_start, len) ("prefix") or [block_start, block_end) ("dual") and takes every other
    position's K/V from the store, which is never refreshed inside the block.
    """
    if gen_length <= 0 or block_length <= 0:
        raise ValueError("gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError("gen_length must be a multiple of block_length")
    num_blocks = gen_length // block_length
    check_rule(rule, rule_value)
    if rule == "fixed":
        if steps is None or steps <= 0:
            raise ValueError("steps must be positive")
        if steps % num_blocks:
            raise ValueError("steps must be a multiple of the number of blocks")
        steps_per_block = steps // num_blocks
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}")
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}")
    mask, eos = ckpt.mask_token_id, ckpt.eos_token_id
    stops = {eos} if eot_id is None else {eos, int(eot_id)}

    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    P = prompt.size
    x = np.concatenate([prompt, np.full(gen_length, mask, dtype=np.int64)])
    positions = np.arange(x.size)
    diag = {"argmax_margin": math.inf, "confidence_margin": math.inf,
            "threshold_margin": math.inf, "entropy_margin": math.inf,
            "schedule": [], "forwards": 0, "per_step": [], "neg_inf_confidences": 0,
            "stopped_at": None, "stop_waits": 0, "steps": 0, "cache": cache,
            "full_forwards": 0}

    stopped = False
    for b in range(num_blocks):
        if stopped:
            break
        block_start, block_end = P + b * block_length, P + (b + 1) * block_length
        store = None            # the block's K/V store, filled by its first forward
        if rule == "fixed":
            n = int(np.sum(x[block_start:block_end] == mask))
            ks = schedule(n, steps_per_block)
            diag["schedule"].append(ks)
        i = 0
        while True:
            if rule == "fixed":
                if i == steps_per_block:
                    break
                step, k = b * steps_per_block + i, ks[i]
                i += 1
                diag["steps"] += 1
                if k == 0:
                    continue
            else:
                if not np.any(x[block_start:block_end] == mask):
                    break
                step, k = diag["forwards"], None   # one forward per step: the global count
                diag["steps"] += 1
            eligible = positions[(x == mask) & (positions < block_end)]
            lo = 0                  # guided[r] is the logits row of position lo + r
            if cache == "none":
                guided = guided_logits(ckpt, x, P, cfg_scale)
                diag["full_forwards"] += 1
            elif store is None:     # the block's first forward: full, and fills the store
                store = KVCache()
                guided = guided_logits(ckpt, x, P, cfg_scale, store)
                diag["full_forwards"] += 1
                store.fed = (block_start, x.size if cache == "prefix" else block_end)
            else:                   # a later step: only the fed rows, the rest from the store
                lo = store.fed[0]
                guided = guided_logits(ckpt, x, P, cfg_scale, store)
                assert eligible.min() >= lo, "a masked position outside the fed rows"
            diag["forwards"] += 1
            # the mask token is never proposed (committing it would leave the
            # position masked); remask's spec, stricter than LLaDA's generate()
            guided[:, mask] = -np.inf
            if logits_eos_inf:
                guided[:, eos] = -np.inf

            x0, conf, ent, margins = {}, {}, {}, {}
            for pos in eligible:
                pos = int(pos)
                g = guided[pos - lo]
                if temperature == 0:
                    score = g
                else:
                    u = uniform_np(key_int(seed, STREAM_GUMBEL, step, pos),
                                   np.arange(g.size, dtype=np.uint64))
                    score = g.astype(np.float64) - temperature * np.log(-np.log(u))
                tok = int(np.argmax(score))
                margins[pos] = _top2_margin(score)
                g64 = g.astype(np.float64)
                if remasking == "low_confidence":
                    m = np.max(g64)
                    c = math.exp(g64[tok] - m) / float(np.sum(np.exp(g64 - m)))
                else:
                    c = uniform_int(key_int(seed, STREAM_REMASK, step, pos), 0)
                h = entropy(g64) if rule == "entropy" else math.nan
                if confidence_eos_eot_inf and tok in stops:
                    c, h = -math.inf, math.inf
                    diag["neg_inf_confidences"] += 1
                x0[pos], conf[pos], ent[pos] = tok, c, h

            cands = [(int(p), conf[int(p)]) for p in eligible]
            if rule == "fixed":
                chosen, mg = select_fixed(cands, k)
            elif rule == "threshold":
                chosen, mg = select_threshold(cands, float(rule_value))
            elif rule == "factor":
                chosen, mg = select_factor(cands, float(rule_value))
            else:
                chosen, mg = select_entropy([(int(p), ent[int(p)]) for p in eligible],
                                            float(rule_value))
            for p in chosen:
                x[p] = x0[p]
                diag["argmax_margin"] = min(diag["argmax_margin"], margins[p])
            diag["per_step"].append(len(chosen))
            diag["threshold_margin"] = min(diag["threshold_margin"], mg["threshold"])
            key = "entropy_margin" if rule == "entropy" else "confidence_margin"
            diag[key] = min(diag[key], mg["order"])

            if early_stop:
                s = stop_index(x[P:].tolist(), mask, stops)
                if s is None and stops & set(x[P:].tolist()):
                    diag["stop_waits"] += 1      # a committed stop token behind a mask
                if s is not None:
                    x[P + s + 1:] = eos
                    diag["stopped_at"] = s
                    stopped = True
                    break
    diag["finish_reason"] = "stop" if any(int(t) in stops for t in x[P:]) else "length"
    return x, diag
