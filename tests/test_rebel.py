"""rebel.py: the loss and the trimmed, chunked logprobs against slow references, a log-ratio of exactly 0 before the
first update, 2 ranks == 1 rank (DDP and FSDP2 on CPU), the reference cache, and the offline SST-2 chain
generate -> score -> filter -> rebel raising held-out sign agreement above its starting value."""

import datasets
import pytest
import torch
from conftest import (
    SST2,
    TINY_GPT2,
    TINY_LLAMA,
    assert_weights_equal,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_resume_refuses_other_settings,
    metrics,
    pair_rows,
    run,
    run_in_process,
    run_into,
    save_tiny,
)

import filter as filter_stage
import generate
import rebel
import score


def test_rebel_loss_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    logprobs, ref = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g,
                                                                                  dtype=torch.float64)
    rewards = torch.rand(6, 2, generator=g, dtype=torch.float64)
    losses, diff, target, _ = rebel.rebel_losses(logprobs, ref, rewards, eta=3.0)
    for i in range(6):
        expected_diff = (logprobs[i, 0] - ref[i, 0]) - (logprobs[i, 1] - ref[i, 1])
        expected = (expected_diff - 3.0 * (rewards[i, 0] - rewards[i, 1])) ** 2
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-12)
        assert diff[i].item() == pytest.approx(expected_diff.item(), rel=1e-12)
    assert rebel.sign_align(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 2.0, 2.0])).tolist() == [0.5, 1, 0]


def slow_logprobs(model, row, temperature):
    """Every sequence at full fixed width (maxlen_prompt + maxlen), full-vocabulary fp32 log-softmax, masked sum."""
    out = []
    for name in ("chosen", "reject"):
        ids = torch.cat([row["prompt_input_ids"], row[f"{name}_input_ids"]])[None]
        mask = torch.cat([row["prompt_attention_mask"], row[f"{name}_attention_mask"]])[None]
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.double() / temperature
        width = len(row["prompt_input_ids"])
        logprobs = logits[0, width - 1:-1].log_softmax(-1).gather(1, row[f"{name}_input_ids"][:, None]).squeeze(1)
        out.append((logprobs * row[f"{name}_attention_mask"]).sum())
    return torch.stack(out)


def test_trimmed_chunked_logprobs_and_gradients_equal_the_full_width_reference():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA), dtype=torch.float32)
    data, temperature = pair_rows(), 0.7
    fast = rebel.SequenceLogprobs(model, temperature, chunk_size=3)  # chunks smaller than one response
    batch = rebel.trimmed_batch(data, [0, 1, 2], "cpu")
    assert batch["input_ids"].shape == (6, 7 + 6) and batch["prompt_len"] == 7  # the widest real prompt and response
    assert rebel.trimmed_batch(data, [0, 2], "cpu")["input_ids"].shape == (4, 3 + 5)  # trimmed to this batch
    logprobs = fast(**batch).view(2, -1).T
    logprobs.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = torch.stack([slow_logprobs(model, data[i], temperature) for i in range(3)])
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-4, rtol=1e-5)
    expected.sum().backward()
    for fast_grad, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(fast_grad, p.grad, atol=1e-5, rtol=1e-4)


def test_dropout_read_from_the_config_is_off_too(tmp_path):
    """Llama reads `attention_dropout` from its config as a float (no nn.Dropout module): left at 0.5, the policy's
    logprobs in train mode would be random and the log-ratio would not start at 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = save_tiny(tmp_path / "llama", AutoConfig.from_pretrained(TINY_LLAMA, attention_dropout=0.5),
                     AutoModelForCausalLM)
    args = rebel.Args()
    batch = rebel.trimmed_batch(pair_rows(), [0, 1, 2], "cpu")
    model, _ = rebel.build_model(path, "--model_name_or_path", args, torch.device("cpu"), batch, trainable=False)
    model.train()
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
        assert torch.equal(first, second) and torch.equal(first, model.eval()(**batch))


def test_models_that_scale_logits_after_the_head_are_refused(tmp_path):
    """Granite divides its logits by `logits_scaling` after the output embedding, which rebel.py's fast path (base
    model, then the output embedding) skips: the check against the model's own forward refuses it by name, before
    any reference logprob is computed; models without such a step pass."""
    from transformers import AutoConfig, AutoModelForCausalLM, GraniteConfig

    def granite(scaling):
        config = GraniteConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, logits_scaling=scaling)
        return save_tiny(tmp_path / f"granite{scaling}", config, AutoModelForCausalLM)

    batch = rebel.trimmed_batch(pair_rows(), [0, 1, 2], "cpu")
    args = rebel.Args()
    for path in (save_tiny(tmp_path / "llama", AutoConfig.from_pretrained(TINY_LLAMA), AutoModelForCausalLM),
                 save_tiny(tmp_path / "gpt2", AutoConfig.from_pretrained(TINY_GPT2), AutoModelForCausalLM),
                 granite(1.0)):
        rebel.build_model(path, "--model_name_or_path", args, torch.device("cpu"), batch)  # passes the check
    scaled = granite(4.0)
    data = tmp_path / "pairs"
    datasets.DatasetDict({"train": pair_rows(), "test": pair_rows()}).save_to_disk(str(data))
    with pytest.raises(SystemExit, match=rf"--model_name_or_path {scaled}: the model's own forward gives other "
                                         r"logprobs .* up to \d.* nats per token.*'logits_scaling': 4.0"):
        run_in_process(rebel, ["--model_name_or_path", scaled, "--task.dataset", data, "--task.maxlen_prompt", "7",
                               "--task.maxlen", "6", "--batch_size", "2", "--local_micro_batch_size", "1"],
                       tmp_path / "out")
    assert not (tmp_path / "out" / "ref_logprobs").exists()


REBEL = ["--task.maxlen_prompt", "16", "--task.maxlen", "24", "--task.temperature", "0.7", "--rebel.eta", "1",
         "--lr", "3e-4", "--batch_size", "8", "--local_micro_batch_size", "1", "--logprob_chunk_size", "16"]


@pytest.fixture(scope="session")
def sst2_pairs(session_dir, sft_policy, reward_model):
    """The offline SST-2 chain's data: generate.py -> score.py -> filter.py on the tiny GPT-2 models (in-process:
    test_pipeline.py runs them as subprocesses)."""
    gen, scored, pairs = (session_dir / name for name in ("sst2_gen", "sst2_score", "sst2_pairs"))
    run_in_process(generate, ["--model_name_or_path", sft_policy, "--dataset", SST2, "--split", "train",
                              "--prompt_column", "sentence", "--prompt_format", "text", "--prompt_words", "4",
                              "--maxlen", "24", "--num_responses", "4", "--temperature", "0.7", "--top_p", "1.0",
                              "--end_idx", "640", "--backend", "hf", "--local_micro_batch_size", "64"], gen)
    run_in_process(score, ["--reward_model", reward_model, "--dataset", gen, "--prompt_format", "text",
                           "--local_micro_batch_size", "64"], scored)
    run_in_process(filter_stage, ["--dataset", scored, "--model_name_or_path", sft_policy, "--prompt_format", "text",
                                  "--maxlen_prompt", "16", "--maxlen", "24", "--test_size", "128"], pairs)
    return pairs


def short_rebel(sft_policy, sst2_pairs):
    return ["--model_name_or_path", sft_policy, "--task.dataset", sst2_pairs, *REBEL, "--total_episodes", "32",
            "--eval_freq", "2", "--save_freq", "1", "--keep_checkpoints", "100"]


@pytest.fixture(scope="session")
def rebel_1p(session_dir, sft_policy, sst2_pairs):
    return run_into("rebel.py", short_rebel(sft_policy, sst2_pairs), session_dir / "rebel_1p")


@pytest.fixture(scope="session")
def rebel_2p(session_dir, sft_policy, sst2_pairs):
    return run_into("rebel.py", short_rebel(sft_policy, sst2_pairs), session_dir / "rebel_2p", nproc=2)


def test_log_ratio_is_exactly_zero_before_the_first_update(rebel_1p):
    rows = metrics(rebel_1p)
    assert rows[0]["update"] == 0 and rows[0]["val/sign_align"] == 0.5  # every difference is exactly 0: chance
    first = rows[1]  # computed in the forward pass before the first optimizer step
    assert first["objective/kl"] == 0.0 and first["objective/chosen_kl"] == 0.0
    assert first["objective/abs_logratio_diff"] == 0.0 and first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0
    assert first["objective/abs_eta_reward_diff"] > 0
    assert rows[-1]["objective/abs_logratio_diff"] > 0


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_ddp_and_with_fsdp2_and_gradient_checkpointing(session_dir, rebel_1p, rebel_2p,
                                                                                       sft_policy, sst2_pairs):
    fsdp = session_dir / "rebel_2p_fsdp"
    run("rebel.py", *short_rebel(sft_policy, sst2_pairs), "--fsdp", "--gradient_checkpointing", "--output_dir", fsdp,
        nproc=2)
    for out in (rebel_2p, fsdp):
        assert_weights_equal(rebel_1p, out, exact=False)
        one, two = metrics(rebel_1p), metrics(out)
        assert [m["loss/policy_avg"] for m in one[1:]] == pytest.approx([m["loss/policy_avg"] for m in two[1:]],
                                                                        rel=1e-4)
        assert [m["val/sign_align"] for m in one if "val/sign_align" in m] == [
            m["val/sign_align"] for m in two if "val/sign_align" in m]


def test_resume_from_a_checkpoint_is_exact(rebel_1p, sft_policy, sst2_pairs, tmp_path):
    check_resume_from_checkpoint(rebel, short_rebel(sft_policy, sst2_pairs), rebel_1p, tmp_path / "resumed",
                                 update=2)


@pytest.mark.slow
def test_preempted_two_rank_run_resumes_exactly_from_the_cached_reference(rebel_2p, sft_policy, sst2_pairs,
                                                                           tmp_path):
    first, resumed = check_preempt_and_resume("rebel.py", short_rebel(sft_policy, sst2_pairs), rebel_2p,
                                              tmp_path / "preempted", nproc=2)
    assert "reference logprobs: computed" in first
    assert "reference logprobs: cached" in resumed  # a restart does not recompute them


def test_nonfinite_updates_are_skipped_then_stop_the_run(rebel_1p, sft_policy, sst2_pairs, tmp_path, capsys):
    check_nonfinite_guard(rebel, short_rebel(sft_policy, sst2_pairs), rebel_1p, tmp_path, good=1, capsys=capsys)


def test_reference_logprobs_are_cached_beside_the_run(rebel_1p):
    cache = list((rebel_1p / "ref_logprobs").glob("*.pt"))
    assert len(cache) == 1
    ref = torch.load(cache[0])
    assert set(ref) == {"train", "eval"} and ref["train"].shape[1] == 2 and ref["train"].dtype == torch.float64


@pytest.mark.slow
def test_sst2_chain_raises_held_out_sign_agreement(session_dir, sft_policy, sst2_pairs):
    out = session_dir / "rebel_learns"
    run("rebel.py", "--model_name_or_path", sft_policy, "--task.dataset", sst2_pairs, *REBEL, "--batch_size", "32",
        "--local_micro_batch_size", "16", "--eval_freq", "100", "--output_dir", out)
    evals = [m for m in metrics(out) if "val/sign_align" in m]
    assert len(datasets.load_from_disk(str(sst2_pairs))["test"]) == 128
    assert evals[0]["val/sign_align"] == 0.5  # chance: before training every log-ratio difference is exactly 0
    # about 0.63 after one epoch; chance would stay within 0.5 +- 0.044 (one standard deviation over 128 pairs). The
    # held-out loss is not checked: with eta 1 its targets (eta * reward gap, about 4 nats) dwarf what one epoch
    # reaches, so it moves by less than the spread between CPUs (19.160 -> 19.165 on one machine, down on another)
    assert evals[-1]["val/sign_align"] > 0.58, evals
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(out)  # a full save_pretrained folder, tokenizer and args.json too
    assert (out / "tokenizer.json").exists() and (out / "args.json").exists() and policy.config.vocab_size == 1024


def test_resume_with_other_settings_is_refused(rebel_1p, sft_policy, sst2_pairs, tmp_path, no_model_loading):
    check_resume_refuses_other_settings(rebel, short_rebel(sft_policy, sst2_pairs), rebel_1p, tmp_path,
                                        [("--rebel.eta", "1.0", "2.0"), ("--task.temperature", "0.7", "1.0")])
