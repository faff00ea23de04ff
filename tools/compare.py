"""Every algorithm of the project on the offline SST-2 toy, from one SFT policy and one reward model, at one budget.

PPO, online REBEL, RLOO and GRPO (online: they sample and score as they train), offline REBEL and iterative DPO
(generate -> score -> filter -> train, `iterations` times, each iteration from the policy the last one trained) and DPO
(one round of pairs sampled from the SFT policy) all spend the same number of sampled and scored responses
(--episodes), each at several strengths of its pull towards the SFT policy (PPO's and RLOO's kl_coef, REBEL's eta,
GRPO's and DPO's beta) and for each of --seeds. Every stage is the script run as a user would run it, in its own
folder under --output_dir:

    sft/, reward/                        the quickstart's SFT policy and reward model (seed 1), shared by every run
    seed{s}/data/{iter0,all}/            pairs sampled from the SFT policy: iteration 0's prompts (offline REBEL and
                                         iterative DPO, every strength) and the whole budget's prompts (DPO)
    seed{s}/{algorithm}_{value}/         an online run, or an offline run's iter{t}/ stages and eval/ (its policies
                                         evaluated by tools/eval_policy.py exactly as ppo.py evaluates)
    seed{s}/{algorithm}_{value}/judge/   with --judge llm: tools/judge.py's judgment of the run's final held-out answers
                                         against the SFT policy's (summary.json, judgments.jsonl)
    stage_costs.jsonl                    wall time and peak memory (ru_maxrss) of every stage run
    report/                              frontier.png, curves.png, table.md, results.json

Held-out numbers come from one evaluation for all: 128 validation prompts answered with the run's seed's sampling
noise, scored by the reward model and by the VADER judge, KL to the SFT policy from the samples; with --judge llm a
judge LLM also compares each run's final answers with the SFT policy's (win rate, both orders). A run's wall time
and peak memory add up (time) or take the maximum (memory) over its stages, shared data stages included, so each is
what that run costs alone. A finished stage is skipped and an interrupted one continues (training from its last
checkpoint, generate and score from their finished shards); --overwrite redoes everything. An algorithm whose script
is not in the repository is skipped with a note.

    python tools/compare.py --episodes 3200       # everything, one seed (about 2 hours on 2 shared CPU cores)
    python tools/compare.py --algorithms ppo dpo --ppo 0.05 0.5 --dry_run    # the stages it would run
    python tools/compare.py --episodes 3200 --judge llm --judge_model gpt-4o-mini --judge_url https://api.openai.com/v1

Documentation: docs/comparison.md
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from typing import Literal

import matplotlib
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (the SFT and reward stages, and when a stage counts as finished)
import report  # noqa: E402  (reading eval rows)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT, DATA = quickstart.ROOT, quickstart.DATA
JUDGE = quickstart.JUDGE


@dataclass(frozen=True)
class Algorithm:
    label: str
    """name in the table and the plots"""
    script: str
    """the training script"""
    kind: str
    """online (samples as it trains), iterative (generate -> score -> filter -> train per iteration) or offline (one
    round of pairs from the SFT policy)"""
    strength: str
    """the argument that sets the pull towards the SFT policy"""
    extra: tuple[str, ...] = ()
    """its other arguments"""


# the quickstart's settings, shared by every algorithm of a kind; the strength argument is swept
ONLINE = ("--lr", "3e-5", "--batch_size", "64", "--local_micro_batch_size", "32")
PAIRS = ("--task.maxlen_prompt", "16", "--task.maxlen", "24", "--task.temperature", "0.7", "--lr", "3e-4",
         "--batch_size", "32", "--local_micro_batch_size", "16", "--num_train_epochs", "2", "--eval_freq", "10")
ALGORITHMS = {
    "ppo": Algorithm("PPO", "ppo.py", "online", "--ppo.kl_coef", ONLINE),
    "rebel_online": Algorithm("online REBEL", "rebel_online.py", "online", "--rebel.eta", ONLINE),
    "rloo": Algorithm("RLOO", "rloo.py", "online", "--rloo.kl_coef", (*ONLINE, "--rloo.k", "4")),
    # the same reward shaping for every online algorithm: grpo.py's non-EOS penalty is off by default (as in GRPO)
    "grpo": Algorithm("GRPO", "grpo.py", "online", "--grpo.beta", (*ONLINE, "--grpo.group_size", "4",
                                                                   "--task.non_eos_penalty")),
    "rebel": Algorithm("REBEL (offline)", "rebel.py", "iterative", "--rebel.eta", PAIRS),
    "iterative_dpo": Algorithm("iterative DPO", "dpo.py", "iterative", "--dpo.beta", PAIRS),
    "dpo": Algorithm("DPO", "dpo.py", "offline", "--dpo.beta", PAIRS),
}


# The arithmetic task (--task arith): a small model trained from scratch on data/arith's problems, a proxy reward model
# learned from comparisons of its answers labelled by the exact answer with label noise, every algorithm trained
# against the proxy (or, with --true_reward, against the exact answer itself) and scored by the truth.
ARITH_SCRIPT = os.path.join("data", "arith", "make_arith.py")
EXACT = os.path.join(ROOT, "data", "arith", "reward.py") + ":exact_answer"
LABELS = os.path.join("tools", "label_pairs.py")
ARITH_RL_PROMPTS = 256  # problems of the validation split: the prompts of the comparisons and of every run
# --true_reward: the offline and iterative runs' batch of pairs. A 0/1 reward gives a best/worst pair only where a
# problem's answers are neither all right nor all wrong (seed 1: 32 of 128 problems at iteration 0, 25 at iteration 1),
# so PAIRS' batch of 32 would make one update per epoch, or none (rebel.py and dpo.py refuse a batch above the data)
TRUE_PAIRS_BATCH = 8
EVAL = os.path.join("tools", "eval_policy.py")
# each algorithm's strengths of its pull to the SFT policy, per task (the arguments of the same names override them)
STRENGTHS = {"sst2": {"ppo": (0.02, 0.05, 0.2, 0.5, 1.0), "rebel_online": (0.3, 1.0, 3.0), "rloo": (0.05, 0.2, 0.5),
                      "grpo": (0.04, 0.2, 0.5), "rebel": (0.3, 1.0, 3.0), "iterative_dpo": (0.1, 0.3, 1.0),
                      "dpo": (0.1, 0.3, 1.0)},
             "arith": {"ppo": (0.02, 0.1, 0.5), "rebel_online": (0.3, 1.0, 3.0), "rloo": (0.02, 0.1, 0.5),
                       "grpo": (0.01, 0.05, 0.2), "rebel": (0.3, 1.0, 3.0), "iterative_dpo": (0.1, 0.3, 1.0),
                       "dpo": (0.1, 0.3, 1.0)}}


@dataclass
class Args:
    task: Literal["sst2", "arith"] = "sst2"
    """sst2: the offline SST-2 toy (the quickstart's SFT policy and reward model; VADER or an LLM judge); arith:
    data/arith's problems with a true reward (a small model trained from scratch, a proxy reward model learned from
    noisy comparisons, every policy scored by the exact answer)"""
    output_dir: str = "runs/compare"
    """folder that receives one subfolder per stage, stage_costs.json and report/"""
    true_reward: bool = False
    """arith: train every run against the exact answer itself (data/arith/reward.py:exact_answer) instead of the
    proxy reward model: each algorithm's ceiling at the budget (runs under seed{s}-true/; the offline and iterative
    runs train with batches of TRUE_PAIRS_BATCH = 8 pairs, as a 0/1 reward gives fewer pairs)"""
    flip_rate: float = 0.2
    """arith: fraction of the proxy reward model's training comparisons whose label is flipped at random"""
    sft_epochs: int = 80
    """arith: epochs of SFT over the 650 training problems (from scratch)"""
    temperature: float = 1.0
    """arith: sampling temperature of training (and of the sampled held-out evaluation)"""
    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    """which algorithms to run (ppo rebel_online rloo grpo rebel iterative_dpo dpo)"""
    seeds: tuple[int, ...] = (1,)
    """seeds of the algorithm runs (the SFT policy and reward model are trained once, with seed 1)"""
    episodes: int = 6400
    """the budget: responses sampled and scored by every run (the quickstart's 6,400)"""
    iterations: int = 2
    """iterations of offline REBEL and iterative DPO; each samples episodes / iterations responses"""
    num_responses: int = 4
    """responses per prompt of the offline algorithms (the best and worst make a pair)"""
    evals: int = 4
    """held-out evaluations of the online runs after the one at the start"""
    eval_size: int = 128
    """held-out prompts per evaluation"""
    ppo: tuple[float, ...] | None = None
    """PPO's --ppo.kl_coef values; None: STRENGTHS[task]["ppo"] (sst2: 0.02 0.05 0.2 0.5 1; the quickstart's is 0.05)"""
    rebel_online: tuple[float, ...] | None = None
    """online REBEL's --rebel.eta values (larger: the policy moves further); None: the task's defaults (STRENGTHS)"""
    rloo: tuple[float, ...] | None = None
    """RLOO's --rloo.kl_coef values; None: the task's defaults (STRENGTHS)"""
    grpo: tuple[float, ...] | None = None
    """GRPO's --grpo.beta values; None: the task's defaults (STRENGTHS)"""
    rebel: tuple[float, ...] | None = None
    """offline REBEL's --rebel.eta values (larger: the policy moves further); None: the task's defaults (STRENGTHS)"""
    iterative_dpo: tuple[float, ...] | None = None
    """iterative DPO's --dpo.beta values (smaller: the policy moves further); None: the task's defaults (STRENGTHS)"""
    dpo: tuple[float, ...] | None = None
    """DPO's --dpo.beta values; None: the task's defaults (STRENGTHS)"""
    judge: Literal["vader", "llm"] = "vader"
    """the judge of the held-out answers: vader (VADER's sentiment score at every evaluation, no model needed) or llm
    (tools/judge.py: a judge LLM's win rate of each run's final answers against the SFT policy's, both orders)"""
    judge_model: str | None = None
    """--judge llm: the judge (a chat model's hub id or folder, or the model name --judge_url serves)"""
    judge_url: str | None = None
    """--judge llm: an OpenAI-compatible endpoint (https://api.openai.com/v1, http://localhost:8000); None: the judge
    runs in the judge stage's process (transformers, or vLLM on a GPU)"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """--judge llm: environment variable holding the endpoint's key (read by tools/judge.py, written nowhere)"""
    judge_template: Literal["sentiment", "tldr", "chat"] = "sentiment"
    """--judge llm: the question (tools/judge.py's --template): sentiment, the toy's (which continuation of a review's
    opening words is more positive); tldr (which summary is better); chat (which reply helps more)"""
    overwrite: bool = False
    """redo every stage, even those already finished"""
    dry_run: bool = False
    """print the stages that would run and exit"""
    report_only: bool = False
    """run nothing: write report/ from the runs already finished"""


@dataclass
class Stage:
    folder: str
    script: str
    args: list
    run: tuple | None = None
    """(algorithm, value, seed) of the run this stage belongs to (None: SFT, reward model); shared data stages are
    listed once per run that uses them and run once"""


def missing(args):
    """The algorithms asked for whose script is not in the repository (yet)."""
    for name in args.algorithms:
        if name not in ALGORITHMS:
            raise SystemExit(f"--algorithms: unknown {name!r}; known: {' '.join(ALGORITHMS)}")
    return [name for name in args.algorithms if not os.path.exists(os.path.join(ROOT, ALGORITHMS[name].script))]


def runs(args):
    """(algorithm name, value, seed) of every run asked for whose script exists, in order."""
    result, skip = [], missing(args)
    for name in args.algorithms:
        if name in skip:
            continue
        result += [(name, value, seed) for seed in args.seeds for value in strengths(args, name)]
    return result


def strengths(args, name):
    """The values of the algorithm's strength argument: as given, or the task's defaults."""
    given = getattr(args, name)
    return STRENGTHS[args.task][name] if given is None else given


def run_folder(args, name, value, seed):
    return os.path.join(args.output_dir, f"seed{seed}" + ("-true" if args.true_reward else ""), f"{name}_{value:g}")


def eval_folder(args, name, value, seed):
    """The folder that holds (or will hold) the run's held-out evaluations: metrics.jsonl and eval_samples.jsonl."""
    folder = run_folder(args, name, value, seed)
    return folder if ALGORITHMS[name].kind == "online" else os.path.join(folder, "eval")


def check_judge(args):
    if args.judge == "llm" and not args.judge_model:
        raise SystemExit("--judge llm needs --judge_model (a chat model's hub id or folder, or the model name "
                         "--judge_url serves)")
    defaults = {f.name: f.default for f in fields(Args)}
    given = [f"--{name}" for name in ("judge_model", "judge_url", "judge_api_key_env", "judge_template")
             if getattr(args, name) != defaults[name]]
    if args.judge == "vader" and given:
        raise SystemExit(f"{' '.join(given)}: only with --judge llm (the judge is VADER unless --judge llm is given)")


def judge_stage(args, name, value, seed, final):
    """tools/judge.py on the run's eval_samples.jsonl: its final evaluation (update `final`) against the SFT policy's
    (update 0), joined on the held-out prompt's index."""
    samples = os.path.join(eval_folder(args, name, value, seed), "eval_samples.jsonl")
    return Stage(os.path.join(run_folder(args, name, value, seed), "judge"), JUDGE, [
        "--a", samples, "--a_where", f"update={final}", "--b", samples, "--b_where", "update=0",
        "--a_column", "response", "--b_column", "response", "--a_id_column", "index", "--b_id_column", "index",
        "--template", args.judge_template, "--judge_model", args.judge_model,
        *(["--judge_url", args.judge_url] if args.judge_url else []), "--judge_api_key_env", args.judge_api_key_env],
        (name, value, seed))


def finished(stage):
    """Whether a stage's folder holds its finished output (quickstart.finished: a judgment's summary.json too; the
    arithmetic problems: validation.jsonl, written last; labelled comparisons: summary.json, written last)."""
    if stage.script in (ARITH_SCRIPT, LABELS):
        return os.path.exists(os.path.join(stage.folder, "validation.jsonl" if stage.script == ARITH_SCRIPT else
                                           "summary.json"))
    return quickstart.finished(stage.folder, stage.script)


def check_budget(args):
    per_iteration = args.iterations * args.num_responses
    if args.episodes % per_iteration or args.episodes % 64:
        raise SystemExit(f"--episodes {args.episodes}: must be a multiple of 64 (the online batch) and of iterations "
                         f"x num_responses = {per_iteration}")
    limit = ARITH_RL_PROMPTS if args.task == "arith" else 6000
    if args.episodes // args.num_responses > limit and not args.report_only:
        raise SystemExit(f"--episodes {args.episodes}: more prompts ({args.episodes // args.num_responses}) than the "
                         f"{limit:,} of the training split")


def pair_stages(args, out, policy, start, end, seed):
    """generate -> score -> filter from `policy` on training prompts [start, end), into out/{generate,score,filter}."""
    seed_args = ["--seed", str(seed)]
    return [
        Stage(os.path.join(out, "generate"), "generate.py", [
            "--model_name_or_path", policy, "--dataset", DATA, "--split", "train", "--prompt_column", "sentence",
            "--prompt_format", "text", "--prompt_words", "4", "--maxlen", "24", "--num_responses",
            str(args.num_responses), "--temperature", "0.7", "--top_p", "1.0", "--start_idx", str(start), "--end_idx",
            str(end), "--backend", "hf", "--local_micro_batch_size", "64", *seed_args]),
        Stage(os.path.join(out, "score"), "score.py", [
            "--reward_model", os.path.join(args.output_dir, "reward"), "--dataset", os.path.join(out, "generate"),
            "--prompt_format", "text", "--local_micro_batch_size", "64"]),
        Stage(os.path.join(out, "filter"), "filter.py", [
            "--dataset", os.path.join(out, "score"), "--model_name_or_path", policy, "--prompt_format", "text",
            "--maxlen_prompt", "16", "--maxlen", "24", "--test_size", "0.1", *seed_args]),
    ]


def arith_base_stages(args):
    """--task arith's shared stages: the problems, the SFT policy (from scratch), its sampled answers to training and
    held-out problems scored by the exact answer, comparisons labelled from them with --flip_rate of the training
    labels flipped, and the proxy reward model trained on those comparisons."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    data, sft, seed = out("data"), out("sft"), ["--seed", "1"]
    result = [Stage(data, ARITH_SCRIPT, ["--wording", "plain", "--num_train", "400", "--num_validation",
                                         str(ARITH_RL_PROMPTS)]),
              Stage(sft, "sft.py", [
                  "--model_name_or_path", quickstart.TINY, "--from_scratch", "--disable_dropout", "--task.dataset",
                  data, "--task.eval_split", "test", "--task.response_column", "equation", "--task.maxlen_prompt", "32",
                  "--task.maxlen", "16", "--lr", "1e-3", "--warmup_ratio", "0.05", "--batch_size", "64",
                  "--local_micro_batch_size", "64", "--num_train_epochs", str(args.sft_epochs), "--eval_freq", "1000",
                  *seed])]
    for split in ("train", "validation", "test"):  # 8 answers per problem, scored by the truth
        result += [Stage(out("answers", split, "generate"), "generate.py", [
            "--model_name_or_path", sft, "--dataset", data, "--split", split, "--prompt_column", "prompt",
            "--prompt_format", "text", "--keep_columns", "answer", "--maxlen", "16", "--num_responses", "8",
            "--temperature", f"{args.temperature:g}", "--top_p", "1.0", "--backend", "hf", "--local_micro_batch_size",
            "64", *seed]),
            Stage(out("answers", split, "score"), "score.py", [
                "--reward_fn", EXACT, "--dataset", out("answers", split, "generate"), "--prompt_format", "text"])]
    result += [Stage(out("comparisons"), LABELS, [
        "--train", out("answers", "train", "score"), out("answers", "validation", "score"), "--validation",
        out("answers", "test", "score"),
        "--flip_rate", f"{args.flip_rate:g}", *seed]),
        Stage(out("reward"), "reward.py", [
            "--model_name_or_path", sft, "--task.dataset", os.path.join(out("comparisons"), "train.jsonl"),
            "--task.eval_dataset", os.path.join(out("comparisons"), "validation.jsonl"), "--task.eval_split", "train",
            "--task.eval_size", "100000", "--task.prompt_format", "text", "--task.maxlen", "48", "--lr", "3e-4",
            "--batch_size", "32", "--local_micro_batch_size", "32", "--num_train_epochs", "2", "--eval_freq", "50",
            *seed])]
    return result


def with_settings(extra, **settings):
    """extra (an Algorithm's arguments) with the values of the flags in settings replaced (or appended)."""
    extra = list(extra)
    for flag, value in settings.items():
        flag = "--" + flag.replace("__", ".")
        if flag in extra:
            extra[extra.index(flag) + 1] = value
        else:
            extra += [flag, value]
    return extra


def arith_eval_stages(args, folder, policies, episodes, seed, run):
    """tools/eval_policy.py on the run's policies (and the SFT policy, first): reward-model score, exact-answer
    accuracy of samples at the training temperature and of greedy answers, KL to the SFT policy; on the 200 held-out
    test problems (eval/) and on the 256 problems the runs train on (eval_rl/: what the optimisation reaches, whether
    or not it carries over to new problems)."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    return [Stage(os.path.join(folder, where), EVAL, [
        "--policies", *policies, "--episodes", *map(str, episodes), "--reference", out("sft"), "--reward_model",
        out("reward"), "--dataset", out("data"), "--eval_split", split, "--prompt_column", "prompt", "--prompt_words",
        "0", "--maxlen_prompt", "32", "--response_length", "16", "--temperature", f"{args.temperature:g}",
        "--eval_size", str(size), "--gold_reward_fn", EXACT, "--greedy", "--seed", str(seed)], run)
        for where, split, size in (("eval", "test", args.eval_size), ("eval_rl", "validation", ARITH_RL_PROMPTS))]


def arith_stages(args):
    """--task arith: the shared stages, then every run against the proxy reward model (or, --true_reward, the exact
    answer), each ending with its evaluation by the truth."""
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    data, sft, reward = out("data"), out("sft"), out("reward")
    scorer = ["--reward_fn", EXACT] if args.true_reward else None
    result = arith_base_stages(args)
    task = {"task__maxlen_prompt": "32", "task__temperature": f"{args.temperature:g}"}
    per_iteration = args.episodes // args.iterations // args.num_responses
    pair_task = {"task__maxlen": "16", **({"batch_size": str(TRUE_PAIRS_BATCH), "local_micro_batch_size":
                                           str(TRUE_PAIRS_BATCH)} if args.true_reward else {})}
    for name, value, seed in runs(args):
        algo, folder, run = ALGORITHMS[name], run_folder(args, name, value, seed), (name, value, seed)
        common = [algo.strength, f"{value:g}", "--seed", str(seed)]
        if algo.kind == "online":
            updates = args.episodes // 64
            extra = with_settings(algo.extra, **task, task__prompt_column="prompt", task__prompt_words="0",
                                  task__response_length="16", task__train_split="validation", task__eval_split="test")
            result += [Stage(folder, algo.script, [
                "--model_name_or_path", sft, *(scorer or ["--reward_model_name_or_path", reward]), "--task.dataset",
                data, *extra, "--total_episodes", str(args.episodes), "--eval_freq", str(max(1, updates // args.evals)),
                "--eval_size", str(args.eval_size), *common], run),
                *arith_eval_stages(args, folder, [folder], [args.episodes], seed, run)]
            continue
        iterations = args.iterations if algo.kind == "iterative" else 1
        policies, episodes, policy = [], [], sft
        for t in range(iterations):
            shared = t == 0  # iteration 0's answers come from the SFT policy: shared by every run of the seed
            where = out(f"seed{seed}" + ("-true" if args.true_reward else ""), "data",
                        "iter0" if algo.kind == "iterative" else "all") if shared else os.path.join(folder, f"iter{t}")
            start = 0 if shared else t * per_iteration
            end = (per_iteration if algo.kind == "iterative" else per_iteration * args.iterations) if shared else \
                (t + 1) * per_iteration
            result += [Stage(os.path.join(where, "generate"), "generate.py", [
                "--model_name_or_path", policy, "--dataset", data, "--split", "validation", "--prompt_column", "prompt",
                "--prompt_format", "text", "--keep_columns", "answer", "--maxlen", "16", "--num_responses",
                str(args.num_responses), "--temperature", f"{args.temperature:g}", "--top_p", "1.0", "--start_idx",
                str(start), "--end_idx", str(end), "--backend", "hf", "--local_micro_batch_size", "64", "--seed",
                str(seed)], run),
                Stage(os.path.join(where, "score"), "score.py", [
                    *(scorer or ["--reward_model", reward]), "--dataset", os.path.join(where, "generate"),
                    "--prompt_format", "text", "--local_micro_batch_size", "64"], run),
                Stage(os.path.join(where, "filter"), "filter.py", [
                    "--dataset", os.path.join(where, "score"), "--model_name_or_path", policy, "--prompt_format",
                    "text", "--maxlen_prompt", "32", "--maxlen", "16", "--test_size", "0.1", "--seed", str(seed)], run)]
            train = os.path.join(folder, f"iter{t}", "train")
            extra = with_settings(algo.extra, **task, **pair_task)
            result.append(Stage(train, algo.script, ["--model_name_or_path", policy, "--task.dataset",
                                                     os.path.join(where, "filter"), *extra, *common], run))
            policy = train
            policies.append(train)
            episodes.append(args.episodes * (t + 1) // iterations)
        result += arith_eval_stages(args, folder, policies, episodes, seed, run)
    return result


def stages(args):
    """Every Stage, in order: the SFT policy and reward model, then each run's stages (with --judge llm, ending with
    its judge stage)."""
    check_budget(args)
    check_judge(args)
    if args.task == "arith":
        return arith_stages(args)
    out = lambda *name: os.path.join(args.output_dir, *name)  # noqa: E731
    sft, reward = out("sft"), out("reward")
    result = [Stage(folder, script, script_args) for folder, script, script_args in
              quickstart.stages(quickstart.Args(output_dir=args.output_dir))[:2]]
    per_iteration = args.episodes // args.iterations // args.num_responses  # prompts per iteration
    for name, value, seed in runs(args):
        algo, folder, run = ALGORITHMS[name], run_folder(args, name, value, seed), (name, value, seed)
        common = [algo.strength, f"{value:g}", "--seed", str(seed)]
        if algo.kind == "online":
            updates = args.episodes // 64
            result.append(Stage(folder, algo.script, [
                "--model_name_or_path", sft, "--reward_model_name_or_path", reward, "--task.dataset", DATA,
                *algo.extra, "--total_episodes", str(args.episodes), "--eval_freq", str(max(1, updates // args.evals)),
                "--eval_size", str(args.eval_size), *common], run))
            if args.judge == "llm":  # the online scripts evaluate at the last update too
                batch = int(algo.extra[algo.extra.index("--batch_size") + 1])
                result.append(judge_stage(args, name, value, seed, args.episodes // batch))
            continue
        iterations = args.iterations if algo.kind == "iterative" else 1
        policies, episodes, policy = [], [], sft
        for t in range(iterations):
            if t == 0:  # pairs from the SFT policy, shared by every run of this seed that starts with them
                data = out(f"seed{seed}", "data", "iter0" if algo.kind == "iterative" else "all")
                prompts = per_iteration if algo.kind == "iterative" else per_iteration * args.iterations
                result += [Stage(s.folder, s.script, s.args, run) for s in pair_stages(args, data, sft, 0, prompts,
                                                                                          seed)]
            else:
                data = os.path.join(folder, f"iter{t}")
                result += [Stage(s.folder, s.script, s.args, run) for s in pair_stages(
                    args, data, policy, t * per_iteration, (t + 1) * per_iteration, seed)]
            train = os.path.join(folder, f"iter{t}", "train")
            result.append(Stage(train, algo.script, ["--model_name_or_path", policy, "--task.dataset",
                                                     os.path.join(data, "filter"), *algo.extra, *common], run))
            policy = train
            policies.append(train)
            episodes.append(args.episodes * (t + 1) // iterations)
        result.append(Stage(os.path.join(folder, "eval"), os.path.join("tools", "eval_policy.py"), [
            "--policies", *policies, "--episodes", *map(str, episodes), "--reference", sft, "--reward_model", reward,
            "--dataset", DATA, "--eval_size", str(args.eval_size), "--seed", str(seed)], run))
        if args.judge == "llm":  # eval_policy.py's update t: the t-th policy (0: the SFT policy)
            result.append(judge_stage(args, name, value, seed, len(policies)))
    return result


def stage_command(stage, overwrite, env):
    """The command line of a stage, and its environment."""
    if stage.script == JUDGE:
        again = ["--overwrite"] if overwrite else []
        # the judge may be a hub model: the user's own hub settings, not the toy's offline ones
        env = {**{k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")},
               **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k in os.environ}}
    elif stage.script.startswith(("tools", "data")):
        again = []
    elif overwrite:
        again = ["--overwrite"]
    else:
        again = ["--resume", "auto"] if stage.script in quickstart.TRAINERS else []
    return [sys.executable, os.path.join(ROOT, stage.script), *stage.args, "--output_dir", stage.folder, *again], env


def run_stage(stage, overwrite, env):
    """Run one stage as a subprocess; its wall time (s) and peak resident memory (MiB, the child's ru_maxrss)."""
    cmd, env = stage_command(stage, overwrite, env)
    print(f"[compare] {stage.folder}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    child = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    wall = time.time() - start
    print(f"[compare] {stage.folder}: done in {wall:.0f} s, peak memory {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}


# ----------------------------------------------------------------------------------------------------------------
# results: read every run's held-out evaluations, tabulate and plot


def eval_path(args, name, value, seed):
    """The folder with the run's held-out evaluations, or None if the run has not finished."""
    online, path = ALGORITHMS[name].kind == "online", eval_folder(args, name, value, seed)
    done = os.path.exists(os.path.join(path, "config.json" if online else "metrics.jsonl"))
    return path if done else None


def judge_change(path):
    """The judge's change from the first evaluation (the SFT policy) to the last, over the same held-out prompts: its
    mean and the standard error of that mean (paired by prompt)."""
    by_update = {}
    for s in report.read_jsonl(os.path.join(path, "eval_samples.jsonl")):
        by_update.setdefault(s["update"], {})[s["index"]] = s["judge"]
    first, last = by_update[min(by_update)], by_update[max(by_update)]
    diffs = [last[i] - first[i] for i in first if i in last]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
    return mean, se


def collect(args, costs):
    """One record per finished run: final eval numbers, the curve, the SFT policy's numbers (episode 0), costs."""
    records = []
    for name, value, seed in runs(args):
        path = eval_path(args, name, value, seed)
        if path is None:
            print(f"[compare] {name} {value:g} seed {seed}: not finished, left out of the report")
            continue
        rows, (judge_delta, judge_se) = report.eval_rows(path), judge_change(path)
        win = {}
        if args.judge == "llm":
            summary_path = os.path.join(run_folder(args, name, value, seed), "judge", "summary.json")
            if not os.path.exists(summary_path):
                print(f"[compare] {name} {value:g} seed {seed}: not judged ({summary_path} missing), left out of the "
                      "report")
                continue
            with open(summary_path) as f:
                summary = json.load(f)
            win = {"win_rate": summary["win_rate"], "win_se": summary["stderr"], "judge_n": summary["n"],
                   "judge_prompts": summary["prompts"], "judge_ties": summary["ties"],
                   "judge_unparseable": summary["unparseable"]}
        run_costs = [c for folder, c in costs.items() if [name, value, seed] in c.get("runs", [])]
        records.append({
            "algorithm": name, "label": ALGORITHMS[name].label, "strength": ALGORITHMS[name].strength, "value": value,
            "seed": seed, "scores": rows[-1]["eval/scores"], "judge": rows[-1]["eval/judge"], "kl": rows[-1]["eval/kl"],
            "sft_scores": rows[0]["eval/scores"], "sft_judge": rows[0]["eval/judge"], "judge_delta": judge_delta,
            "judge_se": judge_se, **win,
            "curve": [{k: r[k] for k in ("episode", "eval/scores", "eval/judge", "eval/kl")} for r in rows],
            "wall_s": sum(c["wall_s"] for c in run_costs) if run_costs else None,
            "peak_mib": max(c["peak_mib"] for c in run_costs) if run_costs else None})
    return records


def mean_std(values, fmt, se=False):
    """mean ± standard deviation over seeds (se: ± the standard error of the mean); the mean alone for one seed."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / (len(values) if se else 1))
    return f"{format(mean, fmt)} ± {format(spread, fmt.lstrip('+'))}"


def verdict(r):
    """Whether the judge agrees with the reward model's rise, beyond the noise of the held-out sample: the VADER
    judge's paired change, or (--judge llm) the win rate against the SFT policy's answers compared with 0.5."""
    if "win_rate" in r:
        if r["win_rate"] is None:
            return "n/a"
        se = r["win_se"] if r["win_se"] is not None else math.inf  # fewer than 2 prompts judged: no noise estimate
        if r["scores"] > r["sft_scores"] and r["win_rate"] > 0.5 + 2 * se:
            return "yes"
        return "no" if r["win_rate"] < 0.5 - 2 * se or r["scores"] <= r["sft_scores"] else "within noise"
    if r["scores"] > r["sft_scores"] and r["judge_delta"] > 2 * r["judge_se"]:
        return "yes"
    return "no" if r["judge_delta"] < -2 * r["judge_se"] or r["scores"] <= r["sft_scores"] else "within noise"


def table(records, args):
    """The paper-shaped table (markdown lines): one row per algorithm and setting, ± over seeds."""
    groups = {}
    for r in records:
        groups.setdefault((r["algorithm"], r["value"]), []).append(r)
    sft = {r["seed"]: (r["sft_scores"], r["sft_judge"]) for r in records}
    seeds = ", ".join(map(str, args.seeds))
    head = (f"Budget: {args.episodes:,} sampled and scored responses per run; seeds {seeds}; held out: "
            f"{args.eval_size} validation prompts. Wall time and peak memory (ru_maxrss of the child "
            "processes, via os.wait4) add up over a run's stages, shared data stages included.")
    if args.judge == "llm":
        return llm_table(records, groups, sft, head, args)
    lines = [head, "",
             "| algorithm | setting | RM score | judge (VADER) | judge − SFT's (± s.e.) | KL to SFT | judge agrees | "
             "wall time (s) | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|",
             f"| SFT policy | | {mean_std([s for s, _ in sft.values()], '+.3f')} | "
             f"{mean_std([j for _, j in sft.values()], '+.3f')} | | 0 | | | |"]
    for (_, value), rs in groups.items():
        verdicts = [verdict(r) for r in rs]
        agrees = verdicts[0] if len(set(verdicts)) == 1 else ", ".join(verdicts)
        lines.append(f"| {rs[0]['label']} | {rs[0]['strength'].split('.')[-1]} {value:g} | "
                     f"{mean_std([r['scores'] for r in rs], '+.3f')} | {mean_std([r['judge'] for r in rs], '+.3f')} | "
                     + " / ".join(f"{r['judge_delta']:+.3f} ± {r['judge_se']:.3f}" for r in rs) + " | "
                     f"{mean_std([r['kl'] for r in rs], '.2f')} | {agrees} | "
                     f"{mean_std([r['wall_s'] for r in rs], '.0f')} | {mean_std([r['peak_mib'] for r in rs], '.0f')} |")
    lines += ["", "judge − SFT's: the judge's change on the same held-out prompts (per seed, ± the paired standard "
              "error). judge agrees: yes when the reward-model score rose and the judge rose by more than 2 standard "
              "errors; no when the judge fell by more than 2; within noise otherwise."]
    return lines


def llm_table(records, groups, sft, head, args):
    """table() with --judge llm: the judge LLM's win rate against the SFT policy's answers replaces VADER's columns."""
    win = lambda r: "n/a" if r["win_rate"] is None else f"{r['win_rate']:.3f} ± " + (  # noqa: E731
        "n/a" if r["win_se"] is None else f"{r['win_se']:.3f}")
    lines = [head + f" Judge: {args.judge_model} (tools/judge.py --template {args.judge_template}), each run's final "
             "answers against the SFT policy's to the same held-out prompts, both orders; its time is not in the "
             "run's wall time.", "",
             "| algorithm | setting | RM score | win rate vs SFT (± s.e.) | KL to SFT | judge agrees | wall time (s) | "
             "peak memory (MiB) |", "|---|---|---|---|---|---|---|---|",
             f"| SFT policy | | {mean_std([s for s, _ in sft.values()], '+.3f')} | | 0 | | | |"]
    for (_, value), rs in groups.items():
        verdicts = [verdict(r) for r in rs]
        agrees = verdicts[0] if len(set(verdicts)) == 1 else ", ".join(verdicts)
        lines.append(f"| {rs[0]['label']} | {rs[0]['strength'].split('.')[-1]} {value:g} | "
                     f"{mean_std([r['scores'] for r in rs], '+.3f')} | " + " / ".join(map(win, rs)) + " | "
                     f"{mean_std([r['kl'] for r in rs], '.2f')} | {agrees} | "
                     f"{mean_std([r['wall_s'] for r in rs], '.0f')} | {mean_std([r['peak_mib'] for r in rs], '.0f')} |")
    lines += ["", "win rate vs SFT: the share of held-out prompts on which the judge preferred the run's final answer "
              "to the SFT policy's (each prompt asked in both orders, a tie or a split counting one half; per seed, "
              "± its standard error over the prompts). judge agrees: yes when the reward-model score rose and the "
              "win rate is above 0.5 by more than 2 standard errors; no when it is below 0.5 by more than 2 or the "
              "score did not rise; within noise otherwise."]
    return lines


def plots(records, out, args):
    """frontier.png (score and judge against KL, one marker per algorithm and setting, mean over seeds; with --judge
    llm the judge panel is the win rate against the SFT policy's answers) and curves.png (score and VADER's judge
    against episodes, one line per run)."""
    llm = args.judge == "llm"
    names = list(dict.fromkeys(r["algorithm"] for r in records))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    sft_scores = sum(r["sft_scores"] for r in records) / len(records)
    sft_judge = 0.5 if llm else sum(r["sft_judge"] for r in records) / len(records)
    judge_key = "win_rate" if llm else "judge"
    judge_title = f"judge: win rate vs SFT ({args.judge_model})" if llm else "judge: VADER compound (held out)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        points = {}
        for r in records:
            if r["algorithm"] == name:
                points.setdefault(r["value"], []).append(r)
        for ax, key in zip(axes, ("scores", judge_key)):
            # joined in the order of the setting, from one end of its range to the other (a run without a win rate:
            # every judge answer unparseable, left out of the judge panel)
            order = [v for v in sorted(points) if any(r[key] is not None for r in points[v])]
            xs = [sum(r["kl"] for r in points[v] if r[key] is not None) / sum(r[key] is not None for r in points[v])
                  for v in order]
            ys = [sum(r[key] for r in points[v] if r[key] is not None) / sum(r[key] is not None for r in points[v])
                  for v in order]
            ax.plot(xs, ys, marker="o", color=colors[name], label=ALGORITHMS[name].label)
            for v, x, y in zip(order, xs, ys):
                ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colors[name])
    for ax, sft, title in zip(axes, (sft_scores, sft_judge), ("reward-model score (held out)", judge_title)):
        ax.scatter([0], [sft], marker="*", s=120, color="black", zorder=3, label="SFT policy")
        ax.axhline(sft, color="black", linewidth=0.6, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KL to the SFT policy (nats per response)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("reward versus KL: offline SST-2 toy (tiny GPT-2, synthetic corpus); labels: the KL-strength setting",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-."]
    for name in names:
        values = list(dict.fromkeys(r["value"] for r in records if r["algorithm"] == name))
        for r in records:
            if r["algorithm"] != name:
                continue
            style = styles[values.index(r["value"]) % len(styles)]
            label = f"{r['label']} {r['strength'].split('.')[-1]} {r['value']:g}" if r["seed"] == records[0][
                "seed"] else None
            for ax, key in zip(axes, ("eval/scores", "eval/judge")):
                ax.plot([c["episode"] for c in r["curve"]], [c[key] for c in r["curve"]], style, marker="o",
                        markersize=2.5, color=colors[name], label=label)
    for ax, title in zip(axes, ("reward-model score (held out)", "judge: VADER compound (held out)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episodes (responses sampled and scored)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)


def run_costs(costs, name, value, seed):
    """A run's wall time (summed over its stages, shared ones included) and peak memory (the largest)."""
    found = [c for c in costs.values() if [name, value, seed] in c.get("runs", [])]
    return (sum(c["wall_s"] for c in found) if found else None), (max(c["peak_mib"] for c in found) if found else None)


def gold_curve(args, folder):
    """An online run's held-out curve scored by the truth: the share of right answers among the samples of each
    evaluation in its eval_samples.jsonl (the proxy's score and the KL come from its metrics.jsonl)."""
    answers = [row["answer"] for row in report.read_jsonl(os.path.join(args.output_dir, "data", "test.jsonl"))]
    path, name = EXACT.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("arith_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exact = getattr(module, name)
    by_update = {}
    for sample in report.read_jsonl(os.path.join(folder, "eval_samples.jsonl")):
        by_update.setdefault(sample["update"], []).append(sample)
    curve = []
    for row in report.eval_rows(folder):
        samples = by_update[row["update"]] if "update" in row else by_update[min(by_update)]
        gold = exact(None, [s["response"] for s in samples], [answers[s["index"]] for s in samples])
        curve.append({"episode": row["episode"], "scores": row["eval/scores"], "kl": row["eval/kl"],
                      "gold": sum(gold) / len(gold)})
    return curve


def arith_collect(args, costs):
    """One record per finished run of --task arith: the final policy's and the SFT policy's held-out numbers (the
    run's eval/ stage: proxy score, exact-answer accuracy sampled and greedy, KL), its curve, its costs."""
    keys = {"scores": "eval/scores", "gold": "eval/gold", "gold_greedy": "eval/gold_greedy", "kl": "eval/kl",
            "scores_greedy": "eval/scores_greedy"}
    records = []
    for name, value, seed in runs(args):
        folder = run_folder(args, name, value, seed)
        path = os.path.join(folder, "eval", "metrics.jsonl")
        if not os.path.exists(path):
            print(f"[compare] {name} {value:g} seed {seed}: not finished, left out of the report")
            continue
        rows = report.read_jsonl(path)
        online = ALGORITHMS[name].kind == "online"
        curve = gold_curve(args, folder) if online else [
            {"episode": r["episode"], "scores": r["eval/scores"], "kl": r["eval/kl"], "gold": r["eval/gold"]}
            for r in rows]
        wall, peak = run_costs(costs, name, value, seed)
        rl_path = os.path.join(folder, "eval_rl", "metrics.jsonl")  # the problems trained on (None: not evaluated)
        rl = report.read_jsonl(rl_path) if os.path.exists(rl_path) else None
        records.append({"algorithm": name, "label": ALGORITHMS[name].label, "strength": ALGORITHMS[name].strength,
                        "value": value, "seed": seed, **{k: rows[-1][v] for k, v in keys.items()},
                        **{f"sft_{k}": rows[0][v] for k, v in keys.items()},
                        **{f"rl_{k}": rl and rl[-1]["eval/" + k] for k in ("gold", "gold_greedy", "scores")},
                        **{f"sft_rl_{k}": rl and rl[0]["eval/" + k] for k in ("gold", "gold_greedy", "scores")},
                        "curve": curve, "wall_s": wall, "peak_mib": peak})
    return records


def arith_groups(records):
    """{algorithm: [(value, [records of its seeds]), ...] in the order of the mean KL}"""
    groups = {}
    for r in records:
        groups.setdefault(r["algorithm"], {}).setdefault(r["value"], []).append(r)
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    return {name: sorted(by_value.items(), key=lambda item: mean(item[1], "kl")) for name, by_value in groups.items()}


def misleads_from(settings):
    """The smallest mean KL at which a stronger setting raised the proxy's score but lowered the true sampled accuracy
    (Gao et al.'s over-optimisation), comparing neighbours in KL order, the SFT policy (KL 0) first; None if it never
    did."""
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    rs = settings[0][1]
    points = [(0.0, mean(rs, "sft_scores"), mean(rs, "sft_gold"))] + [
        (mean(rs, "kl"), mean(rs, "scores"), mean(rs, "gold")) for _, rs in settings]
    for (kl, proxy, gold), (_, proxy_next, gold_next) in zip(points, points[1:]):
        if proxy_next > proxy and gold_next < gold:
            return kl
    return None


def arith_table(records, args):
    """The paper-shaped table of --task arith (markdown lines): per algorithm and setting, mean ± standard error over
    seeds of the true accuracy on the held-out problems (greedy and sampled) and on the problems trained on (greedy),
    each with its paired change against the SFT policy, the proxy's score and the KL; then per algorithm its best
    true accuracy and where the proxy starts to mislead."""
    seeds = ", ".join(map(str, args.seeds))
    reward = "the exact answer itself (--true_reward)" if args.true_reward else \
        f"the proxy reward model (comparisons with {args.flip_rate:g} of the labels flipped)"
    sft = list({r["seed"]: r for r in records}.values())
    cell = lambda rs, key, fmt: mean_std([r[key] for r in rs], fmt, se=True)  # noqa: E731
    delta = lambda rs, key: mean_std([r[key] - r[f"sft_{key}"] for r in rs if r[key] is not None], "+.3f", se=True)  # noqa: E731
    lines = [f"Budget: {args.episodes:,} sampled and scored responses per run, trained against {reward}; seeds "
             f"{seeds}; held out: {args.eval_size} test problems (disjoint from training by (operation, a, b)); "
             f"trained on: the {ARITH_RL_PROMPTS} problems of the runs' prompts; sampled at temperature "
             f"{args.temperature:g}. ± is the standard error over seeds; Δ is paired with the SFT policy's evaluation "
             "under the same seed's sampling noise. Wall time and peak memory add up (max) over a run's stages, shared "
             "data stages included.", "",
             "| algorithm | setting | held out: acc. greedy | Δ | acc. sampled | Δ | trained on: acc. greedy | Δ | "
             "proxy score | KL to SFT | wall time (s) | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| SFT policy | | {cell(sft, 'sft_gold_greedy', '.3f')} | | {cell(sft, 'sft_gold', '.3f')} | | "
             f"{cell(sft, 'sft_rl_gold_greedy', '.3f')} | | {cell(sft, 'sft_scores', '+.3f')} | 0 | | |"]
    summary = []
    for settings in arith_groups(records).values():
        for value, rs in settings:
            lines.append(f"| {rs[0]['label']} | {rs[0]['strength'].split('.')[-1]} {value:g} | "
                         f"{cell(rs, 'gold_greedy', '.3f')} | {delta(rs, 'gold_greedy')} | {cell(rs, 'gold', '.3f')} | "
                         f"{delta(rs, 'gold')} | {cell(rs, 'rl_gold_greedy', '.3f')} | {delta(rs, 'rl_gold_greedy')} | "
                         f"{cell(rs, 'scores', '+.3f')} | {cell(rs, 'kl', '.2f')} | {cell(rs, 'wall_s', '.0f')} | "
                         f"{cell(rs, 'peak_mib', '.0f')} |")
        best_value, best = max(settings, key=lambda item: sum(r["gold_greedy"] for r in item[1]) / len(item[1]))
        kl = misleads_from(settings)
        proxy = "" if args.true_reward else "; the proxy " + (
            "did not mislead within these settings" if kl is None else "misleads from the SFT policy on (its first "
            "setting raised the proxy's score and lowered the true sampled accuracy)" if kl == 0 else
            f"starts to mislead beyond KL {kl:.2f} (a stronger setting raised its score and lowered the true sampled "
            "accuracy)")
        summary.append(f"- {best[0]['label']}: best held-out greedy accuracy {cell(best, 'gold_greedy', '.3f')} "
                       f"({best[0]['strength'].split('.')[-1]} {best_value:g}){proxy}")
    return lines + ["", *summary]


def arith_plots(records, out, args):
    """frontier.png (Gao et al.'s picture: true accuracy and proxy score against KL to the SFT policy, one line per
    algorithm through its settings, mean over seeds) and curves.png (the proxy's score and the true accuracy of the
    held-out samples against episodes, one line per run)."""
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    panels = [("gold", "true accuracy, sampled (held out)"), ("gold_greedy", "true accuracy, greedy (held out)"),
              ("rl_gold_greedy", "true accuracy, greedy (problems trained on)"),
              ("scores", "proxy reward model's score (held out)")]
    if all(r["rl_gold_greedy"] is None for r in records):  # no run evaluated on the problems it trained on
        panels.pop(2)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(arith_groups(records))}
    for ax, (key, title) in zip(axes, panels):
        have = [r for r in records if r[key] is not None]  # a panel shows the runs that have its number
        for name, settings in arith_groups(have).items():
            xs, ys = [mean(rs, "kl") for _, rs in settings], [mean(rs, key) for _, rs in settings]
            ax.plot(xs, ys, marker="o", color=colors[name], label=ALGORITHMS[name].label)
            for (value, _), x, y in zip(settings, xs, ys):
                ax.annotate(f"{value:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colors[name])
        sft = mean(have, f"sft_{key}")
        ax.scatter([0], [sft], marker="*", s=120, color="black", zorder=3, label="SFT policy")
        ax.axhline(sft, color="black", linewidth=0.6, linestyle="--")
        seeds = sorted({r["seed"] for r in have})
        ax.set_title(title + ("" if len(seeds) == len(set(args.seeds)) else f" (seeds {', '.join(map(str, seeds))})"),
                     fontsize=10)
        ax.set_xlabel("KL to the SFT policy (nats per response)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    trained = "the exact answer" if args.true_reward else "a proxy reward model"
    fig.suptitle(f"arithmetic, trained against {trained}; labels: the KL-strength setting; mean over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-."]
    for name, settings in arith_groups(records).items():
        for k, (value, rs) in enumerate(settings):
            for r in rs:
                label = f"{r['label']} {r['strength'].split('.')[-1]} {value:g}" if r is rs[0] else None
                for ax, key in zip(axes, ("scores", "gold")):
                    ax.plot([c["episode"] for c in r["curve"]], [c[key] for c in r["curve"]], styles[k % 4],
                            marker="o", markersize=2.5, color=colors[name], label=label)
    for ax, title in zip(axes, ("proxy reward model's score (held out)", "true accuracy, sampled (held out)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episodes (responses sampled and scored)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)


def write_report(args, costs):
    out = os.path.join(args.output_dir, "report" + ("-true" if args.true_reward else ""))
    os.makedirs(out, exist_ok=True)
    records = (arith_collect if args.task == "arith" else collect)(args, costs)
    if not records:
        print("[compare] no finished run to report")
        return []
    (arith_plots if args.task == "arith" else plots)(records, out, args)
    lines = (arith_table if args.task == "arith" else table)(records, args)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    judge = {"judge": {"kind": "llm", "model": args.judge_model, "template": args.judge_template}} \
        if args.judge == "llm" else {}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"task": args.task, "episodes": args.episodes, "seeds": list(args.seeds), "eval_size": args.eval_size,
                   **judge, **({"true_reward": args.true_reward, "flip_rate": args.flip_rate} if args.task == "arith"
                               else {}), "runs": records}, f, indent=1)
    print("\n".join(lines))
    print(f"\n[compare] wrote {out}/frontier.png, curves.png, table.md and results.json")
    return records


def read_costs(path):
    """{stage folder: {wall_s, peak_mib}} from the costs log (its newest line for each folder)."""
    costs = {}
    if os.path.exists(path):
        for line in report.read_jsonl(path):
            costs[os.path.abspath(line.pop("folder"))] = line  # as written: relative to the working folder
    return costs


def main(args: Args):
    for name in missing(args):
        print(f"[compare] {name}: {ALGORITHMS[name].script} is not in this repository yet, skipped")
    plan = stages(args)
    costs_path = os.path.join(args.output_dir, "stage_costs.jsonl")
    folders = list(dict.fromkeys(s.folder for s in plan))
    if args.dry_run:
        for folder in folders:
            stage = next(s for s in plan if s.folder == folder)
            print(f"{folder}: {stage.script} {' '.join(stage.args)}")
        print(f"[compare] {len(folders)} stages, {len(runs(args))} runs of {args.episodes:,} episodes")
        return plan
    if args.overwrite and os.path.exists(costs_path):
        os.remove(costs_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start, done, failed = time.time(), set(), {}
    for stage in plan:
        if stage.folder in done or args.report_only or stage.run in failed:
            continue
        done.add(stage.folder)
        if finished(stage) and not args.overwrite:
            print(f"[compare] {stage.folder}: already finished, skipped (--overwrite redoes it)")
            continue
        try:
            measured = run_stage(stage, args.overwrite, env)
            total = len({s.folder for s in plan})
            print(f"[compare] {len(done)} of {total} stages, {time.time() - start:.0f} s so far", flush=True)
        except subprocess.CalledProcessError as e:
            if stage.run is None:  # the SFT policy or the reward model: nothing can run without them
                raise
            failed.update({s.run: stage.folder for s in plan if s.folder == stage.folder})  # every run sharing it
            print(f"[compare] {stage.folder}: failed ({e}); the runs that need it are left out", flush=True)
            continue
        os.makedirs(args.output_dir, exist_ok=True)
        with open(costs_path, "a") as f:  # one line per stage: two compare.py processes may share the log
            f.write(json.dumps({"folder": os.path.abspath(stage.folder), **measured}) + "\n")
    costs = read_costs(costs_path)
    for stage in plan:  # the runs each measured stage belongs to (a shared data stage: several; a judge stage: none)
        if os.path.abspath(stage.folder) in costs and stage.run is not None and stage.script != JUDGE:
            costs[os.path.abspath(stage.folder)].setdefault("runs", []).append(list(stage.run))
    write_report(args, costs)
    for (name, value, seed), folder in failed.items():
        print(f"[compare] {name} {value:g} seed {seed}: failed at {folder} (its log above says why)")
    print(f"[compare] finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
