#!/usr/bin/env python3
"""K/V caches (prefix, dual) side by side in one run: milliseconds per cached
step against a full step, bytes between stages per step, and milliseconds and
forward passes per answer for each cache mode x commit rule.

    bench/cache.py [--base DIR] [--demo DIR] [--rounds N] [--only steps,answers,peer,chat] > table.md

- steps: `remask bench` on `base` (`remask model init --preset base --dtype f32`,
  135M parameters, random weights), prompt 64 + gen 256 = 320 tokens, blocks of
  32: a full denoising step, and one step of each cache mode after the block's
  first (storing) forward; the bytes a stage boundary carries per step are the
  fed positions x d_model x 4;
- answers: the same canvas, every rule x mode, generated to the end
  (`--no-early-stop`: random weights have no end of turn to stop at);
- peer: the configuration Fast-dLLM's own PyTorch code was measured at on this
  machine (issue 12: 2 cores, f32, `base` with random weights, a 32-token
  prompt, gen 128, blocks of 32, factor 3): no cache, prefix, dual;
- chat: the README's chat question on the demo model (the embedded default
  unless --demo) at gen_length 32 and 224, as the README runs it (blocks of 8,
  one token per step, early stop), with and without each cache.

Every command of a table alternates with the others in each of --rounds rounds
and the median is reported. Runs `remask` in process; binary: $REMASK_BIN or
target/release/remask.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = os.environ.get("REMASK_BIN", str(REPO / "target" / "release" / "remask"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("REMASK_")}
CHAT = 'What does "river" mean?'
MODES = ["none", "prefix", "dual"]
# Random weights on `base` are peaked at confidences of 0.1-0.15 (BENCHMARKS.md section 6).
RULES = [
    ("fixed, 1 token/step", ["--steps", "256"]),
    ("threshold 0.1", ["--threshold", "0.1"]),
    ("factor 3", ["--factor", "3"]),
]
# Fast-dLLM's times on this machine (issue 12), seconds.
PEER = {"none": 51.0, "prefix": 15.4, "dual": 9.5}


def run(args: list[str]) -> dict:
    r = subprocess.run([BIN, *args], capture_output=True, text=True, env=ENV, timeout=7200)
    if r.returncode != 0:
        sys.exit(f"remask {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def rounds(commands: dict, n: int) -> dict:
    """Runs every command once per round, alternating; {name: [results]}."""
    out = {k: [] for k in commands}
    for _ in range(n):
        for name, args in commands.items():
            out[name].append(run(args))
    return out


def median(results: list, key) -> float:
    return statistics.median(key(r) for r in results)


def ids_prompt(n: int, seed: int) -> str:
    return ",".join(str(1 + (seed * 7919 + i * 104729) % 30000) for i in range(n))


def steps_table(base: str, n: int) -> str:
    res = rounds({"bench": ["bench", "--model", base, "--seq-len", "320", "--gen-length",
                            "256", "--block-length", "32", "--iters", "5", "--json"]}, n)["bench"]
    full = median(res, lambda r: r["ms_per_step_median"])
    d_model = 768
    lines = ["| step | positions fed | ms / step | vs full step | bytes per stage boundary |",
             "|---|---:|---:|---:|---:|",
             f"| full (no cache) | 320 | {full:.1f} | 1.00x | {320 * d_model * 4:,} |"]
    for mode in ("prefix", "dual"):
        ms = median(res, lambda r: r["cached_step"][mode]["ms_per_step_median"])
        fed = res[0]["cached_step"][mode]["fed_positions"]
        lines.append(f"| {mode} (after the block's first) | {fed} | {ms:.1f} | {ms / full:.2f}x |"
                     f" {fed * d_model * 4:,} |")
    return "\n".join(lines)


def answers_table(base: str, n: int) -> str:
    prompt = ids_prompt(64, 1)
    commands = {}
    for label, flags in RULES:
        for mode in MODES:
            commands[(label, mode)] = [
                "generate", "--json", "--model", base, "--prompt-ids", prompt, "--gen-length",
                "256", "--block-length", "32", "--no-early-stop", "--cache", mode, *flags]
    res = rounds(commands, n)
    ref = median(res[(RULES[0][0], "none")], lambda r: r["elapsed_ms"])
    lines = ["| rule | cache | forwards / answer | tokens / forward | ms / answer | vs fixed, no cache |",
             "|---|---|---:|---:|---:|---:|"]
    for (label, mode), rs in res.items():
        ms = median(rs, lambda r: r["elapsed_ms"])
        f = rs[0]["forwards"]
        lines.append(f"| {label} | {mode} | {f} | {rs[0]['committed'] / f:.2f} | {ms:.0f} |"
                     f" {ref / ms:.1f}x |")
    return "\n".join(lines)


def peer_table(base: str, n: int) -> str:
    prompt = ids_prompt(32, 2)
    commands = {mode: ["generate", "--json", "--model", base, "--prompt-ids", prompt,
                       "--gen-length", "128", "--block-length", "32", "--factor", "3",
                       "--no-early-stop", "--cache", mode] for mode in MODES}
    res = rounds(commands, n)
    lines = ["| cache | forwards | remask s | Fast-dLLM s (issue 12) | remask / Fast-dLLM |",
             "|---|---:|---:|---:|---:|"]
    for mode, rs in res.items():
        s = median(rs, lambda r: r["elapsed_ms"]) / 1e3
        lines.append(f"| {mode} | {rs[0]['forwards']} | {s:.1f} | {PEER[mode]:.1f} |"
                     f" {s / PEER[mode]:.2f} |")
    return "\n".join(lines)


def chat_table(demo: str | None, n: int) -> str:
    model = ["--model", demo] if demo else []
    commands = {}
    for gen in (32, 224):
        for mode in MODES:
            commands[(gen, mode)] = ["generate", "--json", *model, "--chat", "--prompt", CHAT,
                                     "--gen-length", str(gen), "--steps", str(gen),
                                     "--block-length", "8", "--cache", mode]
    res = rounds(commands, n)
    lines = ["| gen_length | cache | forwards | ms | answer |", "|---:|---|---:|---:|---|"]
    for (gen, mode), rs in res.items():
        ms = median(rs, lambda r: r["elapsed_ms"])
        lines.append(f"| {gen} | {mode} | {rs[0]['forwards']} | {ms:.0f} | `{rs[0]['text']}` |")
    t = {k: median(v, lambda r: r["elapsed_ms"]) for k, v in res.items()}
    ratios = ", ".join(f"{m} {t[(224, m)] / t[(32, m)]:.2f}x" for m in MODES)
    lines.append(f"\nms at gen_length 224 / ms at 32: {ratios}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="a `base` checkpoint (default: made in a temp dir)")
    p.add_argument("--demo", help="the demo model (default: the embedded default)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", default="steps,answers,peer,chat")
    a = p.parse_args()
    only = set(a.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        base = a.base
        if base is None and only - {"chat"}:
            base = str(Path(tmp) / "base")
            subprocess.run([BIN, "model", "init", "--preset", "base", "--dtype", "f32", "--out",
                            base], check=True, env=ENV, capture_output=True)
        for name, f in (("steps", lambda: steps_table(base, a.rounds)),
                        ("answers", lambda: answers_table(base, a.rounds)),
                        ("peer", lambda: peer_table(base, a.rounds)),
                        ("chat", lambda: chat_table(a.demo, a.rounds))):
            if name in only:
                print(f"### {name}\n\n{f()}\n", flush=True)


if __name__ == "__main__":
    main()
