#!/usr/bin/env python3
"""PyTorch float32 CPU reference: time one full LLaDA forward pass.

Loads a checkpoint directory in the Hugging Face LLaDA layout (config.json plus
model.safetensors, or the shards listed in model.safetensors.index.json), widens
every weight to float32 and runs a plain, module-free forward with the same math
as the remask engine (see docs/LLADA.md):

  x = wte[ids]
  per layer:  h = rmsnorm(x, attn_norm)
              x += attn_out(SDPA(rope(q_proj h), rope(k_proj h), v_proj h))   # bidirectional
              h = rmsnorm(x, ff_norm)
              x += ff_out(silu(ff_proj h) * up_proj h)
  logits = head(rmsnorm(x, ln_f))      # head = transformer.ff_out, or wte if weight_tying

Usage:
  python3 bench/torch_forward.py --model DIR --batch 1 --seq-len 320 --iters 5 --json
  python3 bench/torch_forward.py --model DIR --ids 1,2,3 --dump-logits ref.npy

Progress goes to stderr; with --json, stdout holds exactly one JSON line.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PREFIX = "model.transformer."


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{model_dir}: no config.json (expected a Hugging Face LLaDA checkpoint directory)")
    with open(path) as f:
        raw = json.load(f)

    def need(key):
        if raw.get(key) is None:
            raise SystemExit(f"config.json: missing field {key!r}")
        return raw[key]

    d_model = int(need("d_model"))
    n_heads = int(need("n_heads"))
    n_kv_heads = raw.get("n_kv_heads")
    n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
    vocab_size = int(need("vocab_size"))
    embedding_size = raw.get("embedding_size")
    embedding_size = vocab_size if embedding_size is None else int(embedding_size)
    cfg = {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "n_layers": int(need("n_layers")),
        "mlp_hidden_size": int(need("mlp_hidden_size")),
        "vocab_size": vocab_size,
        "embedding_size": embedding_size,
        "rope_theta": float(need("rope_theta")),
        "rms_norm_eps": float(raw.get("rms_norm_eps") if raw.get("rms_norm_eps") is not None else 1e-5),
        "weight_tying": bool(raw.get("weight_tying") or False),
    }
    if d_model % n_heads != 0:
        raise SystemExit(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
    if n_heads % n_kv_heads != 0:
        raise SystemExit(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if (d_model // n_heads) % 2 != 0:
        raise SystemExit("head_dim must be even for RoPE")
    return cfg


def weight_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        # keep the order of first appearance, deduplicated
        files = list(dict.fromkeys(weight_map.values()))
        return [os.path.join(model_dir, name) for name in files]
    if os.path.exists(single):
        return [single]
    raise SystemExit(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json found")


def load_weights(model_dir, cfg):
    from safetensors.torch import load_file

    wanted = {PREFIX + "wte.weight", PREFIX + "ln_f.weight"}
    if not cfg["weight_tying"]:
        wanted.add(PREFIX + "ff_out.weight")
    for i in range(cfg["n_layers"]):
        for name in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out",
                     "ff_norm", "ff_proj", "up_proj", "ff_out"):
            wanted.add(f"{PREFIX}blocks.{i}.{name}.weight")

    weights = {}
    for path in weight_files(model_dir):
        shard = load_file(path, device="cpu")
        for key in list(shard.keys()):
            t = shard.pop(key)  # drop the stored copy as we go (bf16 -> f32 doubles memory)
            if key in wanted:
                weights[key] = t.to(torch.float32).contiguous()
        del shard
    missing = sorted(wanted - weights.keys())
    if missing:
        raise SystemExit(f"missing weights ({len(missing)}): {missing[:8]}")
    return weights


def check_shapes(w, cfg):
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, m, e = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]
    expect = {PREFIX + "wte.weight": (e, d), PREFIX + "ln_f.weight": (d,)}
    if not cfg["weight_tying"]:
        expect[PREFIX + "ff_out.weight"] = (e, d)
    for i in range(cfg["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        expect.update({
            b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,),
            b + "q_proj.weight": (d, d), b + "k_proj.weight": (kv, d), b + "v_proj.weight": (kv, d),
            b + "attn_out.weight": (d, d),
            b + "ff_proj.weight": (m, d), b + "up_proj.weight": (m, d), b + "ff_out.weight": (d, m),
        })
    for key, shape in expect.items():
        if tuple(w[key].shape) != shape:
            raise SystemExit(f"{key}: shape {tuple(w[key].shape)}, expected {shape}")


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    # float32 throughout: x * rsqrt(mean(x^2) + eps), then * weight
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(seq_len, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float32)
    ang = torch.outer(pos, inv_freq)              # [L, hd/2]
    ang = torch.cat((ang, ang), dim=-1)           # [L, hd]
    return ang.cos(), ang.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    # x: [B, H, L, hd]; cos/sin: [L, hd]
    return x * cos + rotate_half(x) * sin


def forward(ids, w, cfg):
    B, L = ids.shape
    d, H, KV = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hd = d // H
    rep = H // KV
    eps = cfg["rms_norm_eps"]

    cos, sin = rope_tables(L, hd, cfg["rope_theta"])
    x = F.embedding(ids, w[PREFIX + "wte.weight"])          # [B, L, d]
    for i in range(cfg["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        h = rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = F.linear(h, w[b + "q_proj.weight"]).view(B, L, H, hd).transpose(1, 2)
        k = F.linear(h, w[b + "k_proj.weight"]).view(B, L, KV, hd).transpose(1, 2)
        v = F.linear(h, w[b + "v_proj.weight"]).view(B, L, KV, hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).reshape(B, L, d)
        x = x + F.linear(att, w[b + "attn_out.weight"])
        h = rms_norm(x, w[b + "ff_norm.weight"], eps)
        h = F.silu(F.linear(h, w[b + "ff_proj.weight"])) * F.linear(h, w[b + "up_proj.weight"])
        x = x + F.linear(h, w[b + "ff_out.weight"])
    x = rms_norm(x, w[PREFIX + "ln_f.weight"], eps)
    head = w[PREFIX + "wte.weight"] if cfg["weight_tying"] else w[PREFIX + "ff_out.weight"]
    return F.linear(x, head)                                  # [B, L, embedding_size]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time one LLaDA forward pass in PyTorch float32 on the CPU.")
    p.add_argument("--model", required=True, help="checkpoint directory (HF LLaDA layout)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--iters", type=int, default=5, help="timed forward passes (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes first (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input ids")
    p.add_argument("--ids", default=None, help="comma-separated input ids; sets batch=1, seq-len=len(ids)")
    p.add_argument("--dump-logits", default=None, metavar="FILE.npy",
                   help="save float32 logits [1, L, embedding_size] of the first timed run (needs --ids)")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.dump_logits and not args.ids:
        p.error("--dump-logits needs --ids so the output can be compared with another engine")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    cfg = load_config(args.model)
    t0 = time.perf_counter()
    w = load_weights(args.model, cfg)
    check_shapes(w, cfg)
    log(f"loaded {args.model}: {cfg['n_layers']} layers, d_model {cfg['d_model']}, "
        f"heads {cfg['n_heads']}/{cfg['n_kv_heads']}, mlp {cfg['mlp_hidden_size']}, "
        f"vocab {cfg['vocab_size']}/{cfg['embedding_size']} in {time.perf_counter() - t0:.1f} s")

    if args.ids:
        try:
            id_list = [int(s) for s in args.ids.replace(" ", "").split(",") if s != ""]
        except ValueError:
            raise SystemExit(f"--ids: not a comma-separated list of integers: {args.ids!r}")
        if not id_list:
            raise SystemExit("--ids is empty")
        bad = [t for t in id_list if not 0 <= t < cfg["embedding_size"]]
        if bad:
            raise SystemExit(f"--ids out of range [0, {cfg['embedding_size']}): {bad[:8]}")
        ids = torch.tensor([id_list], dtype=torch.long)
    else:
        if args.batch < 1 or args.seq_len < 1:
            raise SystemExit("--batch and --seq-len must be >= 1")
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq_len), generator=gen, dtype=torch.long)
    batch, seq_len = ids.shape

    times_ms = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            forward(ids, w, cfg)
        for it in range(args.iters):
            t = time.perf_counter()
            logits = forward(ids, w, cfg)
            times_ms.append((time.perf_counter() - t) * 1000.0)
            if it == 0:
                expect = (batch, seq_len, cfg["embedding_size"])
                if tuple(logits.shape) != expect:
                    raise SystemExit(f"logits shape {tuple(logits.shape)}, expected {expect}")
                if args.dump_logits:
                    import numpy as np
                    np.save(args.dump_logits, logits.to(torch.float32).numpy())
                    log(f"wrote logits {tuple(logits.shape)} to {args.dump_logits}")
            del logits

    median = statistics.median(times_ms)
    if args.json:
        print(json.dumps({
            "impl": "pytorch",
            "ms_per_forward_median": round(median, 3),
            "ms_all": [round(t, 3) for t in times_ms],
            "batch": int(batch),
            "seq_len": int(seq_len),
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }), flush=True)
    else:
        print(f"pytorch f32 cpu: batch {batch} seq_len {seq_len} threads {torch.get_num_threads()}: "
              f"median {median:.2f} ms/forward over {len(times_ms)} iters "
              f"(min {min(times_ms):.2f}, max {max(times_ms):.2f}; torch {torch.__version__})", flush=True)


if __name__ == "__main__":
    main()
