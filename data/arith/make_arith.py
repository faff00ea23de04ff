"""Write `data/arith/{train,test}.jsonl`: short arithmetic word problems with exact integer answers, a task whose
answers a rule can check (the reward function is `data/arith/reward.py`).

Each problem is one operation on two small numbers (addition of numbers up to 24, subtraction from numbers up to 30)
told as a one- or two-sentence story, followed by "Answer with one equation." The `messages` column puts one worked
example before the problem as an earlier chat turn ("Lily has 32 apples. Lily gets 5 more. ..." answered "32 + 5 =
37"), which makes SmolLM2-135M-Instruct answer in one line; so prompted it gets about 30% of the problems right when
sampling at temperature 0.7 (greedy: 58 of the 200 test problems). The held-out split is disjoint from the training
split by the underlying problem, not only by its wording: every (operation, a, b) triple is assigned to one split,
so the test measures answers to number combinations the policy never trained on. Seeded: the files are reproducible
byte for byte (tests/test_data.py checks it, and that the splits are disjoint).

Columns: `prompt_id` (`train-0000`, `test-0000`, ...), `prompt` (the problem, a user message),
`messages` (the chat the model is given: the worked example, then `prompt`), `answer` (int), `equation` (the worked
answer, "17 - 9 = 8": the SFT target of tools/compare.py --task arith), `op` (add or sub), `a`, `b`.

    python data/arith/make_arith.py            # writes data/arith/train.jsonl (640 problems) and test.jsonl (200)
    python data/arith/make_arith.py --wording plain --num_train 400 --num_validation 256 --output_dir runs/arith
"""

import json
import os
import random
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    output_dir: str = os.path.dirname(os.path.abspath(__file__))
    """folder that receives train.jsonl and test.jsonl"""
    num_train: int = 640
    """problems in the train split"""
    num_test: int = 200
    """problems in the held-out test split (disjoint (operation, a, b) triples)"""
    num_validation: int = 0
    """problems in a third split, validation.jsonl, disjoint from both: the prompts of the reward model's comparisons
    and of RL (InstructGPT keeps the prompts of SFT, reward model and PPO apart); 0: no such split"""
    seed: int = 1
    """seed of the problem choice and wording"""
    wording: str = "story"
    """story: each problem told by one of several templates (a story or a plain question); plain: always the plain
    question ("What is 17 minus 9?"), for small models trained from scratch that cannot yet read stories"""
    renderings: int = 1
    """rows per training problem, each with its own wording (the test split keeps one row per problem): a larger
    training split for SFT without reusing a held-out (operation, a, b) triple"""


OP_CYCLE = ["add", "sub"]
INSTRUCTION = "Answer with one equation."
# One worked example shown before every problem as an earlier chat turn (the `messages` column): without it this small
# model mostly writes a paragraph; with it, mostly one line such as "29 - 17 = 12". Its numbers lie outside every
# problem the generator can pose (sums of numbers up to 24), so it gives no split's answer away.
EXAMPLE = [{"role": "user", "content": f"Lily has 32 apples. Lily gets 5 more. How many apples does Lily have now? "
                                       f"{INSTRUCTION}"}, {"role": "assistant", "content": "32 + 5 = 37"}]
NAMES = ["Tom", "Anna", "Sam", "Lena", "Omar", "Mia", "Ravi", "Julia", "Ken", "Sara", "Ben", "Nora", "Luis", "Emma",
         "Jack", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "coins", "shells", "toy cars",
         "balloons", "stamps"]
TEMPLATES = {
    "add": ["{name} has {a} {items}. {name} gets {b} more. How many {items} does {name} have now?",
            "There are {a} {items} in a box. Someone puts in {b} more. How many {items} are in the box now?",
            "{name} collected {a} {items} on Monday and {b} {items} on Tuesday. How many {items} is that in all?",
            "What is {a} plus {b}?"],
    "sub": ["{name} has {a} {items} and gives {b} of them away. How many {items} does {name} have left?",
            "A shelf holds {a} {items}. {b} of them are taken away. How many {items} are left on the shelf?",
            "{name} had {a} {items} and lost {b}. How many {items} does {name} have now?",
            "What is {a} minus {b}?"],
}


def triples():
    """Every problem the generator can pose, in a fixed order: (operation, a, b)."""
    add = [("add", a, b) for a in range(1, 25) for b in range(1, 25)]
    sub = [("sub", a, b) for a in range(5, 31) for b in range(1, a)]
    return add + sub


def answer(op, a, b):
    return {"add": a + b, "sub": a - b}[op]


def equation(op, a, b):
    """The worked answer: "17 - 9 = 8"."""
    return f"{a} {'+' if op == 'add' else '-'} {b} = {answer(op, a, b)}"


def render(op, a, b, rng, wording="story"):
    """One problem's wording: a template, a name and an item drawn from rng (plain wording: the plain question)."""
    if wording == "plain":
        return f"{TEMPLATES[op][-1].format(a=a, b=b)} {INSTRUCTION}"
    text = rng.choice(TEMPLATES[op]).format(name=rng.choice(NAMES), items=rng.choice(ITEMS), a=a, b=b)
    return f"{text} {INSTRUCTION}"


def make_splits(args):
    """Train and test rows (and validation rows with --num_validation); the (operation, a, b) triples of the splits
    never overlap. Every split is half addition, half subtraction."""
    rng = random.Random(args.seed)
    by_op = {op: [t for t in triples() if t[0] == op] for op in TEMPLATES}
    for pool in by_op.values():
        rng.shuffle(pool)
    splits = {"test": [], "train": [], **({"validation": []} if args.num_validation else {})}
    for split, count in (("test", args.num_test), ("train", args.num_train), ("validation", args.num_validation)):
        if split not in splits:
            continue
        for i in range(count):
            op = OP_CYCLE[i % len(OP_CYCLE)]
            if not by_op[op]:
                raise ValueError(f"--num_{split} {count}: not enough distinct {op} problems")
            splits[split].append(by_op[op].pop())
        rng.shuffle(splits[split])
    rows = {}
    for split, problems in splits.items():
        rows[split] = []
        copies = args.renderings if split == "train" else 1
        for i, (op, a, b) in enumerate(p for p in problems for _ in range(copies)):
            prompt = render(op, a, b, rng, args.wording)
            rows[split].append({"prompt_id": f"{split}-{i:04d}", "prompt": prompt,
                                "messages": [*EXAMPLE, {"role": "user", "content": prompt}],
                                "answer": answer(op, a, b), "equation": equation(op, a, b), "op": op, "a": a, "b": b})
    return rows


def main(args: Args):
    if args.wording not in ("story", "plain"):
        raise ValueError(f"--wording {args.wording!r}: expected story or plain")
    if args.num_validation < 0:
        raise ValueError(f"--num_validation {args.num_validation}: must be at least 0")
    for name in ("num_train", "num_test", "renderings"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be at least 1")
    os.makedirs(args.output_dir, exist_ok=True)
    for split, rows in make_splits(args).items():
        path = os.path.join(args.output_dir, f"{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        print(f"wrote {len(rows)} problems to {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
