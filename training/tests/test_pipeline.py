"""The trainer end to end on a tiny corpus: tokenizer, both stages, export, and
the exported checkpoint loaded by remask (the binary: $REMASK_BIN, by default
<repo>/target/release/remask).

The corpus is the public-domain text remask's presets use
(crates/remask-model/assets/corpus.txt) plus a few made-up pairs, so these
tests need no fetched data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
TRAINING = HERE.parent
REPO = TRAINING.parent
sys.path.insert(0, str(TRAINING))

from export import export, load_stage  # noqa: E402
from llada import Config, LLaDA  # noqa: E402
import tokenizer as tk  # noqa: E402

BIN = os.environ.get("REMASK_BIN", str(REPO / "target" / "release" / "remask"))
WORDS = ["cat", "dog", "house", "river", "stone", "bread", "light", "king", "ship", "tree"]


def remask(*args):
    if not os.path.exists(BIN):
        pytest.fail(f"no remask binary at {BIN}: build it (cargo build --release -p remask-cli) or set REMASK_BIN")
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    text = (REPO / "crates" / "remask-model" / "assets" / "corpus.txt").read_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    (d / "pretrain_train.txt").write_text("\n".join(paras[:-10]) + "\n")
    (d / "pretrain_valid.txt").write_text("\n".join(paras[-10:]) + "\n")
    for split, words in (("train", WORDS[:8]), ("valid", WORDS[8:])):
        with open(d / f"sft_{split}.jsonl", "w") as f:
            for w in words:
                f.write(json.dumps({"prompt": f'What does "{w}" mean?', "response": f"A kind of {w}.",
                                    "kind": "define", "word": w}) + "\n")
    return d


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    r = tmp_path_factory.mktemp("run")
    tok, config, _ = tk.train(str(data), 512, 64)
    tok.save(str(r / "tokenizer.json"))
    (r / "tokenizer_config.json").write_text(json.dumps(config))
    return r


def train(run, data, stage, steps, seed=0, extra=()):
    cmd = [sys.executable, str(TRAINING / "train.py"), stage, "--run", str(run), "--data", str(data),
           "--preset", "tiny", "--seq-len", "64", "--steps", str(steps), "--batch", "4",
           "--log-every", "5", "--eval-every", "5", "--eval-batches", "1", "--seed", str(seed),
           "--threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in (Path(run) / stage / "log.jsonl").read_text().splitlines()]


def test_tokenizer_has_llada_specials_and_the_chat_template(run):
    ids = tk.special_ids(str(run))
    assert ids["<|mdm_mask|>"] == 511 and len(set(ids.values())) == 6
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert tok.encode("Hello").ids[0] == ids["<|startoftext|>"]
    chat = tok.encode(tk.render_chat('What does "cat" mean?'), add_special_tokens=False).ids
    assert chat[:2] == [ids["<|startoftext|>"], ids["<|start_header_id|>"]]
    assert chat.count(ids["<|eot_id|>"]) == 1


def test_both_stages_train_log_and_are_deterministic(run, data, tmp_path):
    logs = train(run, data, "pretrain", 20)
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert all(np.isfinite(r["pretrain_loss"]) and np.isfinite(r["valid_loss"]) for r in logs)
    assert logs[-1]["valid_loss"] < logs[0]["valid_loss"], "held-out loss did not go down"
    sft = train(run, data, "sft", 10)
    assert all("valid_sft_loss" in r for r in sft)

    # Same seed, fresh run directory: the same weights, bit for bit.
    again = tmp_path / "again"
    again.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (again / name).write_bytes((run / name).read_bytes())
    train(again, data, "pretrain", 20)
    a, _ = load_stage(str(run), "pretrain")
    b, _ = load_stage(str(again), "pretrain")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name

    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((run / name).read_bytes())
    train(other, data, "pretrain", 5, seed=1)
    c, _ = load_stage(str(other), "pretrain")
    assert not torch.equal(a.state_dict()["model.transformer.wte.weight"], c.state_dict()["model.transformer.wte.weight"])


@pytest.mark.parametrize("tying", [False, True])
def test_export_then_remask_gives_the_same_logits_in_f32(run, tmp_path, tying):
    ids = tk.special_ids(str(run))
    cfg = Config(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96, embedding_size=512,
                 vocab_size=512, max_sequence_length=64, rope_theta=10000.0, weight_tying=tying,
                 mask_token_id=ids["<|mdm_mask|>"], eos_token_id=ids["<|endoftext|>"])
    model = LLaDA(cfg).init_weights(3)
    # Larger than init scale, so the check is not dominated by near-zero logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
            else:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    out = tmp_path / "ckpt"
    export(model, str(run), str(out), "f32")
    seqs = [[ids["<|startoftext|>"], 17, 300, ids["<|mdm_mask|>"], 42, 5, ids["<|mdm_mask|>"], 99, 7],
            [ids["<|startoftext|>"], 1, 2, 3, ids["<|mdm_mask|>"], ids["<|mdm_mask|>"], 400, 500, 8]]
    npy = tmp_path / "logits.npy"
    res = remask("forward", "--model", str(out), "--ids", ",".join(map(str, seqs[0])),
                 "--ids", ",".join(map(str, seqs[1])), "--out", str(npy))
    assert res.returncode == 0, res.stderr
    theirs = np.load(npy)
    with torch.no_grad():
        ours = model(torch.tensor(seqs)).numpy()
    assert theirs.shape == ours.shape
    scale = np.abs(ours).max()
    assert scale > 1.0
    diff = np.abs(theirs - ours).max()
    assert diff <= 1e-4 * max(1.0, scale), f"max |diff| {diff} (logit scale {scale})"
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_bf16_export_is_what_remask_computes_with(run, tmp_path):
    """bf16 on disk: remask widens it exactly, so its logits match PyTorch run in f32
    on the bf16-rounded weights."""
    ids = tk.special_ids(str(run))
    cfg = Config(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=96, embedding_size=512,
                 vocab_size=512, max_sequence_length=64, mask_token_id=ids["<|mdm_mask|>"],
                 eos_token_id=ids["<|endoftext|>"])
    model = LLaDA(cfg).init_weights(5)
    out = tmp_path / "ckpt"
    export(model, str(run), str(out), "bf16")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    seq = [ids["<|startoftext|>"], 10, 20, 30, ids["<|mdm_mask|>"], 40]
    npy = tmp_path / "logits.npy"
    res = remask("forward", "--model", str(out), "--ids", ",".join(map(str, seq)), "--out", str(npy))
    assert res.returncode == 0, res.stderr
    with torch.no_grad():
        ours = model(torch.tensor([seq])).numpy()
    assert np.abs(np.load(npy) - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())


def test_exported_checkpoint_generates_with_the_chat_template(run, data, tmp_path):
    model, _ = load_stage(str(run), "sft") if (run / "sft" / "state.pt").exists() else (None, None)
    if model is None:
        train(run, data, "pretrain", 10)
        train(run, data, "sft", 5)
        model, _ = load_stage(str(run), "sft")
    out = tmp_path / "ckpt"
    export(model, str(run), str(out), "bf16")
    res = remask("generate", "--model", str(out), "--chat", "--prompt", 'What does "cat" mean?',
                 "--gen-length", "8", "--steps", "8", "--block-length", "8", "--json")
    assert res.returncode == 0, res.stderr
    v = json.loads(res.stdout)
    assert v["random_weights"] is False
    assert len(v["generated_ids"]) == 8
    assert v["prompt_ids"][:2] == [tk.special_ids(str(run))["<|startoftext|>"],
                                   tk.special_ids(str(run))["<|start_header_id|>"]]
