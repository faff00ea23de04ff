"""The TL;DR chain in miniature, offline on a CPU: SFT -> a reward model from comparisons -> RL against it -> the
policies scored by the true reward (and, optionally, by a judge LLM's win rate against the reference summaries).

Each stage is a top-level script run exactly as a user would run it, on data/tldr (the synthetic miniature of TL;DR:
posts, reference summaries, pairwise comparisons and K-wise rankings ordered by an explicit quality rule; see
data/make_tldr.py) and a tiny GPT-2 trained from scratch, writing into its own folder under --output_dir:

    sft/               sft.py          the policy learns to summarize (loss on the summary tokens)
    reward/            reward.py       a reward model on the SFT backbone, from data/tldr/preference (pairs) or
                                       data/tldr/ranked (K = 4 rankings, --reward_data ranked)
    rl/                rebel_online.py (or --algorithm ppo / rloo / grpo) against that reward model
    answers/{sft,rl}/  generate.py     4 sampled summaries of each held-out post, at the training temperature
    gold/{sft,rl}/     score.py        their true quality (`--reward_fn data/make_tldr.py:gold`: key facts stated,
                                       minus facts stated wrongly, minus 1 if cut off; the reference scores 4)
    judge/             tools/judge.py  with --judge_model: the RL policy's first summary against the reference,
                                       both orders asked (a tiny model is no judge: point it at a real chat model)

A finished stage is skipped and an interrupted training stage continues from its last checkpoint, so running the
chain again picks up where it stopped; --overwrite redoes everything. The last lines printed are the summary:
held-out loss, reward-model accuracy, the RL run's reward-model score and KL, and the true quality of both policies
(also in summary.json).

    python tools/tldr_chain.py

Documentation: docs/tldr.md
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (running the stages, and when a stage counts as finished)

ROOT = quickstart.ROOT
DATA, TINY = os.path.join(ROOT, "data", "tldr"), quickstart.TINY
TASK = ["--task.dataset", os.path.join(DATA, "sft"), "--task.prompt_column", "prompt", "--task.prompt_words", "0",
        "--task.maxlen_prompt", "96", "--task.response_length", "32", "--task.temperature", "0.7"]


@dataclass
class Args:
    output_dir: str = "runs/tldr_chain"
    """folder that receives one subfolder per stage"""
    overwrite: bool = False
    """redo every stage, even those already finished"""
    seed: int = 1
    """seed passed to every stage that samples or shuffles"""
    sft_epochs: int = 2
    """epochs of SFT on the 1,200 training posts (2 leave room for RL: held-out loss about 0.6; 6 reach 0.06)"""
    reward_data: Literal["preference", "ranked"] = "preference"
    """comparisons the reward model learns from: 1,200 pairs, or 400 rankings of 4 summaries (6 pairs each)"""
    reward_epochs: int = 2
    """epochs of reward-model training"""
    algorithm: Literal["rebel_online", "ppo", "rloo", "grpo"] = "rebel_online"
    """the RL stage's algorithm"""
    rl_episodes: int = 960
    """responses sampled and scored by the RL stage (32 per update)"""
    eval_posts: int = 200
    """held-out posts summarized by each policy for the true-reward evaluation (4 summaries each)"""
    judge_model: str | None = None
    """a chat model (hub id or folder) for tools/judge.py's win rate of the RL policy against the references; none: no
    judge stage"""


def stages(args):
    """(folder, script, arguments) of each stage, in order."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    seed = ["--seed", str(args.seed)]
    rank = ["--task.dataset_format", "ranked", "--center_coef", "0.01"] if args.reward_data == "ranked" else []
    result = [
        (out("sft"), "sft.py", [
            "--model_name_or_path", TINY, "--from_scratch", "--task.dataset", os.path.join(DATA, "sft"),
            "--task.maxlen_prompt", "96", "--task.maxlen", "32", "--lr", "3e-3", "--warmup_ratio", "0.1",
            "--batch_size", "32", "--local_micro_batch_size", "16", "--num_train_epochs", str(args.sft_epochs),
            "--eval_freq", "25", "--num_samples", "4", *seed]),
        (out("reward"), "reward.py", [
            "--model_name_or_path", out("sft"), "--task.dataset", os.path.join(DATA, args.reward_data), *rank,
            "--task.maxlen", "128", "--lr", "1e-3", "--warmup_ratio", "0.1", "--batch_size", "16",
            "--local_micro_batch_size", "16", "--num_train_epochs", str(args.reward_epochs), "--eval_freq", "50",
            *seed]),
        (out("rl"), f"{args.algorithm}.py", [
            "--model_name_or_path", out("sft"), "--reward_model_name_or_path", out("reward"), *TASK, "--lr", "1e-4",
            "--batch_size", "32", "--local_micro_batch_size", "32", "--total_episodes", str(args.rl_episodes),
            "--eval_freq", "10", "--eval_size", str(args.eval_posts), *seed]),
    ]
    for policy in ("sft", "rl"):
        result += [
            (out("answers", policy), "generate.py", [
                "--model_name_or_path", out(policy), "--dataset", os.path.join(DATA, "sft"), "--split", "validation",
                "--prompt_column", "prompt", "--prompt_id_column", "id", "--prompt_format", "text", "--maxlen", "32",
                "--num_responses", "4", "--temperature", "0.7", "--top_p", "1.0", "--end_idx", str(args.eval_posts),
                "--backend", "hf", "--local_micro_batch_size", "64", *seed]),
            (out("gold", policy), "score.py", [
                "--reward_fn", os.path.join(ROOT, "data", "make_tldr.py") + ":gold", "--dataset",
                out("answers", policy), "--prompt_format", "text"]),
        ]
    if args.judge_model:
        result.append((out("judge"), quickstart.JUDGE, [
            "--a", out("answers", "rl"), "--b", os.path.join(DATA, "sft"), "--b_split", "validation",
            "--judge_model", args.judge_model, "--limit", str(args.eval_posts)]))
    return result


def gold_summary(folder):
    """Mean true quality of a policy's held-out summaries with its standard error over posts (a post's 4 summaries
    averaged first), and the fraction of summaries as good as the reference (quality 4)."""
    import datasets

    scored = datasets.load_from_disk(folder)
    columns = [c for c in scored.column_names if c.startswith("response_") and c.endswith("_reward")]
    rewards = list(zip(*(scored[c] for c in columns)))
    per_post = [sum(r) / len(r) for r in rewards]
    mean = sum(per_post) / len(per_post)
    var = sum((q - mean) ** 2 for q in per_post) / max(len(per_post) - 1, 1)
    perfect = sum(q == 4 for r in rewards for q in r) / sum(len(r) for r in rewards)
    return {"quality": mean, "quality_se": math.sqrt(var / len(per_post)), "perfect": perfect, "posts": len(rewards)}


def last_metrics(folder, key):
    """The first and last logged values of a metric in a run's metrics.jsonl."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        values = [m[key] for m in map(json.loads, f) if key in m]
    return values[0], values[-1]


def summarize(args):
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    summary = {
        "sft/val_loss": last_metrics(out("sft"), "val/loss"),
        "reward/val_accuracy": last_metrics(out("reward"), "val/accuracy"),
        "rl/eval_scores": last_metrics(out("rl"), "eval/scores"),
        "rl/eval_kl": last_metrics(out("rl"), "eval/kl")[1],
        "gold/sft": gold_summary(out("gold", "sft")),
        "gold/rl": gold_summary(out("gold", "rl")),
    }
    if args.judge_model:
        with open(out("judge", "summary.json")) as f:
            summary["judge"] = json.load(f)
    with open(out("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(args: Args):
    start = time.time()
    quickstart.run_stages(stages(args), args.overwrite, "tldr_chain")
    s = summarize(args)
    gold = lambda g: f"{g['quality']:.2f} ± {g['quality_se']:.2f} ({g['perfect']:.0%} as good as the reference)"  # noqa: E731
    print(f"\n[tldr_chain] finished in {time.time() - start:.0f} s; {args.output_dir}/summary.json:")
    print(f"  SFT held-out loss          {s['sft/val_loss'][0]:.3f} -> {s['sft/val_loss'][1]:.3f}")
    print(f"  reward model accuracy      {s['reward/val_accuracy'][0]:.3f} -> {s['reward/val_accuracy'][1]:.3f} "
          f"(held-out {args.reward_data} pairs)")
    print(f"  {args.algorithm} reward-model score {s['rl/eval_scores'][0]:.3f} -> {s['rl/eval_scores'][1]:.3f} "
          f"(KL {s['rl/eval_kl']:.2f})")
    print(f"  true quality (0-4)         SFT {gold(s['gold/sft'])}; RL {gold(s['gold/rl'])}")
    if args.judge_model:
        print(f"  judge win rate vs reference {s['judge']}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
