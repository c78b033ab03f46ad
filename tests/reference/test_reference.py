"""remask (the Rust CLI) against the independent numpy reference in llada_ref.py.

The binary is $REMASK_BIN, by default <repo>/target/release/remask (build it first with
`cargo build --release`). Checkpoints are made by `remask model init --preset tiny`.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llada_ref as ref  # noqa: E402
from ckpt_writer import write_safetensors  # noqa: E402

REPO = HERE.parents[1]
BIN = os.environ.get("REMASK_BIN", str(REPO / "target" / "release" / "remask"))
MARGIN = 1e-6   # smallest relative score/confidence gap for an exact comparison to be meaningful
# remask reads REMASK_* variables as option defaults: run it without any that happen to be set.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("REMASK_")}


def remask(*args, timeout=120):
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        pytest.fail(f"remask binary not found at {BIN}: run `cargo build --release` "
                    f"or set REMASK_BIN")
    args = [str(a) for a in args]
    r = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if r.returncode != 0:
        pytest.fail(f"`remask {' '.join(args)}` exited {r.returncode}\n"
                    f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r.stdout


def ids_arg(ids):
    return ",".join(str(int(i)) for i in ids)


# ------------------------------------------------------------------------------- checkpoints

CHECKPOINTS = {
    "f32": ["--dtype", "f32", "--seed", "11"],
    "bf16": ["--dtype", "bf16", "--seed", "12"],
    "f16": ["--dtype", "f16", "--seed", "13"],
    "bf16_shards3": ["--dtype", "bf16", "--seed", "14", "--shards", "3"],
    "f32_theta1e4": ["--dtype", "f32", "--seed", "15", "--rope-theta", "10000"],
    "f32_tied": ["--dtype", "f32", "--seed", "16", "--tie-weights"],
}


class Ckpt:
    def __init__(self, directory):
        self.dir = directory
        self.model = ref.load_checkpoint(directory)
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            self.tokenizer_config = json.load(f)
        self.tokenizer_path = os.path.join(directory, "tokenizer.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint("f32") etc. runs `remask model init`; checkpoint("f32+eos") derives from it a
    checkpoint whose EOS and EoT head rows compete with the tokens the random model favours."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name.replace("+", "_")) / "ckpt"
            if name.endswith("+eos"):
                make_eos_checkpoint(get(name[:-4]), out)
            else:
                remask("model", "init", "--preset", "tiny", "--out", out, *CHECKPOINTS[name])
            cache[name] = Ckpt(str(out))
        return cache[name]

    return get


def make_eos_checkpoint(base, out):
    """A random model almost never predicts EOS/EoT, so logits_eos_inf and
    confidence_eos_eot_inf would not be exercised: copy `base`, replacing the head rows of EOS
    and EoT by the rows of the two tokens it generates most, plus noise. Written with our own
    writer in the base's dtype (which also checks that remask reads a foreign checkpoint)."""
    m = base.model
    counts = collections.Counter()
    for seed in range(3):
        counts.update(ref.generate(m, random_prompt(m, 8, seed), 16, 8, 16)[0][8:].tolist())
    (t1, _), (t2, _) = counts.most_common(2)
    weights = {k: v.copy() for k, v in m.weights.items()}
    head = weights["model.transformer.ff_out.weight"]
    rng = np.random.default_rng(99)
    for target, src in ((m.eos_token_id, t1), (eot_id(base), t2)):
        noise = rng.standard_normal(head.shape[1]).astype(np.float32)
        head[target] = head[src] + noise * np.float32(0.3) * head[src].std()
    os.makedirs(out)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(base.dir, f), out / f)
    (file,) = weight_files(base.dir)
    header = ref.read_safetensors_header(os.path.join(base.dir, file))
    (dtype,) = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    write_safetensors(out / "model.safetensors", weights, dtype)


def weight_files(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def test_checkpoint_files(checkpoint):
    for name, args in CHECKPOINTS.items():
        c = checkpoint(name)
        cfg, m = c.model.config, c.model
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert os.path.exists(os.path.join(c.dir, f)), f"{name}: {f} missing"
        tc = c.tokenizer_config
        assert "chat_template" in tc and "bos_token" in tc and "eos_token" in tc, name
        # the preset's shape
        assert (m.d_model, m.n_heads, m.n_kv_heads, m.n_layers) == (64, 4, 2, 2), name
        # the mask id must not be the last id (a classic off-by-one hiding place)
        assert cfg["mask_token_id"] != m.embedding_size - 1, name
        assert cfg["mask_token_id"] < m.vocab_size, name
        files = weight_files(c.dir)
        if "--shards" in args:
            n = int(args[args.index("--shards") + 1])
            assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        else:
            assert files == ["model.safetensors"]
        want = {"f32": "F32", "bf16": "BF16", "f16": "F16"}[args[args.index("--dtype") + 1]]
        for f in files:
            header = ref.read_safetensors_header(os.path.join(c.dir, f))
            dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            assert dtypes == {want}, (name, f, dtypes)
        if "--rope-theta" in args:
            assert m.rope_theta == float(args[args.index("--rope-theta") + 1])
        has_head = "model.transformer.ff_out.weight" in m.weights
        assert m.weight_tying == ("--tie-weights" in args) and has_head == (not m.weight_tying), name


# ------------------------------------------------------------------------------- logits

def read_npy_v1_f32(path):
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        assert version == (1, 0), f"npy version {version}, expected 1.0"
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        assert dtype == np.dtype("<f4") and not fortran, (dtype, fortran)
    return np.load(path)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_reference(checkpoint, tmp_path, name):
    c = checkpoint(name)
    m = c.model
    rng = np.random.default_rng(list(CHECKPOINTS).index(name))
    ids = rng.integers(0, m.vocab_size, size=(2, 24))
    ids[ids == m.mask_token_id] = 1
    ids[0, 5] = m.mask_token_id
    ids[1, 17] = m.mask_token_id
    out = tmp_path / "logits.npy"
    remask("forward", "--model", c.dir, "--ids", ids_arg(ids[0]), "--ids", ids_arg(ids[1]),
           "--out", out)
    got = read_npy_v1_f32(out)
    want = ref.forward(m, ids)
    assert got.shape == want.shape == (2, 24, m.embedding_size)
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    assert err / scale < 1e-4, f"{name}: max|diff| {err:.3e}, max|logit| {scale:.3e}"


# ------------------------------------------------------------------------------- tokenizer

def tokenizer(c):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(c.tokenizer_path)


def special(tc, key):
    tok = tc.get(key)
    return tok.get("content") if isinstance(tok, dict) else tok


def chat_prompt_ids(c, text):
    """tokenizer_config.json's chat_template rendered with jinja2 as HF transformers does,
    then encoded without adding special tokens."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RuntimeError(msg)

    tc = c.tokenizer_config
    template = tc["chat_template"]
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}["default"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    rendered = env.from_string(template).render(
        messages=[{"role": "user", "content": text}], add_generation_prompt=True,
        bos_token=special(tc, "bos_token"), eos_token=special(tc, "eos_token"))
    return tokenizer(c).encode(rendered, add_special_tokens=False).ids


def eot_id(c):
    i = tokenizer(c).token_to_id("<|eot_id|>")
    assert i is not None, "tokenizer.json has no <|eot_id|> token"
    return i


# ------------------------------------------------------------------------------- sampler

def random_prompt(m, n, seed):
    rng = np.random.default_rng(1000 + seed)
    ids = rng.integers(0, m.vocab_size, size=n)
    ids[ids == m.mask_token_id] = 2
    return ids.tolist()


# Each case: prompt (ids from a seed and length, or chat text), geometry and options.
CASES = {
    "one_block": dict(prompt=(8, 1), gen=16, block=16, steps=8),
    "steps_eq_gen": dict(prompt=(6, 2), gen=16, block=16, steps=16),
    "uneven_4433333": dict(prompt=(7, 3), gen=20, block=20, steps=6),
    "four_blocks": dict(prompt=(5, 4), gen=32, block=8, steps=16),
    "prompt_len1": dict(prompt=(1, 5), gen=16, block=8, steps=8),
    "chat": dict(chat="What is the capital of France?", gen=16, block=8, steps=8),
    "cfg": dict(prompt=(8, 55), gen=16, block=16, steps=8, cfg_scale=1.5),
    "one_step_per_block": dict(prompt=(6, 7), gen=24, block=8, steps=3),
    "temperature": dict(prompt=(8, 8), gen=16, block=8, steps=8, temperature=0.8, seed=42),
    "random_remask": dict(prompt=(8, 9), gen=16, block=16, steps=8, remasking="random", seed=7),
    "temp_cfg_random": dict(prompt=(5, 10), gen=16, block=8, steps=8, temperature=1.0,
                            cfg_scale=0.5, remasking="random", seed=3),
    # These two run on the "+eos" variant of the checkpoint (see make_eos_checkpoint), with the
    # prompt searched (by the reference alone) among a few seeds for one where the flag changes
    # the result, so that the option is really exercised.
    "logits_eos_inf": dict(prompt=(8, 11), gen=16, block=16, steps=8, logits_eos_inf=True,
                           search="logits_eos_inf"),
    "confidence_eos_eot_inf": dict(prompt=(8, 12), gen=16, block=16, steps=8,
                                   confidence_eos_eot_inf=True, search="confidence_eos_eot_inf"),
}
SEARCH_TRIES = 60


def exercised_prompt(c, case, opts):
    """The first prompt (by seed) for which the case's flag changes the reference's output
    and no decision is a near-tie."""
    m, (n, seed0), flag = c.model, case["prompt"], case["search"]
    off = dict(opts, **{flag: False})
    for j in range(SEARCH_TRIES):
        prompt = random_prompt(m, n, seed0 + 100 * j)
        with_flag, diag = ref.generate(m, prompt, case["gen"], case["steps"], case["block"],
                                       eot_id=eot_id(c), early_stop=True, **opts)
        without, _ = ref.generate(m, prompt, case["gen"], case["steps"], case["block"],
                                  eot_id=eot_id(c), early_stop=True, **off)
        if (with_flag != without).any() and min(diag["argmax_margin"],
                                                diag["confidence_margin"]) > MARGIN:
            return prompt
    pytest.fail(f"no prompt among {SEARCH_TRIES} seeds where {flag} changes the reference output")


def run_case(c, case):
    m = c.model
    args = ["generate", "--model", c.dir, "--gen-length", case["gen"],
            "--steps", case["steps"], "--block-length", case["block"], "--json"]
    if "chat" in case:
        args += ["--prompt", case["chat"], "--chat"]
        prompt = chat_prompt_ids(c, case["chat"])
    opts = dict(temperature=case.get("temperature", 0.0), cfg_scale=case.get("cfg_scale", 0.0),
                remasking=case.get("remasking", "low_confidence"), seed=case.get("seed", 0),
                logits_eos_inf=case.get("logits_eos_inf", False),
                confidence_eos_eot_inf=case.get("confidence_eos_eot_inf", False))
    if "chat" not in case:
        if "search" in case:
            prompt = exercised_prompt(c, case, opts)
        else:
            prompt = random_prompt(m, *case["prompt"])
        args += ["--prompt-ids", ids_arg(prompt)]
    if opts["temperature"]:
        args += ["--temperature", opts["temperature"]]
    if opts["cfg_scale"]:
        args += ["--cfg-scale", opts["cfg_scale"]]
    args += ["--remasking", opts["remasking"], "--seed", opts["seed"]]
    if opts["logits_eos_inf"]:
        args.append("--logits-eos-inf")
    if opts["confidence_eos_eot_inf"]:
        args.append("--confidence-eos-eot-inf")
    out = json.loads(remask(*args))
    # remask stops early by default (exact: the answer is the same): so does the reference here
    want, diag = ref.generate(m, prompt, case["gen"], case["steps"], case["block"],
                              eot_id=eot_id(c), early_stop=True, **opts)
    return prompt, out, want, diag, opts


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ckpt_name", ["f32", "bf16"])
def test_generate_matches_reference(checkpoint, ckpt_name, name):
    case = CASES[name]
    c = checkpoint(ckpt_name + ("+eos" if "search" in case else ""))
    prompt, out, want, diag, opts = run_case(c, case)
    P, gen = len(prompt), case["gen"]
    got = out["token_ids"]
    assert len(got) == P + gen
    assert got[:P] == prompt, "prompt part of token_ids differs from the independent encoding"
    assert out["generated_ids"] == got[P:]
    assert isinstance(out["text"], str)
    assert got == want.tolist(), (
        f"remask and reference disagree\nremask:    {got[P:]}\nreference: {want[P:].tolist()}")
    assert c.model.mask_token_id not in got[P:], "a mask token was left in the generation"
    # the comparison is only honest when no decision was a near-tie
    assert diag["argmax_margin"] > MARGIN, diag
    assert diag["confidence_margin"] > MARGIN, diag
    if name == "uneven_4433333":
        assert diag["schedule"] == [[4, 4, 3, 3, 3, 3]]
    # steps taken (remask stops early by default): all of them unless a stop token ended it
    assert out["steps"] == diag["steps"], (out["steps"], diag["steps"], diag["stopped_at"])
    if diag["stopped_at"] is None:
        assert out["steps"] == case["steps"]
    assert out["forwards"] == diag["forwards"], (out["forwards"], diag["forwards"])
    assert out["finish_reason"] == diag["finish_reason"]
    assert isinstance(out["elapsed_ms"], (int, float))


def test_plain_prompt_uses_tokenizer_with_special_tokens(checkpoint):
    c = checkpoint("f32")
    text = "Hello world, this is remask."
    out = json.loads(remask("generate", "--model", c.dir, "--prompt", text, "--gen-length", 8,
                            "--steps", 4, "--block-length", 8, "--json"))
    prompt = tokenizer(c).encode(text).ids
    assert out["token_ids"][:len(prompt)] == prompt and len(out["token_ids"]) == len(prompt) + 8
    want, diag = ref.generate(c.model, prompt, 8, 4, 8, eot_id=eot_id(c), early_stop=True)
    assert out["token_ids"] == want.tolist()
    assert diag["argmax_margin"] > MARGIN and diag["confidence_margin"] > MARGIN


@pytest.mark.parametrize("gen,block,steps", [(10, 4, 4), (16, 8, 3)])
def test_generate_rejects_bad_geometry(checkpoint, gen, block, steps):
    c = checkpoint("f32")
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        pytest.fail(f"remask binary not found at {BIN}")
    r = subprocess.run([BIN, "generate", "--model", c.dir, "--prompt-ids", "1,2,3",
                        "--gen-length", str(gen), "--block-length", str(block),
                        "--steps", str(steps), "--json"], capture_output=True, text=True,
                       timeout=60, env=ENV)
    assert r.returncode != 0, r.stdout
    with pytest.raises(ValueError):
        ref.generate(c.model, [1, 2, 3], gen, steps, block)
