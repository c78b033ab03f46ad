"""Export a trained stage as a Hugging Face LLaDA checkpoint that remask loads.

    python3 training/export.py --run runs/demo --stage sft --out models/demo [--dtype bf16]

Writes config.json (LLaDA-8B's fields, plus where the weights came from),
model.safetensors (tensor names as in GSAI-ML/LLaDA-8B), tokenizer.json and
tokenizer_config.json (with the chat template).
"""

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llada import Config, LLaDA  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def export(model, tokenizer_dir, out, dtype="f32", extra=None):
    cfg = model.cfg
    os.makedirs(out, exist_ok=True)
    precision = {"f32": "fp32", "bf16": "amp_bf16", "f16": "amp_fp16"}[dtype]
    config = cfg.to_hf(precision=precision, remask_random_weights=False, **(extra or {}))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    # bf16 by round-to-nearest-even (torch's cast); remask widens it back exactly.
    tensors = {k: v.detach().cpu().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    return config


def load_stage(run, stage):
    st = torch.load(os.path.join(run, stage, "state.pt"), map_location="cpu", weights_only=False)
    model = LLaDA(Config(**st["config"]))
    model.load_state_dict(st["model"])
    return model.eval(), st


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--stage", default="sft", choices=["pretrain", "sft"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    a = ap.parse_args()
    model, st = load_stage(a.run, a.stage)
    meta = st.get("meta", {})
    extra = {"remask_trained": {"stage": a.stage, "steps": st["step"], "seed": meta.get("seed"),
                                "recipe": "training/README.md"}}
    export(model, a.run, a.out, a.dtype, extra)
    size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
    print(json.dumps({"out": a.out, "stage": a.stage, "steps": st["step"], "bytes": size}))


if __name__ == "__main__":
    main()
