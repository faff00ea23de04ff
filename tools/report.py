"""Plot held-out evaluation curves of one or more runs side by side and tabulate sample sentences before and after.

Each run folder holds `metrics.jsonl` with `eval/scores` (reward model), `eval/judge` (VADER) and `eval/kl` rows
keyed by `episode`, and `eval_samples.jsonl` with the answers behind them (ppo.py writes both; so does
tools/eval_policy.py for the policies of offline algorithms such as REBEL). Writes `report.png` and `report.md`.

    python tools/report.py --runs runs/quickstart/ppo runs/quickstart/rebel_eval --output_dir runs/quickstart/report

Documentation: docs/quickstart.md
"""

import json
import os
from dataclasses import dataclass

import matplotlib
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("eval/scores", "reward-model score (held out)"), ("eval/judge", "judge: VADER compound (held out)"),
          ("eval/kl", "KL to the reference (nats per response)")]


@dataclass
class Args:
    runs: tuple[str, ...] = ("runs/quickstart/ppo",)
    """run folders with eval rows in metrics.jsonl and eval_samples.jsonl"""
    labels: tuple[str, ...] = ()
    """a label per run; default: the folder names"""
    output_dir: str = "runs/quickstart/report"
    """where report.png and report.md go"""
    table_rows: int = 8
    """held-out prompts in the before/after table"""
    title: str = "GPT-2 / SST-2 example, offline quickstart (tiny model, synthetic corpus)"
    """figure title"""


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def eval_rows(run):
    """The held-out evaluation rows of a run folder's metrics.jsonl (those with eval/scores), in order."""
    rows = [m for m in read_jsonl(os.path.join(run, "metrics.jsonl")) if "eval/scores" in m]
    if not rows:
        raise ValueError(f"{run}/metrics.jsonl has no eval/scores rows")
    return rows


def cell(sample):
    """One answer for the before/after table: its text (an empty answer shown as such, not as a blank cell), then its
    reward-model and judge scores."""
    text = sample["response"].strip() or "*(empty response)*"
    return f"{text} ({sample['score']:+.2f} / {sample['judge']:+.2f})".replace("|", "/")


def main(args: Args):
    labels = list(args.labels) or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    os.makedirs(args.output_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    samples = {}
    for run, label in zip(args.runs, labels):
        rows = eval_rows(run)
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot([m["episode"] for m in rows], [m[key] for m in rows], marker="o", markersize=3, label=label)
        by_update = {}
        for s in read_jsonl(os.path.join(run, "eval_samples.jsonl")):
            by_update.setdefault(s["update"], []).append(s)
        samples[label] = by_update
    for ax, (_, name) in zip(axes, PANELS):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("episodes (responses sampled and scored)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    png = os.path.join(args.output_dir, "report.png")
    fig.savefig(png, dpi=120)

    lines = [f"# {args.title}", "", f"![curves]({os.path.basename(png)})", "",
             "| run | held-out reward (before → after) | judge (before → after) | KL after |", "|---|---|---|---|"]
    for label, by_update in samples.items():
        first, last = by_update[min(by_update)], by_update[max(by_update)]
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        lines.append(f"| {label} | {mean(first, 'score'):+.3f} → {mean(last, 'score'):+.3f} | "
                     f"{mean(first, 'judge'):+.3f} → {mean(last, 'judge'):+.3f} | {mean(last, 'kl'):.2f} |")
    first_label = next(iter(samples))
    before = samples[first_label][min(samples[first_label])]
    lines += ["", "Sample sentences on held-out prompts (reward-model score / judge score; *(empty response)*: the "
              "policy ended its answer at once, with the end-of-turn token, and that empty answer was scored):", "",
              "| prompt | before (SFT) | " + " | ".join(f"after ({label})" for label in samples) + " |",
              "|---|---|" + "---|" * len(samples)]
    for i in range(min(args.table_rows, len(before))):
        afters = [cell(by_update[max(by_update)][i]) for by_update in samples.values()]
        lines.append(f"| {before[i]['prompt']} | {cell(before[i])} | " + " | ".join(afters) + " |")
    md = os.path.join(args.output_dir, "report.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"\nwrote {png} and {md}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
