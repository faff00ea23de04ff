"""The vLLM backend of generate.py, for real: on CPU through the `vllm-cpu` package (CI's vLLM stage, in its own
virtual environment), on GPU through `vllm`. Skipped where vLLM is not installed."""

import datasets
import pytest
from conftest import run

pytest.importorskip("vllm")

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def generate(policy, prompts, out, *extra):
    run("generate.py", "--model_name_or_path", policy, "--dataset", prompts, "--split", "train", "--maxlen", "24",
        "--output_dir", out, *extra, env=VLLM_ENV)
    return datasets.load_from_disk(str(out)).to_list()


def test_greedy_vllm_equals_transformers(tmp_path, chat_policy, chat_prompts):
    greedy = ["--temperature", "0", "--num_responses", "1", "--dtype", "float32"]  # vLLM on CPU would pick bf16
    hf = generate(chat_policy, chat_prompts, tmp_path / "hf", *greedy, "--backend", "hf")
    vllm = generate(chat_policy, chat_prompts, tmp_path / "vllm", *greedy, "--backend", "vllm")
    assert [r["prompt_token_ids"] for r in vllm] == [r["prompt_token_ids"] for r in hf]
    assert [r["response_0_token_ids"] for r in vllm] == [r["response_0_token_ids"] for r in hf]
    assert [r["response_0"] for r in vllm] == [r["response_0"] for r in hf]


def test_sampled_responses_come_back_in_prompt_order(tmp_path, chat_policy, chat_prompts):
    sampled = ["--backend", "vllm", "--num_responses", "3", "--temperature", "0.8", "--dtype", "float32"]
    whole = generate(chat_policy, chat_prompts, tmp_path / "whole", *sampled)
    assert [r["prompt_id"] for r in whole] == [f"id{i:03d}" for i in range(24)]
    assert all(len({r[f"response_{i}"] for i in range(3)}) > 1 for r in whole[:8])  # n distinct samples per prompt
    # a seed per prompt (keyed by its index): slices, generated separately and in other batches, give the same rows
    head = generate(chat_policy, chat_prompts, tmp_path / "head", *sampled, "--end_idx", "10")
    tail = generate(chat_policy, chat_prompts, tmp_path / "tail", *sampled, "--start_idx", "10", "--shard_size", "5")
    assert head + tail == whole


def test_vllm_loads_the_policy_rebel_saved(tmp_path, chat_policy, chat_prompts, chat_reward_model):
    from conftest import run_in_process

    import filter as filter_stage
    import generate as generate_stage
    import rebel
    import score

    run_in_process(generate_stage, ["--model_name_or_path", chat_policy, "--dataset", chat_prompts, "--split",
                                    "train", "--num_responses", "4", "--maxlen", "32", "--backend", "hf"],
                   tmp_path / "gen")
    run_in_process(score, ["--reward_model", chat_reward_model, "--dataset", tmp_path / "gen"], tmp_path / "score")
    run_in_process(filter_stage, ["--dataset", tmp_path / "score", "--model_name_or_path", chat_policy,
                                  "--maxlen_prompt", "32", "--maxlen", "40", "--test_size", "4"], tmp_path / "pairs")
    run_in_process(rebel, ["--model_name_or_path", chat_policy, "--task.dataset", tmp_path / "pairs",
                           "--task.maxlen_prompt", "32", "--task.maxlen", "40", "--rebel.eta", "1", "--lr", "1e-3",
                           "--batch_size", "4", "--local_micro_batch_size", "2", "--total_episodes", "8"],
                   tmp_path / "policy")
    greedy = ["--temperature", "0", "--num_responses", "1", "--dtype", "float32", "--end_idx", "8"]
    hf = generate(tmp_path / "policy", chat_prompts, tmp_path / "hf", *greedy, "--backend", "hf")
    vllm = generate(tmp_path / "policy", chat_prompts, tmp_path / "vllm", *greedy, "--backend", "vllm")
    assert [r["response_0_token_ids"] for r in vllm] == [r["response_0_token_ids"] for r in hf]
    before = generate(chat_policy, chat_prompts, tmp_path / "before", *greedy, "--backend", "hf")
    assert hf != before  # the trained policy is not the one it started from


def test_ppo_with_vllm_rollouts_pushes_the_trained_weights(tmp_path, chat_policy, chat_reward_model, chat_prompts):
    """2 updates of ppo.py --backend vllm in fp32 on the tiny chat model. After training, the engine's greedy held-out
    answers equal transformers' greedy answers from the saved policy (the weights were pushed into the engine) and
    differ from those before training; vLLM's logprobs of its own samples equal the trainer's."""
    out = tmp_path / "ppo"
    run("ppo.py", "--model_name_or_path", chat_policy, "--reward_model_name_or_path", chat_reward_model,
        "--task.dataset", chat_prompts, "--task.prompt_column", "prompt", "--task.prompt_format", "chat",
        "--task.prompt_words", "0", "--task.eval_split", "train", "--task.maxlen_prompt", "64",
        "--task.response_length", "24", "--backend", "vllm", "--eval_greedy", "--eval_freq", "1", "--eval_size", "8",
        "--lr", "3e-3", "--batch_size", "8", "--local_micro_batch_size", "4", "--total_episodes", "16",
        "--output_dir", out, env=VLLM_ENV)
    import json

    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    engine = {u: [s["response"] for s in samples if s["update"] == u] for u in (0, 1, 2)}
    greedy = ["--temperature", "0", "--num_responses", "1", "--dtype", "float32", "--end_idx", "8"]
    trainer = generate(out, chat_prompts, tmp_path / "hf", *greedy, "--backend", "hf")
    assert engine[2] == [r["response_0"] for r in trainer]
    assert engine[2] != engine[0]  # training changed the answers: the engine did not keep its initial weights
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout/vllm_logprob_gap"] for r in rows if "rollout/vllm_logprob_gap" in r]
    assert len(gaps) == 2 and max(gaps) < 1e-3, gaps
