"""Evaluate saved policies exactly as ppo.py evaluates during training, for algorithms that train offline (REBEL).

Held-out prompts are answered with ppo.py's sampler (the same per-prompt sampling noise, so the policies of different
algorithms answer with common random numbers), scored by the reward model and by the VADER judge, and the KL to the
reference policy is estimated from the samples. The reference itself is evaluated first, as episode 0. Writes
`metrics.jsonl` (eval/* rows keyed by episode) and `eval_samples.jsonl`, which tools/report.py plots beside PPO.

    python tools/eval_policy.py --policies runs/rebel_iter0 runs/rebel_iter1 --episodes 3200 6400 \\
        --reference runs/sft_sst2 --reward_model runs/reward_sst2 --output_dir runs/rebel_eval

Documentation: docs/comparison.md
"""

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402  (the evaluation is ppo.py's, reused rather than rewritten)


@dataclass
class Args:
    policies: tuple[str, ...]
    """policy folders to evaluate, in training order (e.g. one per REBEL iteration)"""
    episodes: tuple[int, ...]
    """episodes (responses sampled and scored) spent to reach each policy, for the x axis"""
    reference: str
    """the reference policy of the KL (the SFT policy); evaluated too, as episode 0"""
    reward_model: str
    """the reward model that scores the answers"""
    output_dir: str
    """where metrics.jsonl and eval_samples.jsonl go"""
    dataset: str = "stanfordnlp/sst2"
    """prompt dataset (as ppo.py's --task.dataset)"""
    eval_split: str = "validation"
    """split of the held-out prompts"""
    prompt_column: str = "sentence"
    """column holding the prompts"""
    prompt_words: int = 4
    """first words of each prompt kept (as ppo.py's --task.prompt_words)"""
    maxlen_prompt: int = 32
    """prompts longer than this many tokens are dropped (as ppo.py's --task.maxlen_prompt)"""
    eval_size: int = 128
    """held-out prompts"""
    response_length: int = 24
    """tokens sampled per answer"""
    temperature: float = 0.7
    """sampling temperature (ppo.py's default)"""
    seed: int = 1
    """seed of the sampling noise (use the PPO run's to share its noise)"""
    gold_reward_fn: str | None = None
    """a true reward, path/to/file.py:function (as ppo.py's --reward_fn): each sampled answer is scored by it too
    (eval/gold), beside the reward model (e.g. data/arith/reward.py:exact_answer: the share of right answers)"""
    greedy: bool = False
    """also answer the held-out prompts greedily: eval/scores_greedy (reward model) and, with --gold_reward_fn,
    eval/gold_greedy"""
    reward_with_eos: bool = False
    """the reward model reads each answer that ended with its tokenizer's EOS appended (as ppo.py's
    --task.reward_with_eos: for reward models trained to read the reward at the EOS, e.g. the REBEL paper's TL;DR
    ones)"""


def main(args: Args):
    if len(args.policies) != len(args.episodes):
        raise ValueError(f"--policies has {len(args.policies)} entries but --episodes has {len(args.episodes)}")
    task = ppo.TaskArgs(dataset=args.dataset, eval_split=args.eval_split, prompt_column=args.prompt_column,
                        prompt_words=args.prompt_words, maxlen_prompt=args.maxlen_prompt,
                        response_length=args.response_length,
                        temperature=args.temperature, reward_with_eos=args.reward_with_eos)
    config = ppo.Args(model_name_or_path=args.reference, reward_model_name_or_path=args.reward_model,
                      eval_size=args.eval_size, seed=args.seed, task=task)
    gold = ppo.load_reward_fn(args.gold_reward_fn, "--gold_reward_fn") if args.gold_reward_fn else None  # early
    _, _, device = ppo.init_distributed()  # as in training: a GPU that torch cannot use stops here, no CPU fallback
    tokenizer = ppo.load_tokenizer(args.reference, "--reference")
    rm_tokenizer = ppo.load_tokenizer(args.reward_model, "--reward_model", needs_eos=False)
    for tok in (tokenizer, rm_tokenizer):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    ppo.check_reward_with_eos(config, None, rm_tokenizer, "--reward_with_eos", "--reward_model")
    columns = {}
    prompts, prompt_ids, _ = ppo.load_prompts(tokenizer, args.eval_split, config, columns)
    prompts, prompt_ids = prompts[:args.eval_size], prompt_ids[:args.eval_size]
    columns = {c: v[:args.eval_size] for c, v in columns.items()}
    load = lambda cls, path, arg: ppo.freeze(ppo.load_pretrained(cls, path, arg, config)).to(device)  # noqa: E731
    as_policy = lambda path, arg: ppo.CausalLogprobs(load(ppo.AutoModelForCausalLM, path, arg),  # noqa: E731
                                                     args.temperature, config.logprob_chunk_size)
    reference = as_policy(args.reference, "--reference")
    reward_model = load(ppo.AutoModelForSequenceClassification, args.reward_model, "--reward_model")
    reward_model.config.pad_token_id = rm_tokenizer.pad_token_id
    rewards = ppo.Rewards(config, reward_model, None, tokenizer, rm_tokenizer, device)
    judge = ppo.SentimentIntensityAnalyzer()
    os.makedirs(args.output_dir, exist_ok=True)
    rows, samples = [], []
    for step, (path, episode) in enumerate([(args.reference, 0), *zip(args.policies, args.episodes)]):
        policy = reference if step == 0 else as_policy(path, "--policies")
        sampler = ppo.Sampler(config, policy, tokenizer, 1, device)
        evaluate = lambda settings, sampler=sampler, policy=policy, step=step: ppo.evaluate_policy(  # noqa: E731
            sampler, policy, reference, rewards, prompts, prompt_ids, columns, judge, step, settings, 0, 1, device,
            contextlib.nullcontext())
        metrics, answers = evaluate(config)
        if gold:
            metrics["eval/gold"] = gold_scores(gold, answers, prompts, columns, args)
        if args.greedy:
            greedy_metrics, greedy_answers = evaluate(dataclasses.replace(config, eval_greedy=True))
            metrics["eval/scores_greedy"] = greedy_metrics["eval/scores"]
            if gold:
                metrics["eval/gold_greedy"] = gold_scores(gold, greedy_answers, prompts, columns, args)
            answers += [{**a, "greedy": True} for a in greedy_answers]
        rows.append({"update": step, "episode": episode, "policy": path, **metrics})
        samples += [{"update": step, "episode": episode, **answer} for answer in answers]
        print(f"{path}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    for name, lines in (("metrics.jsonl", rows), ("eval_samples.jsonl", samples)):
        with open(os.path.join(args.output_dir, name), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"wrote {args.output_dir}/metrics.jsonl and eval_samples.jsonl")


def gold_scores(gold, answers, prompts, columns, args):
    """Scores each answer by the true reward (in place: its "gold" key) and returns their mean."""
    values = ppo.call_reward_fn(gold, [ppo.prompt_text(prompts[a["index"]]) for a in answers],
                                [a["response"] for a in answers],
                                {c: [v[a["index"]] for a in answers] for c, v in columns.items()},
                                f"--gold_reward_fn {args.gold_reward_fn}")
    for answer, value in zip(answers, values):
        answer["gold"] = value
    return sum(values) / len(values)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
