"""dpo.py: the losses (sigmoid, label smoothing, IPO) and their gradients against a slow per-pair reference, an
end-to-end run on filter.py's layout (implicit rewards exactly 0 before the first update, the training loss falling,
a loadable save), the preference format through the chat template, 2 ranks == 1 rank (DDP, and FSDP2 with gradient
checkpointing), exact resume, and bad preference data refused before any model loads. The trimmed, chunked logprobs
and the reference cache are rebel.py's, tested in test_rebel.py."""

import json
import math
import random

import datasets
import pytest
import torch
from conftest import (
    TINY_LLAMA,
    assert_weights_equal,
    chat_prompt,
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

import dpo


def slow_dpo_loss(logprobs, ref, lengths, beta, loss_type, label_smoothing):
    """One pair, written from the papers' formulas with scalar operations."""
    (won, lost), (ref_won, ref_lost), (n_won, n_lost) = logprobs, ref, lengths
    if loss_type == "ipo":  # IPO on average per-token logprobs, as TRL does
        won, lost, ref_won, ref_lost = won / n_won, lost / n_lost, ref_won / n_won, ref_lost / n_lost
    h = (won - ref_won) - (lost - ref_lost)
    if loss_type == "sigmoid":
        p = 1 / (1 + torch.exp(-beta * h))  # the Bradley-Terry probability that y_w is preferred
        return -(1 - label_smoothing) * torch.log(p) - label_smoothing * torch.log(1 - p)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                            ("ipo", 0.1, 0.0)])
def test_dpo_loss_and_gradients_match_a_slow_reference(loss_type, beta, label_smoothing):
    g = torch.Generator().manual_seed(0)
    logprobs = (-30 * torch.rand(6, 2, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -30 * torch.rand(6, 2, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 20, (6, 2), generator=g).double()
    losses, rewards = dpo.dpo_losses(logprobs, ref, lengths, beta, loss_type, label_smoothing)
    (fast_grad,) = torch.autograd.grad(losses.sum(), logprobs)
    expected = torch.stack([slow_dpo_loss(logprobs[i], ref[i], lengths[i], beta, loss_type, label_smoothing)
                            for i in range(6)])
    (slow_grad,) = torch.autograd.grad(expected.sum(), logprobs)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    per_token = lengths if loss_type == "ipo" else 1
    torch.testing.assert_close(rewards, beta * (logprobs - ref) / per_token)
    zero = torch.zeros(1, 2, dtype=torch.float64)  # the policy equal to the reference
    start = dpo.dpo_losses(zero, zero, torch.ones(1, 2), beta, loss_type, label_smoothing)[0].item()
    assert start == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1 / (2 * beta) ** 2, rel=1e-12)


def random_lengths(n, seed, maxlen_prompt=7, maxlen=6):
    r = random.Random(seed)
    return [(r.randint(1, maxlen_prompt), r.randint(1, maxlen), r.randint(1, maxlen)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_policy(session_dir):
    """A random tiny Llama-3-style policy with the chat tokenizer (DPO needs no trained model to be tested)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return save_tiny(session_dir / "dpo_policy", AutoConfig.from_pretrained(TINY_LLAMA), AutoModelForCausalLM)


@pytest.fixture(scope="module")
def tiny_pairs(session_dir):
    """8 train and 8 test pairs in filter.py's layout (random ids, rewards ignored by DPO)."""
    path = session_dir / "dpo_pairs"
    datasets.DatasetDict({"train": pair_rows(lengths=random_lengths(8, 2), seed=2),
                          "test": pair_rows(lengths=random_lengths(8, 3), seed=3)}).save_to_disk(str(path))
    return path


def short_dpo(policy, pairs):
    """3 epochs of 8 pairs, 4 per update: 6 updates, each pair seen three times."""
    return ["--model_name_or_path", policy, "--task.dataset", pairs, "--task.maxlen_prompt", "7", "--task.maxlen", "6",
            "--dpo.beta", "0.1", "--lr", "2e-3", "--batch_size", "4", "--local_micro_batch_size", "1",
            "--num_train_epochs", "3", "--eval_freq", "3", "--save_freq", "3"]


@pytest.fixture(scope="module")
def dpo_1p(session_dir, tiny_policy, tiny_pairs):
    return run_into("dpo.py", short_dpo(tiny_policy, tiny_pairs), session_dir / "dpo_1p")


def test_end_to_end_on_filter_pairs(dpo_1p):
    rows = metrics(dpo_1p)
    assert [m["update"] for m in rows] == list(range(7))
    assert rows[0]["val/loss"] == pytest.approx(math.log(2), rel=1e-12)  # every implicit reward is exactly 0
    assert rows[0]["val/rewards_margins"] == 0.0 and rows[0]["val/rewards_accuracies"] == 0.0  # ties count as wrong
    first = rows[1]  # computed in the forward pass before the first optimizer step
    assert first["objective/rewards_chosen"] == 0.0 and first["objective/rewards_rejected"] == 0.0
    assert first["objective/kl"] == 0.0 and first["loss/policy_avg"] == pytest.approx(math.log(2), rel=1e-12)
    for name in ("objective/rewards_accuracies", "objective/rewards_margins", "objective/logps_chosen",
                 "objective/logps_rejected", "loss/grad_norm", "loss/skipped_updates", "lr", "episode", "eps"):
        assert name in first, name
    assert rows[-1]["loss/policy_avg"] < 0.6 and rows[-1]["objective/rewards_margins"] > 0  # pairs seen 3 times
    assert rows[-1]["objective/rewards_accuracies"] == 1.0
    assert rows[-1]["episode"] == 24 and "val/rewards_accuracies" in rows[-1]
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(dpo_1p)
    assert policy.config.vocab_size == 1024 and (dpo_1p / "tokenizer.json").exists()
    assert len(list((dpo_1p / "ref_logprobs").glob("*.pt"))) == 1


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_ddp_and_with_fsdp2_and_gradient_checkpointing(session_dir, dpo_1p, tiny_policy,
                                                                                       tiny_pairs):
    ddp, fsdp = session_dir / "dpo_2p", session_dir / "dpo_2p_fsdp"
    run("dpo.py", *short_dpo(tiny_policy, tiny_pairs), "--output_dir", ddp, nproc=2)
    run("dpo.py", *short_dpo(tiny_policy, tiny_pairs), "--fsdp", "--gradient_checkpointing", "--output_dir", fsdp,
        nproc=2)
    for out in (ddp, fsdp):
        assert_weights_equal(dpo_1p, out, exact=False)
        one, two = metrics(dpo_1p), metrics(out)
        for name in ("loss/policy_avg", "objective/rewards_margins"):
            assert [m[name] for m in one[1:]] == pytest.approx([m[name] for m in two[1:]], rel=1e-4, abs=1e-6)
        assert [m.get("val/rewards_accuracies") for m in one] == [m.get("val/rewards_accuracies") for m in two]


def test_resume_from_a_checkpoint_is_exact(dpo_1p, tiny_policy, tiny_pairs, tmp_path):
    check_resume_from_checkpoint(dpo, short_dpo(tiny_policy, tiny_pairs), dpo_1p, tmp_path / "resumed", update=3)


def test_nonfinite_updates_are_skipped_then_stop_the_run(dpo_1p, tiny_policy, tiny_pairs, tmp_path, capsys):
    check_nonfinite_guard(dpo, [*short_dpo(tiny_policy, tiny_pairs), "--save_freq", "1"], dpo_1p, tmp_path, good=3,
                          capsys=capsys)


@pytest.mark.slow
def test_preempted_run_resumes_exactly(dpo_1p, tiny_policy, tiny_pairs, tmp_path):
    """SIGTERM mid-run: the checkpoint it writes resumes to the uninterrupted run's weights and metrics, bitwise."""
    check_preempt_and_resume("dpo.py", short_dpo(tiny_policy, tiny_pairs), dpo_1p, tmp_path / "preempted", nproc=1)


def test_resume_with_other_settings_is_refused(dpo_1p, tiny_policy, tiny_pairs, tmp_path, no_model_loading):
    check_resume_refuses_other_settings(dpo, short_dpo(tiny_policy, tiny_pairs), dpo_1p, tmp_path,
                                        [("--dpo.beta", "0.1", "0.2"), ("--dpo.loss_type", "sigmoid", "ipo")])


def conversation(i, answer):
    return [{"role": "user", "content": chat_prompt(i)}, {"role": "assistant", "content": answer}]


def write_preferences(folder, rows_per_split=(("train", 9), ("test", 4))):
    """An ultrafeedback_binarized-shaped chat preference set: prompt text, chosen and rejected as the whole
    conversation. Train row 4's rejected answer is too long for --task.maxlen 24."""
    folder.mkdir()
    for split, n in rows_per_split:
        rows = [{"prompt": chat_prompt(i), "chosen": conversation(i, f"a witty , moving film , number {i} ."),
                 "rejected": conversation(i, "a dull mess ." * (12 if (split, i) == ("train", 4) else 1))}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_preference_format_through_the_chat_template(tiny_policy, tmp_path, capsys):
    from transformers import AutoTokenizer

    data = write_preferences(tmp_path / "prefs")
    args = ["--model_name_or_path", tiny_policy, "--task.dataset", data, "--task.dataset_format", "preference",
            "--task.maxlen_prompt", "32", "--task.maxlen", "24", "--dpo.loss_type", "ipo", "--lr", "1e-3",
            "--batch_size", "4", "--local_micro_batch_size", "2", "--eval_freq", "10"]
    run_in_process(dpo, args, tmp_path / "out")
    assert "split train: kept 8 of 9 rows; dropped 0 with a prompt over --task.maxlen_prompt 32 tokens, 1 with a " \
           "response over --task.maxlen 24" in capsys.readouterr().out
    rows = metrics(tmp_path / "out")
    assert [m["update"] for m in rows] == [0, 1, 2] and rows[0]["val/loss"] == pytest.approx(25.0)  # (1/(2 beta))^2
    assert (tmp_path / "out" / "model.safetensors").exists()

    # the layout: the prompt is the templated prompt with the generation prompt, tokenized alone as generate.py
    # tokenizes it (so "\n\n" before the answer is one token here, not two as inside the whole conversation), and
    # prompt + response is the templated conversation; prompts left-padded, responses right-padded, each ending with
    # <|eot_id|>; responses given as text give the same rows
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    parsed = dpo.Args(model_name_or_path=tiny_policy)
    parsed.task.maxlen_prompt, parsed.task.maxlen = 32, 24
    source = datasets.load_dataset("json", data_files=str(data / "test.jsonl"), split="train")
    laid_out = dpo.preference_layout(source, tokenizer, parsed, 1024, "test")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for i, row in enumerate(laid_out):
        mask = row["prompt_attention_mask"]
        assert mask == sorted(mask) and len(mask) == 32  # left padding
        prompt = [t for t, m in zip(row["prompt_input_ids"], mask) if m]
        for name, column in (("chosen", "chosen"), ("reject", "rejected")):
            mask = row[f"{name}_attention_mask"]
            assert mask == sorted(mask, reverse=True) and len(mask) == 24  # right padding
            response = [t for t, m in zip(row[f"{name}_input_ids"], mask) if m]
            assert response[-1] == eot
            assert tokenizer.decode(prompt + response) == tokenizer.apply_chat_template(source[i][column],
                                                                                       tokenize=False)
            assert prompt == tokenizer(tokenizer.apply_chat_template(source[i][column][:1], tokenize=False,
                                                                     add_generation_prompt=True),
                                       add_special_tokens=False).input_ids
    as_text = source.map(lambda r: {"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"],
                                    "rejected": r["rejected"][-1]["content"]})
    assert dpo.preference_layout(as_text, tokenizer, parsed, 1024, "test").to_list() == laid_out.to_list()


def test_bad_preference_data_is_refused_before_any_model_loads(tiny_policy, tmp_path, no_model_loading):
    def refused(rows, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(ValueError) as error:
            run_in_process(dpo, ["--model_name_or_path", tiny_policy, "--task.dataset", path, "--task.dataset_format",
                                 "preference", "--task.eval_split", "None", "--batch_size", "1"], tmp_path / name)
        assert not (tmp_path / name).exists()
        return str(error.value)

    message = refused([{"prompt": "hi", "chosen": "yes"}], "missing")
    assert "missing column(s) ['rejected']" in message and "expects columns prompt" in message
    message = refused([{"prompt": "hi", "chosen": 1, "rejected": 2}], "numbers")
    assert "column chosen holds Value('int64')" in message
    message = refused([{"prompt": "hi", "chosen": conversation(0, "yes")[:1], "rejected": "no"}], "no_answer")
    assert "row 0, column chosen: expected text or chat messages ending with an assistant turn" in message
