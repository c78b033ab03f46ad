#!/usr/bin/env python3
"""Commit rules and early stop, side by side in one run: forward passes per
answer, tokens committed per forward, milliseconds per answer, and agreement
with the fixed one-token-per-step answer, for LLaDA's fixed schedule and the
threshold, factor and entropy rules at several settings.

    bench/rules.py [--base DIR] [--demo DIR] [--rounds N] [--only base|demo] > table.md

- `base`: `remask model init --preset base --dtype f32` (135M parameters,
  random weights: quality means nothing, forwards and time do), prompt of 32
  ids, 64 generated tokens in blocks of 32 (the fixed rule: 64 steps);
- the demo model (the embedded default unless --demo): the README's chat
  question at gen_length 32, 128 and 224 (blocks of 8), fixed with and without
  early stop and each rule once; every command alternates with the others in
  each of --rounds rounds and the median is reported.

The quality side (EVAL's definition F1 and infill accuracy for every rule) is
`remask eval`, see EVAL.md. Runs `remask generate --json` in process; binary:
$REMASK_BIN or target/release/remask.
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

# (label, flags): the fixed rule first (the baseline of the agreement column).
BASE_RULES = [
    ("fixed, 1 token/step", ["--steps", "64"]),
    ("fixed, 2 tokens/step", ["--steps", "32"]),
    ("threshold 0.15", ["--threshold", "0.15"]),
    ("threshold 0.1", ["--threshold", "0.1"]),
    ("factor 3", ["--factor", "3"]),
    ("factor 5", ["--factor", "5"]),
    ("entropy 10.5", ["--entropy", "10.5"]),
    ("entropy 21", ["--entropy", "21"]),
]
DEMO_RULES = [
    ("fixed, no early stop", ["--no-early-stop"]),
    ("fixed (early stop)", []),
    ("threshold 0.9", ["--threshold", "0.9"]),
    ("factor 1", ["--factor", "1"]),
    ("entropy 0.5", ["--entropy", "0.5"]),
]


def generate(args: list[str]) -> dict:
    r = subprocess.run([BIN, "generate", "--json", *args], capture_output=True, text=True,
                       env=ENV, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"remask generate {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def agreement(a: list[int], b: list[int]) -> float:
    same = sum(x == y for x, y in zip(a, b))
    return same / max(len(a), len(b), 1)


def run_rounds(cases: list[tuple[str, list[str]]], rounds: int) -> dict[str, list[dict]]:
    """Every case once per round, alternating, so that drift hits all alike."""
    out: dict[str, list[dict]] = {label: [] for label, _ in cases}
    for r in range(rounds):
        for label, args in cases:
            out[label].append(generate(args))
            print(f"round {r + 1}/{rounds}: {label}", file=sys.stderr)
    return out


def answer(result: dict) -> list[int]:
    """The answer's ids: the generated ids before the first stop token."""
    return result["generated_ids"][:result["completion_tokens"]]


def table(results: dict[str, list[dict]], baseline: str) -> list[str]:
    base_ids = answer(results[baseline][0])
    base_ms = statistics.median(x["elapsed_ms"] for x in results[baseline])
    lines = ["| rule | forwards / answer | tokens / forward | ms / answer | vs fixed (time) "
             "| answer agreement with the first row | finish |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, runs in results.items():
        first = runs[0]
        assert all(r["generated_ids"] == first["generated_ids"] for r in runs), label
        ms = statistics.median(r["elapsed_ms"] for r in runs)
        per = first["committed"] / max(first["forwards"], 1)
        lines.append(
            f"| {label} | {first['forwards']} | {per:.2f} | {ms:.0f} | {base_ms / ms:.2f}x "
            f"| {agreement(answer(first), base_ids):.3f} | {first['finish_reason']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", help="a base-preset checkpoint (made in a temporary directory if unset)")
    ap.add_argument("--demo", help="the demo model (default: the embedded default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["base", "demo"], help="run one part")
    a = ap.parse_args()

    print(f"remask: {BIN}, rounds: {a.rounds}, threads: {os.cpu_count()}\n")
    if a.only != "demo":
        base = a.base
        if base is None:
            base = str(Path(tempfile.mkdtemp()) / "base")
            subprocess.run([BIN, "model", "init", "--preset", "base", "--dtype", "f32", "--out", base],
                           check=True, env=ENV, capture_output=True)
        prompt = ",".join(str((i * 7919 + 13) % 30000 + 5) for i in range(32))
        cases = [(label, ["--model", base, "--prompt-ids", prompt, "--gen-length", "64",
                          "--block-length", "32", *flags]) for label, flags in BASE_RULES]
        print("## base preset (random weights), prompt 32 + gen 64, blocks of 32\n")
        print("\n".join(table(run_rounds(cases, a.rounds), BASE_RULES[0][0])) + "\n")

    demo = ["--model", a.demo] if a.demo else []
    for gen in (32, 128, 224) if a.only != "base" else ():
        cases = []
        for label, flags in DEMO_RULES:
            steps = [] if any(f.startswith("--threshold") or f.startswith("--factor")
                              or f.startswith("--entropy") for f in flags) else ["--steps", str(gen)]
            cases.append((label, [*demo, "--chat", "--prompt", CHAT, "--gen-length", str(gen),
                                  "--block-length", "8", *steps, *flags]))
        results = run_rounds(cases, a.rounds)
        print(f"## demo model, the chat question {CHAT!r}, gen_length {gen}, blocks of 8\n")
        print(f"Answer: {results[DEMO_RULES[1][0]][0]['text']!r}\n")
        print("\n".join(table(results, DEMO_RULES[0][0])) + "\n")


if __name__ == "__main__":
    main()
