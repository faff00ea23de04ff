"""The offline quickstart: the whole GPT-2 / SST-2 example on the tiny model and the synthetic corpus, on a CPU.

Each stage is the top-level script run exactly as a user would run it, with small settings, writing into its own
folder under --output_dir (args.json, metrics.jsonl and the saved model or dataset):

    sft/       sft_sst2.py     a tiny GPT-2 (random init) learns to write SST-2-style sentences
    reward/    reward_sst2.py  a reward model on the SFT backbone learns to prefer positive sentences
    ppo/       ppo.py          PPO makes the SFT policy write what the reward model likes, under a KL penalty
    report/    tools/report.py held-out reward-model score, judge score and KL against episodes (report.png), and a
                               before/after table of sample sentences (report.md)

A stage whose folder already holds a finished run is skipped, so an interrupted quickstart continues where it stopped;
--overwrite redoes everything.

    python tools/quickstart.py
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    output_dir: str = "runs/quickstart"
    """folder that receives one subfolder per stage"""
    overwrite: bool = False
    """redo every stage, even those already finished"""
    seed: int = 1
    """seed passed to every stage"""


def stages(args):
    """(name, script, arguments) of each stage, in order."""
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    data, tiny = os.path.join(ROOT, "data", "sst2"), os.path.join(ROOT, "data", "tiny-gpt2")
    return [
        ("sft", "sft_sst2.py", ["--model_name_or_path", tiny, "--from_scratch", "--dataset", data, "--lr", "1e-3",
                                "--batch_size", "32", "--local_micro_batch_size", "16", "--eval_freq", "50"]),
        ("reward", "reward_sst2.py", ["--model_name_or_path", out("sft"), "--dataset", data, "--lr", "3e-3",
                                      "--warmup_ratio", "0.1", "--batch_size", "32", "--local_micro_batch_size", "16",
                                      "--eval_freq", "50"]),
        ("ppo", "ppo.py", ["--model_name_or_path", out("sft"), "--reward_model_name_or_path", out("reward"),
                           "--task.dataset", data, "--lr", "3e-5", "--batch_size", "64", "--local_micro_batch_size",
                           "32", "--total_episodes", "6400", "--eval_freq", "10", "--eval_size", "128"]),
    ]


def main(args: Args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.time()
    for name, script, script_args in stages(args):
        folder = os.path.join(args.output_dir, name)
        if os.path.exists(os.path.join(folder, "config.json")) and not args.overwrite:
            print(f"[quickstart] {name}: already finished in {folder}, skipped (--overwrite redoes it)")
            continue
        cmd = [sys.executable, os.path.join(ROOT, script), *script_args, "--output_dir", folder, "--seed",
               str(args.seed), "--overwrite"]
        print(f"[quickstart] {name}: {' '.join(cmd[1:])}", flush=True)
        stage_start = time.time()
        subprocess.run(cmd, check=True, env=env)
        print(f"[quickstart] {name}: done in {time.time() - stage_start:.0f} s -> {folder}", flush=True)
    report = os.path.join(args.output_dir, "report")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "report.py"), "--runs",
                    os.path.join(args.output_dir, "ppo"), "--labels", "PPO", "--output_dir", report],
                   check=True, env=env)
    print(f"\n[quickstart] finished in {time.time() - start:.0f} s. Everything is under {args.output_dir}/:")
    for name, _, _ in stages(args):
        print(f"  {name + '/':<10} args.json, metrics.jsonl, model + tokenizer (from_pretrained loads the folder)")
    print(f"  {'ppo/':<10} also eval_samples.jsonl: every held-out answer with its reward-model and judge scores")
    print(f"  {'report/':<10} report.png (curves) and report.md (numbers and before/after sentences)")


if __name__ == "__main__":
    main(tyro.cli(Args))
