"""Test support: a small safetensors/checkpoint writer (the reference itself only reads)."""

import json
import os

import numpy as np


def _bf16_bits(a):
    """Round-to-nearest-even f32 -> bf16 bits (only used to make test data)."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2")


def write_safetensors(path, tensors, dtype="F32"):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        if dtype == "F32":
            raw = np.asarray(arr, dtype="<f4").tobytes()
        elif dtype == "F16":
            raw = np.asarray(arr, dtype="<f2").tobytes()
        else:
            raw = _bf16_bits(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def make_config(**over):
    c = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
             embedding_size=40, vocab_size=38, rope_theta=10000.0, rms_norm_eps=1e-5,
             max_sequence_length=128, mask_token_id=30, eos_token_id=31, weight_tying=False)
    c.update(over)
    return c


def make_weights(c, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    d, hd = c["d_model"], c["d_model"] // c["n_heads"]
    kv = (c["n_kv_heads"] or c["n_heads"]) * hd
    E = c["embedding_size"] or c["vocab_size"]
    r = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    w = {"model.transformer.wte.weight": r(E, d)}
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        w.update({p + "attn_norm.weight": 1 + r(d), p + "q_proj.weight": r(d, d),
                  p + "k_proj.weight": r(kv, d), p + "v_proj.weight": r(kv, d),
                  p + "attn_out.weight": r(d, d), p + "ff_norm.weight": 1 + r(d),
                  p + "ff_proj.weight": r(c["mlp_hidden_size"], d),
                  p + "up_proj.weight": r(c["mlp_hidden_size"], d),
                  p + "ff_out.weight": r(d, c["mlp_hidden_size"])})
    w["model.transformer.ln_f.weight"] = 1 + r(d)
    if not c["weight_tying"]:
        w["model.transformer.ff_out.weight"] = r(E, d)
    return w


def write_checkpoint(directory, c, w, dtype="F32", shards=1):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(c, f)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), w, dtype)
        return
    names, weight_map = list(w), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: w[n] for n in names[s::shards]}
        write_safetensors(os.path.join(directory, file), part, dtype)
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
