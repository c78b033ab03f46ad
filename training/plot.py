"""Plot the loss curves of a run: training and held-out loss of both stages.

    python3 training/plot.py --run runs/demo --out docs/training-loss.png
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # A resumed run appends: keep the last record of each step.
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def series(rows, key, offset=0):
    pts = [(r["step"] + offset, r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pre = read_log(os.path.join(a.run, "pretrain", "log.jsonl"))
    sft = read_log(os.path.join(a.run, "sft", "log.jsonl"))
    end = pre[-1]["step"] if pre else 0

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    ax.plot(*series(pre, "pretrain_loss"), color="tab:blue", alpha=0.5, lw=1, label="pre-training: training batches")
    ax.plot(*series(pre, "valid_loss"), color="tab:blue", lw=2, marker="o", ms=3, label="pre-training: held-out prose")
    if sft:
        ax.plot(*series(sft, "sft_loss", end), color="tab:orange", alpha=0.5, lw=1, label="SFT: training pairs")
        ax.plot(*series(sft, "valid_sft_loss", end), color="tab:orange", lw=2, marker="o", ms=3,
                label="SFT: held-out definition pairs")
        ax.plot(*series(sft, "valid_loss", end), color="tab:green", lw=2, marker="o", ms=3,
                label="SFT stage: held-out prose")
        ax.axvline(end, color="grey", ls="--", lw=1)
        ax.text(end, ax.get_ylim()[1], " SFT", va="top", color="grey")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("LLaDA loss (masked-token CE / t, per token)")
    ax.set_title("remask-demo: LLaDA pre-training then SFT (CPU, 2 cores)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
