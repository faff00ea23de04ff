"""The offline quickstart: the whole GPT-2 / SST-2 example on the tiny model and the synthetic corpus, on a CPU.

Each stage is a top-level script run exactly as a user would run it, with small settings, writing into its own folder
under --output_dir (args.json plus metrics.jsonl and the saved model, or the saved dataset):

    sft/                 sft_sst2.py     a tiny GPT-2 (random init) learns to write SST-2-style sentences
    reward/              reward_sst2.py  a reward model on the SFT backbone learns to prefer positive sentences
    ppo/                 ppo.py          PPO makes the SFT policy please the reward model, under a KL penalty
    rebel/iter{t}/       generate.py -> score.py -> filter.py -> rebel.py, two iterations (t = 0 from the SFT policy,
                         t = 1 from iteration 0's policy), with as many sampled and scored responses as PPO used
    rebel/eval/          tools/eval_policy.py  the REBEL policies evaluated exactly as ppo.py evaluates
    report/              tools/report.py held-out reward-model score, judge score and KL against episodes for PPO
                         and REBEL (report.png), and before/after sample sentences (report.md)

A stage whose folder already holds a finished run is skipped and an interrupted one continues (training stages from
their last checkpoint, generate and score from their finished shards), so running the quickstart again after an
interruption picks up where it stopped; --overwrite redoes everything.

    python tools/quickstart.py

Documentation: docs/quickstart.md
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA, TINY = os.path.join(ROOT, "data", "sst2"), os.path.join(ROOT, "data", "tiny-gpt2")
TRAINERS = ("sft_sst2.py", "reward_sst2.py", "sft.py", "reward.py", "ppo.py", "rebel.py", "dpo.py", "rebel_online.py",
            "rloo.py", "grpo.py")
JUDGE = os.path.join("tools", "judge.py")


@dataclass
class Args:
    output_dir: str = "runs/quickstart"
    """folder that receives one subfolder per stage"""
    overwrite: bool = False
    """redo every stage, even those already finished"""
    seed: int = 1
    """seed passed to every stage that samples or shuffles"""
    rebel_prompts: int = 800
    """prompts per REBEL iteration (4 responses each: 2 iterations sample as many responses as PPO's 6,400)"""


def stages(args):
    """(folder, script, arguments) of each stage, in order."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    seed = ["--seed", str(args.seed)]
    result = [
        (out("sft"), "sft_sst2.py", ["--model_name_or_path", TINY, "--from_scratch", "--dataset", DATA, "--lr", "1e-3",
                                     "--batch_size", "32", "--local_micro_batch_size", "16", "--eval_freq", "50",
                                     *seed]),
        (out("reward"), "reward_sst2.py", ["--model_name_or_path", out("sft"), "--dataset", DATA, "--lr", "3e-3",
                                           "--warmup_ratio", "0.1", "--batch_size", "32", "--local_micro_batch_size",
                                           "16", "--eval_freq", "50", *seed]),
        (out("ppo"), "ppo.py", ["--model_name_or_path", out("sft"), "--reward_model_name_or_path", out("reward"),
                                "--task.dataset", DATA, "--lr", "3e-5", "--batch_size", "64",
                                "--local_micro_batch_size", "32", "--total_episodes", "6400", "--eval_freq", "10",
                                "--eval_size", "128", *seed]),
    ]
    policies = []
    for t in range(2):
        policy = out("rebel", f"iter{t - 1}", "train") if t else out("sft")
        start, end = str(t * args.rebel_prompts), str((t + 1) * args.rebel_prompts)
        result += [
            (out("rebel", f"iter{t}", "generate"), "generate.py", [
                "--model_name_or_path", policy, "--dataset", DATA, "--split", "train", "--prompt_column", "sentence",
                "--prompt_format", "text", "--prompt_words", "4", "--maxlen", "24", "--num_responses", "4",
                "--temperature", "0.7", "--top_p", "1.0", "--start_idx", start, "--end_idx", end, "--backend", "hf",
                "--local_micro_batch_size", "64", *seed]),
            (out("rebel", f"iter{t}", "score"), "score.py", [
                "--reward_model", out("reward"), "--dataset", out("rebel", f"iter{t}", "generate"), "--prompt_format",
                "text", "--local_micro_batch_size", "64"]),
            (out("rebel", f"iter{t}", "filter"), "filter.py", [
                "--dataset", out("rebel", f"iter{t}", "score"), "--model_name_or_path", policy, "--prompt_format",
                "text", "--maxlen_prompt", "16", "--maxlen", "24", "--test_size", "100", *seed]),
            (out("rebel", f"iter{t}", "train"), "rebel.py", [
                "--model_name_or_path", policy, "--task.dataset", out("rebel", f"iter{t}", "filter"),
                "--task.maxlen_prompt", "16", "--task.maxlen", "24", "--task.temperature", "0.7", "--rebel.eta", "1",
                "--lr", "3e-4", "--batch_size", "32", "--local_micro_batch_size", "16", "--num_train_epochs", "2",
                "--eval_freq", "10", *seed]),
        ]
        policies.append(out("rebel", f"iter{t}", "train"))
    episodes = [str(4 * args.rebel_prompts * (t + 1)) for t in range(2)]
    result += [
        (out("rebel", "eval"), os.path.join("tools", "eval_policy.py"), [
            "--policies", *policies, "--episodes", *episodes, "--reference", out("sft"), "--reward_model",
            out("reward"), "--dataset", DATA, "--eval_size", "128", *seed]),
    ]
    return result


def finished(folder, script):
    """Whether a stage's folder holds its finished output: a saved model (training writes metrics.jsonl as it
    goes, the model only at the end), a saved dataset (written atomically), a judgment (its summary.json, written
    last) or an evaluation's metrics (written last)."""
    if script in TRAINERS:
        markers = ("config.json",)
    elif script == JUDGE:
        markers = ("summary.json",)
    elif script.startswith("tools"):
        markers = ("metrics.jsonl",)
    else:
        markers = ("dataset_dict.json", "state.json")
    return any(os.path.exists(os.path.join(folder, f)) for f in markers)


def offline_env():
    """The stages' environment: offline hub, no progress bars of hub downloads, wandb off unless asked for."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}


def run_stages(plan, overwrite, name):
    """Run each (folder, script, arguments) of `plan` in order as a subprocess, skipping a finished stage; an
    interrupted training stage continues from its last checkpoint (generate/score continue from their shards by
    themselves); overwrite redoes everything. `name` tags the printed lines."""
    env, start = offline_env(), time.time()
    for k, (folder, script, script_args) in enumerate(plan, 1):
        if finished(folder, script) and not overwrite:
            print(f"[{name}] {folder}: already finished, skipped (--overwrite redoes it)")
            continue
        if script.startswith("tools"):
            again = ["--overwrite"] if overwrite and script == JUDGE else []
        elif overwrite:
            again = ["--overwrite"]
        else:
            again = ["--resume", "auto"] if script in TRAINERS else []
        cmd = [sys.executable, os.path.join(ROOT, script), *script_args, "--output_dir", folder, *again]
        print(f"[{name}] {folder}: {' '.join(cmd[1:])}", flush=True)
        stage_start = time.time()
        subprocess.run(cmd, check=True, env=env)
        print(f"[{name}] {folder}: done in {time.time() - stage_start:.0f} s (stage {k} of {len(plan)}, "
              f"{time.time() - start:.0f} s so far)", flush=True)
    return env


def main(args: Args):
    start = time.time()
    env = run_stages(stages(args), args.overwrite, "quickstart")
    report = os.path.join(args.output_dir, "report")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "report.py"), "--runs",
                    os.path.join(args.output_dir, "ppo"), os.path.join(args.output_dir, "rebel", "eval"),
                    "--labels", "PPO", "REBEL", "--output_dir", report], check=True, env=env)
    print(f"\n[quickstart] finished in {time.time() - start:.0f} s. Everything is under {args.output_dir}/:")
    print("  sft/, reward/, ppo/, rebel/iter*/train/   args.json, metrics.jsonl, model + tokenizer (from_pretrained)")
    print("  ppo/eval_samples.jsonl                     every held-out answer with its reward-model and judge scores")
    print("  rebel/iter*/{generate,score,filter}/       datasets (load_from_disk) with their args.json")
    print("  rebel/eval/                                REBEL policies evaluated as ppo.py evaluates")
    print("  report/                                    report.png (curves) and report.md (numbers, sample sentences)")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
