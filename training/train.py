"""Train a LLaDA model: `pretrain` on prose, then `sft` on instruction pairs.

    python3 training/train.py pretrain --run runs/demo --steps 7000
    python3 training/train.py sft      --run runs/demo --steps 1200
    python3 training/export.py --run runs/demo --stage sft --out models/demo

A run directory holds the tokenizer (training/tokenizer.py writes it), one
folder per stage with `state.pt` (model + optimiser, so a stopped run resumes
where it was) and `log.jsonl` (one line per logged step: training loss,
held-out loss, learning rate, tokens seen, seconds). Every random draw comes
from generators seeded by --seed, so a run is deterministic for a seed on a
given machine and thread count.

Matrix products run under bf16 autocast (parameters and the optimiser stay
f32): on a CPU with AVX512-BF16 about 2x the f32 speed. `--device cuda` trains
on a GPU with the same code and the same draws (they are made on the CPU).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llada import LLaDA, Config  # noqa: E402
from objectives import pretrain_loss, random_length, sft_loss  # noqa: E402
import tokenizer as tk  # noqa: E402

# Model shapes. `demo` is the shipped default (8.5M parameters, 17 MB in bf16).
PRESETS = {
    "demo": dict(d_model=256, n_heads=4, n_kv_heads=4, n_layers=8, mlp_hidden_size=704),
    "tiny": dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def load_tokenizer(run):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(run, "tokenizer.json"))
    return tok, {s: tok.token_to_id(s) for s in tk.SPECIALS}


def pretrain_tokens(run, data, split):
    """The split as one stream: BOS paragraph EOS BOS paragraph EOS ... (cached)."""
    cache = os.path.join(run, f"tokens_{split}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    tok, sp = load_tokenizer(run)
    with open(os.path.join(data, f"pretrain_{split}.txt"), encoding="utf-8") as f:
        paras = [line.rstrip("\n") for line in f if line.strip()]
    eos = sp["<|endoftext|>"]
    stream = []
    for enc in tok.encode_batch(paras):  # the post-processor puts BOS first
        stream.extend(enc.ids)
        stream.append(eos)
    arr = np.asarray(stream, dtype=np.int32)
    np.save(cache, arr)
    return arr


def window_batch(stream, batch, length, gen):
    """`batch` windows of `length` tokens at random offsets of the stream."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen).numpy()
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]).astype(np.int64))


def sft_pairs(run, data, split):
    """(ids, prompt length) per pair: the chat prompt as remask renders it, then
    the response closed by <|eot_id|>."""
    tok, sp = load_tokenizer(run)
    with open(os.path.join(data, f"sft_{split}.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    prompts = tok.encode_batch([tk.render_chat(p["prompt"]) for p in pairs], add_special_tokens=False)
    answers = tok.encode_batch([p["response"] for p in pairs], add_special_tokens=False)
    eot = sp["<|eot_id|>"]
    return [(np.asarray(p.ids + a.ids + [eot], dtype=np.int64), len(p.ids)) for p, a in zip(prompts, answers)]


def sft_batch(pairs, batch, eos, gen):
    """`batch` pairs, padded with EOS to the longest (LLaDA pads to the batch length;
    the padding is part of the response and of the loss)."""
    idx = torch.randint(0, len(pairs), (batch,), generator=gen).tolist()
    n = max(len(pairs[i][0]) for i in idx)
    ids = torch.full((batch, n), eos, dtype=torch.int64)
    plen = torch.empty(batch, dtype=torch.int64)
    for row, i in enumerate(idx):
        seq, p = pairs[i]
        ids[row, :len(seq)] = torch.from_numpy(seq)
        plen[row] = p
    return ids, plen


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

def lr_at(step, total, peak, warmup, decay):
    """Warm-up, stable, decay (WSD): linear warm-up to the peak, flat, then a
    cosine down to 10% over the last `decay` steps. The flat phase makes the
    run's length a decision that can be taken late: a resumed run with a
    larger --steps simply stays flat longer."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = total - decay
    if step < start:
        return peak
    frac = (step - start) / max(1, decay)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def build_model(run, preset, seq_len):
    _, sp = load_tokenizer(run)
    vocab = max(sp.values()) + 1  # the mask is the last id
    cfg = Config(**PRESETS[preset], embedding_size=vocab, vocab_size=vocab, max_sequence_length=seq_len,
                 mask_token_id=sp["<|mdm_mask|>"], eos_token_id=sp["<|endoftext|>"])
    return cfg


def save_state(path, model, opt, step, cfg, meta):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "config": cfg.__dict__, "meta": meta}, tmp)
    os.replace(tmp, path)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def run_stage(a):
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    out = os.path.join(a.run, a.stage)
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "state.pt")
    _, sp = load_tokenizer(a.run)
    mask_id, eos = sp["<|mdm_mask|>"], sp["<|endoftext|>"]

    if os.path.exists(state_path):
        st = load_state(state_path)
        cfg = Config(**st["config"])
        log(f"resuming {a.stage} at step {st['step']}")
    elif a.stage == "sft":
        st = load_state(os.path.join(a.run, "pretrain", "state.pt"))
        cfg = Config(**st["config"])
        st = {"model": st["model"], "opt": None, "step": 0}
    else:
        cfg = build_model(a.run, a.preset, a.seq_len)
        st = None
    model = LLaDA(cfg)
    if st is None:
        model.init_weights(a.seed)
    else:
        model.load_state_dict(st["model"])
    dev = torch.device(a.device)
    model.to(dev)  # before the optimiser, whose loaded state follows the parameters
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": a.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    step = 0
    if st is not None and st.get("opt") is not None:
        opt.load_state_dict(st["opt"])
        step = st["step"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{a.stage}: {n_params / 1e6:.2f}M parameters, {cfg}")

    train_stream = pretrain_tokens(a.run, a.data, "train")
    valid_stream = pretrain_tokens(a.run, a.data, "valid")
    if a.stage == "sft":
        train_pairs, valid_pairs = sft_pairs(a.run, a.data, "train"), sft_pairs(a.run, a.data, "valid")
        log(f"sft: {len(train_pairs)} training pairs, {len(valid_pairs)} held out")
    log(f"pretrain tokens: {len(train_stream)} train, {len(valid_stream)} held out")

    # Draws are keyed by (seed, step) so a resumed run continues the same sequence.
    def gen_for(step, salt=0):
        return torch.Generator().manual_seed(a.seed * 1_000_003 + step * 7 + salt)

    def loss_of(ids_or_pair, g):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            if isinstance(ids_or_pair, tuple):
                return sft_loss(model, ids_or_pair[0].to(dev), ids_or_pair[1].to(dev), mask_id, g)
            return pretrain_loss(model, ids_or_pair.to(dev), mask_id, g)

    @torch.no_grad()
    def held_out():
        """Mean loss over fixed held-out batches with fixed masks."""
        model.eval()
        res = {}
        g = torch.Generator().manual_seed(12345)
        res["valid_loss"] = float(np.mean([loss_of(window_batch(valid_stream, a.batch, cfg.max_sequence_length, g), g)[0].item()
                                           for _ in range(a.eval_batches)]))
        if a.stage == "sft":
            g = torch.Generator().manual_seed(12345)
            res["valid_sft_loss"] = float(np.mean([loss_of(sft_batch(valid_pairs, a.batch, eos, g), g)[0].item()
                                                   for _ in range(a.eval_batches)]))
        model.train()
        return res

    logf = open(os.path.join(out, "log.jsonl"), "a")
    t0, tokens, recent, first = time.time(), 0, [], step
    model.train()
    while step < a.steps:
        lr = lr_at(step, a.steps, a.lr, a.warmup, a.decay)
        for group in opt.param_groups:
            group["lr"] = lr
        g = gen_for(step)
        # SFT keeps some prose in the mix so the model still writes after it learns to answer.
        if a.stage == "sft" and torch.rand(1, generator=g).item() >= a.prose_fraction:
            batch = sft_batch(train_pairs, a.batch, eos, g)
            kind = "sft"
        else:
            batch = random_length(window_batch(train_stream, a.batch, cfg.max_sequence_length, g), g)
            kind = "pretrain"
        loss, _ = loss_of(batch, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += (batch[0] if isinstance(batch, tuple) else batch).numel()
        recent.append((kind, loss.item()))
        if step % a.log_every == 0 or step == a.steps:
            rec = {"step": step, "lr": lr, "tokens": tokens, "seconds": round(time.time() - t0, 1)}
            for k in ("pretrain", "sft"):
                vals = [v for kk, v in recent if kk == k]
                if vals:
                    rec[f"{k}_loss"] = float(np.mean(vals))
            recent = []
            if step % a.eval_every == 0 or step == a.steps:
                rec.update(held_out())
                save_state(state_path, model, opt, step, cfg, vars(a))
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            rate = tokens / max(1e-9, time.time() - t0)
            eta = (a.steps - step) * (time.time() - t0) / (step - first)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
                + f" tok/s={rate:.0f} eta={eta / 60:.1f}min")
    save_state(state_path, model, opt, step, cfg, vars(a))
    log(f"{a.stage} done: {step} steps in {time.time() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["pretrain", "sft"])
    ap.add_argument("--run", required=True, help="run directory (holds tokenizer.json)")
    ap.add_argument("--data", default="training/data/out")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=256, help="pre-training window (and max_sequence_length)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (pretrain 2e-3, sft 5e-4)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--decay", type=int, default=None, help="steps of the final LR decay (default: 20%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--prose-fraction", type=float, default=0.3, help="sft: share of steps on prose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="f32 matrix products")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=8)
    a = ap.parse_args()
    if a.lr is None:
        a.lr = 2e-3 if a.stage == "pretrain" else 5e-4
    if a.warmup is None:
        a.warmup = min(200, a.steps // 10) if a.stage == "pretrain" else min(50, a.steps // 10)
    if a.decay is None:
        a.decay = a.steps // 5
    run_stage(a)


if __name__ == "__main__":
    main()
