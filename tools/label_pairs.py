"""Label comparisons as raters would: preference pairs for reward.py from responses scored by a TRUE reward, with a
stated fraction of the labels flipped at random (raters disagree; Christiano et al. 2017 and InstructGPT report
inter-rater agreement of about 70-80%).

Input: score.py's output (generate.py's prompts with `response_{i}` and `response_{i}_reward` columns), scored with
the true reward (e.g. `score.py --reward_fn data/arith/reward.py:exact_answer`). For every prompt, every two responses
with different text and different true reward make one pair, the better one `chosen` (all pairs of a prompt, as
InstructGPT turns a ranking of K responses into its K(K-1)/2 comparisons); responses of equal reward make no pair
(a 0/1 reward says nothing between two wrong answers). Then, in the training split only, each pair's label is flipped
with probability --flip_rate (seeded, one draw per pair in a fixed order); the held-out split keeps the true labels,
so reward.py's held-out accuracy is measured against the truth. Writes, each atomically:

    <output_dir>/train.jsonl        prompt, chosen, rejected, flipped (bool), prompt_index, source (the --train folder)
    <output_dir>/validation.jsonl   the same, never flipped
    <output_dir>/summary.json       counts and the realised flip rate (written last: its presence marks the stage done)

    python tools/label_pairs.py --train runs/arith/answers/train/score runs/arith/answers/validation/score \\
        --validation runs/arith/answers/test/score --flip_rate 0.2 --output_dir runs/arith/comparisons

Documentation: docs/comparison.md ("The arithmetic comparison")
"""

import json
import os
import random
import re
from dataclasses import dataclass

import tyro
from datasets import load_from_disk


@dataclass
class Args:
    train: tuple[str, ...]
    """score.py's output folders for the training comparisons (scored by the true reward)"""
    validation: str
    """score.py's output folder for the held-out prompts (scored by the true reward)"""
    output_dir: str
    """folder that receives train.jsonl, validation.jsonl and summary.json"""
    flip_rate: float = 0.2
    """probability that a training pair's label is flipped (rater noise); held-out labels are never flipped"""
    seed: int = 1
    """seed of the flips"""


def response_columns(dataset, path):
    """The response_{i} columns that have a response_{i}_reward beside them, in order of i."""
    names = [c for c in dataset.column_names if re.fullmatch(r"response_\d+", c)]
    names.sort(key=lambda c: int(c.split("_")[1]))
    missing = [c for c in names if f"{c}_reward" not in dataset.column_names]
    if not names or missing:
        raise ValueError(f"{path}: expected score.py's output (response_{{i}} and response_{{i}}_reward columns); "
                         f"columns are {dataset.column_names}")
    return names


def pairs_of(prompt, responses, rewards):
    """Every (chosen, rejected) pair of one prompt's responses: different text and a higher true reward first, in
    the order of the responses."""
    found = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j] or rewards[i] == rewards[j]:
                continue
            better, worse = (i, j) if rewards[i] > rewards[j] else (j, i)
            found.append({"prompt": prompt, "chosen": responses[better], "rejected": responses[worse]})
    return found


def label(path, flip_rate, rng):
    """The pairs of one scored dataset, each flipped with probability flip_rate (rng drawn once per pair)."""
    dataset = load_from_disk(path)
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{path}: no `prompt` column (expected score.py's output)")
    columns = response_columns(dataset, path)
    rows = []
    for index, row in enumerate(dataset):
        for pair in pairs_of(row["prompt"], [row[c] for c in columns], [row[f"{c}_reward"] for c in columns]):
            flipped = rng.random() < flip_rate
            if flipped:
                pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            rows.append({**pair, "flipped": flipped, "prompt_index": index})
    return rows, len(dataset)


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def main(args: Args):
    if not 0 <= args.flip_rate < 0.5:
        raise ValueError(f"--flip_rate {args.flip_rate}: expected a probability in [0, 0.5) (at 0.5 the labels "
                         "carry no information)")
    for name, path in [*(("train", p) for p in args.train), ("validation", args.validation)]:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--{name} {path}: not a folder (expected score.py's output)")
    rng = random.Random(args.seed)
    train, train_prompts = [], 0
    for path in args.train:
        rows, prompts = label(path, args.flip_rate, rng)
        train, train_prompts = train + [{**r, "source": path} for r in rows], train_prompts + prompts
    validation, validation_prompts = label(args.validation, 0.0, rng)
    for name, rows in (("train", train), ("validation", validation)):
        if not rows:
            raise ValueError(f"--{name}: no pair of responses with different true rewards")
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "validation.jsonl"), validation)
    flips = sum(r["flipped"] for r in train)
    summary = {"train_pairs": len(train), "train_prompts": train_prompts, "validation_pairs": len(validation),
               "validation_prompts": validation_prompts, "flip_rate": args.flip_rate, "flipped": flips,
               "realised_flip_rate": flips / len(train), "seed": args.seed}
    with open(os.path.join(args.output_dir, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(args.output_dir, "summary.json.tmp"), os.path.join(args.output_dir, "summary.json"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
