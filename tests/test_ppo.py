"""ppo.py: exact math against slow references, ratio 1 / KL 0 before the first step, 2 ranks == 1 rank, and a short
offline run that clearly raises the held-out reward-model score above the SFT policy's."""

import json
import math

import pytest
import torch
from conftest import (
    SST2,
    TINY_GPT2,
    TINY_LLAMA,
    assert_same_run,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_resume_refuses_other_settings,
    check_short_run_learns,
    learning_args,
    metrics,
    online_args,
    run,
    run_in_process,
    run_into,
)

import ppo


def random_masked(batch=5, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 6, 3][:batch])
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    return g, lengths, mask


def test_gae_matches_a_slow_reference():
    g, lengths, mask = random_masked()
    rewards = torch.randn(5, 7, generator=g, dtype=torch.float64) * mask
    values = torch.randn(5, 7, generator=g, dtype=torch.float64) * mask
    gamma, lam = 0.9, 0.8
    advantages = ppo.compute_gae(rewards, values, gamma, lam)
    for i, n in enumerate(lengths.tolist()):
        v = values[i, :n].tolist() + [0.0]  # the value after the last real token is 0: the episode ends there
        deltas = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        expected = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
        assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert advantages[i, n:].abs().sum() == 0


def test_ppo_losses_match_a_slow_reference():
    g, _, _ = random_masked()
    shape = (4, 6)
    new, old = torch.randn(shape, generator=g) * 0.3 - 2, torch.randn(shape, generator=g) * 0.3 - 2
    adv, vpred, values, returns = (torch.randn(shape, generator=g) for _ in range(4))
    args = ppo.Args()
    args.ppo.cliprange, args.ppo.cliprange_value = 0.2, 0.3
    pg, vf, ratio, pg_clipped, vf_clipped = ppo.ppo_losses(new, old, adv, vpred, values, returns, args)
    for i in range(shape[0]):
        for t in range(shape[1]):
            r = math.exp(new[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            unclipped, clipped = -a * r, -a * min(max(r, 0.8), 1.2)
            assert pg[i, t].item() == pytest.approx(max(unclipped, clipped), rel=1e-5, abs=1e-6)
            assert bool(pg_clipped[i, t]) == (clipped > unclipped)
            v_old, v_new, ret = values[i, t].item(), vpred[i, t].item(), returns[i, t].item()
            v_clip = v_old + min(max(v_new - v_old, -0.3), 0.3)
            assert vf[i, t].item() == pytest.approx(0.5 * max((v_new - ret) ** 2, (v_clip - ret) ** 2), rel=1e-5)
            assert ratio[i, t].item() == pytest.approx(r, rel=1e-5)


def test_masked_whiten_matches_a_slow_reference():
    g, _, mask = random_masked()
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 + 1
    real = [x[i, t].item() for i in range(5) for t in range(7) if mask[i, t]]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((v - mean) ** 2 for v in real) / (len(real) - 1))
    whitened = ppo.masked_whiten(x, mask)
    for i in range(5):
        for t in range(7):
            expected = (x[i, t].item() - mean) / std if mask[i, t] else 0.0
            assert whitened[i, t].item() == pytest.approx(expected, abs=1e-5)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(ppo.kl_per_token(logp, ref, "k1"), logp - ref)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(ppo.kl_per_token(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert (ppo.kl_per_token(logp, ref, "k3") >= 0).all()


def test_truncate_after_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, last, has_eos = ppo.truncate_after_eos(responses, [eos], pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert last.tolist() == [1, 3, 0] and has_eos.tolist() == [True, False, True]


def test_truncate_after_any_stop_token_with_pad_equal_to_eos():
    """Llama-3-style: stop tokens {1 <|end_of_text|>, 4 <|eot_id|>}, pad = tokenizer EOS = 4. A response that ended on
    1 and was padded with 4 ends at its 1 (one real token more would be a pad read as a sampled EOS)."""
    stop, pad = [1, 4], 4
    responses = torch.tensor([[7, 1, 4, 4], [7, 8, 4, 4], [7, 8, 9, 6], [1, 4, 4, 4]])
    out, mask, last, has_eos = ppo.truncate_after_eos(responses, stop, pad)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert last.tolist() == [1, 2, 3, 0] and has_eos.tolist() == [True, True, False, True]
    assert out.tolist() == [[7, 1, 4, 4], [7, 8, 4, 4], [7, 8, 9, 6], [1, 4, 4, 4]]
    _, old_mask, _, _ = ppo.truncate_after_eos(responses, [4], pad)  # the tokenizer's EOS alone: the bug of issue 20
    assert old_mask[0].int().tolist() == [1, 1, 1, 0]


def test_stop_tokens_are_eos_end_of_turn_and_generation_config_eos(tmp_path):
    """tiny-llama3-chat (and data/llama3-1b): tokenizer EOS 4 <|eot_id|>, generation_config.json eos [1, 4]. A
    tokenizer whose EOS is <|end_of_text|> still ends turns with <|eot_id|> (read from the chat template); a model
    without a generation config or chat template ends at the tokenizer's EOS alone."""
    from transformers import AutoTokenizer

    for path in (TINY_LLAMA, TINY_LLAMA.parent / "llama3-1b"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.eos_token_id == 4 and ppo.stop_token_ids(tokenizer, path) == [1, 4]
        assert ppo.describe_stop_ids(tokenizer, [1, 4]) == "1 '<|end_of_text|>', 4 '<|eot_id|>'"
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.eos_token = "<|end_of_text|>"
    tokenizer.save_pretrained(tmp_path)  # no generation_config.json there
    assert ppo.end_of_turn_id(tokenizer) == 4 and ppo.stop_token_ids(tokenizer, tmp_path) == [1, 4]
    gpt2 = AutoTokenizer.from_pretrained(TINY_GPT2)
    assert ppo.stop_token_ids(gpt2, TINY_GPT2) == [gpt2.eos_token_id]


def test_gumbel_max_samples_the_softmax():
    logits, temperature, draws = torch.tensor([1.0, 0.0, -1.0, 2.0]), 0.7, 40_000
    noise = torch.rand(draws, 4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ppo.gumbel_max(logits.expand(draws, 4), noise, temperature), minlength=4)
    torch.testing.assert_close(counts / draws, (logits / temperature).softmax(-1), atol=0.01, rtol=0)


def test_sampling_noise_does_not_depend_on_how_rows_are_split():
    full = ppo.sampling_noise(1, 3, 5, torch.arange(8), 11, "cpu")
    part = ppo.sampling_noise(1, 3, 5, torch.tensor([5, 2]), 11, "cpu")
    assert torch.equal(part, full[[5, 2]])
    assert not torch.equal(full, ppo.sampling_noise(1, 3, 6, torch.arange(8), 11, "cpu"))
    assert not torch.equal(full, ppo.sampling_noise(2, 3, 5, torch.arange(8), 11, "cpu"))


def test_sampling_noise_is_uniform_and_independent():
    """One generator per (seed, stream, step, row): uniform in (0, 1), uncorrelated between neighbouring tokens, rows
    and steps (the Gumbel-max test above checks that uniform noise samples the softmax)."""
    noise = ppo.sampling_noise(1, 0, 0, torch.arange(64), 4096, "cpu").double()
    assert 0 < noise.min() and noise.max() < 1
    counts = torch.histc(noise, bins=16, min=0, max=1)
    expected = noise.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 40  # chi-square, 15 degrees of freedom: p about 5e-4
    for a, b in ((noise[:, 1:], noise[:, :-1]), (noise[1:], noise[:-1]),
                 (noise, ppo.sampling_noise(1, 0, 1, torch.arange(64), 4096, "cpu").double())):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01


class ScriptedPolicy:
    """A stand-in for CausalLogprobs' sampling step: row i emits its stop token (stops[i], default EOS id 2) at step
    ends[i], token 5 otherwise."""

    def __init__(self, ends, vocab=8, stops=None):
        self.ends, self.vocab, self.calls, self.stops = ends, vocab, 0, stops or [2] * len(ends)

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None):
        from types import SimpleNamespace

        logits = torch.zeros(len(input_ids), 1, self.vocab)
        logits[:, :, 5] = 100.0
        for i, end in enumerate(self.ends):
            if end == self.calls:
                logits[i, :, self.stops[i]] = 1000.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_sampling_stops_once_every_row_has_ended():
    args = ppo.Args()
    args.task.response_length = 10
    queries, query_mask = ppo.left_pad([[7, 7], [7]], pad_id=0)
    policy = ScriptedPolicy(ends=[1, 3])
    responses = ppo.sample(policy, queries, query_mask, torch.arange(2), 0, [2], args)
    assert responses.tolist() == [[5, 2, 5, 5], [5, 5, 5, 2]] and policy.calls == 4  # 4 steps, not 10
    never = ppo.sample(ScriptedPolicy(ends=[1, 99]), queries, query_mask, torch.arange(2), 0, [2], args)
    assert never.shape == (2, 10)
    # any of the stop tokens ends a row: row 0 ends on 1, row 1 on 2
    both = ppo.sample(ScriptedPolicy(ends=[1, 2], stops=[1, 2]), queries, query_mask, torch.arange(2), 0, [1, 2], args)
    assert both.tolist() == [[5, 1, 5], [5, 5, 2]]
    only_eos = ppo.sample(ScriptedPolicy(ends=[1, 2], stops=[1, 2]), queries, query_mask, torch.arange(2), 0, [2], args)
    assert only_eos.shape == (2, 10)  # row 0's token 1 is not a stop token there: it runs to the full length


def tiny_policy_and_value(path=TINY_GPT2, chunk_size=5):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    value = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=1))
    return ppo.PolicyAndValue(ppo.CausalLogprobs(policy, 0.7, chunk_size), ppo.Values(value)).eval()


def test_logprobs_and_values_are_the_same_with_and_without_left_padding():
    model = tiny_policy_and_value()
    prompts, responses = [[11, 12, 13], [21]], torch.tensor([[31, 32, 33, 34], [41, 42, 43, 44]])
    queries, query_mask = ppo.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        logprobs, entropy, values = ppo.forward_response(model, queries, query_mask, responses)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt + responses[i].tolist()])
            logits = model.policy.model(ids).logits[0, len(prompt) - 1:-1].double() / 0.7
            expected = logits.log_softmax(-1).gather(1, responses[i][:, None]).squeeze(1)
            torch.testing.assert_close(logprobs[i].double(), expected, atol=1e-5, rtol=0)
            expected_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            torch.testing.assert_close(entropy[i].double(), expected_entropy, atol=1e-5, rtol=0)
            hidden = model.values.model.base_model(ids).last_hidden_state
            expected_values = model.values.model.score(hidden)[0, len(prompt) - 1:-1, 0]
            torch.testing.assert_close(values[i], expected_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [TINY_GPT2, TINY_LLAMA])
def test_chunked_logprobs_equal_full_logits_with_gradients(path):
    """Chunks of 5 positions over 2 x 7 response tokens (chunks cross rows) against one fp32 log-softmax over the
    full logits: the same logprobs and entropies, and the same gradients of a loss of both."""
    chunked = tiny_policy_and_value(path, chunk_size=5).policy
    full = tiny_policy_and_value(path, chunk_size=10**6).policy
    g = torch.Generator().manual_seed(1)
    queries, query_mask = ppo.left_pad([[11, 12, 13], [21]], pad_id=0)
    responses = torch.randint(100, 1000, (2, 7), generator=g)
    weights = torch.randn(2, 7, generator=g)
    results = []
    for model in (chunked, full):
        model.zero_grad()
        attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
        input_ids = torch.cat([queries, responses], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        if model is full:  # the reference: the model's own forward, full fp32 logits
            logits = model.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).logits[:, 2:-1].float() / 0.7
            logprobs = logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        else:
            logprobs, entropy = ppo.forward_response(model, queries, query_mask, responses)[:2]
        ((logprobs * weights).sum() + (entropy * weights).sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp, ent, grads), (lp_ref, ent_ref, grads_ref) = results
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


def test_reward_model_with_another_tokenizer_gets_retokenized_text():
    from transformers import AutoTokenizer

    policy_tok, rm_tok = AutoTokenizer.from_pretrained(TINY_GPT2), AutoTokenizer.from_pretrained(TINY_LLAMA)
    eos = policy_tok.eos_token_id
    prompt, response = policy_tok("the film is").input_ids, policy_tok(" a delight .").input_ids + [eos]
    responses = torch.tensor([response + [eos]])
    responses, mask, _, has_eos = ppo.truncate_after_eos(responses, [eos], eos)
    same = ppo.reward_inputs(["the film is"], [prompt], responses, mask, has_eos, policy_tok, policy_tok, True, False)
    assert same == [prompt + response[:-1]]  # the real tokens, without pads and without the EOS
    other = ppo.reward_inputs(["the film is"], [prompt], responses, mask, has_eos, policy_tok, rm_tok, False, False)
    assert other == [rm_tok("the film is a delight .").input_ids]
    # chat prompts: the conversation through the reward model's chat template, whatever the policy's tokenizer
    messages = [{"role": "user", "content": "the film is"}]
    chat = ppo.reward_inputs([messages], [prompt], responses, mask, has_eos, policy_tok, rm_tok, False, True)
    expected = rm_tok.apply_chat_template(messages + [{"role": "assistant", "content": " a delight ."}],
                                          tokenize=True)["input_ids"]
    assert chat == [expected]


def ppo_args(sft, rm, *extra):
    return online_args(sft, rm, "--ppo.noptepochs", "1", *extra)


def short_ppo(sft_policy, reward_model):
    return ppo_args(sft_policy, reward_model, "--total_episodes", "48", "--save_freq", "1", "--keep_checkpoints", "100")


@pytest.fixture(scope="session")
def ppo_1p(session_dir, sft_policy, reward_model):
    return run_into("ppo.py", short_ppo(sft_policy, reward_model), session_dir / "ppo_1p")


@pytest.fixture(scope="session")
def ppo_2p(session_dir, sft_policy, reward_model):
    return run_into("ppo.py", short_ppo(sft_policy, reward_model), session_dir / "ppo_2p", nproc=2)


def test_ratio_is_one_and_kl_zero_before_the_first_step(ppo_1p):
    first = metrics(ppo_1p)[1]  # one epoch, one minibatch: update 1 is a single step from the rollout policy
    assert first["update"] == 1
    assert first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0
    assert first["policy/approxkl_avg"] == 0.0 and first["policy/clipfrac_avg"] == 0.0
    assert first["objective/kl"] == 0.0 and first["objective/non_score_reward"] == 0.0


FSDP = ["--fsdp", "--gradient_checkpointing"]


@pytest.fixture(scope="session")
def ppo_fsdp(session_dir, sft_policy, reward_model):
    return run_into("ppo.py", [*short_ppo(sft_policy, reward_model), *FSDP], session_dir / "ppo_fsdp", nproc=2)


PPO_CURVES = ("objective/scores", "objective/kl", "loss/value_avg", "eval/scores")


@pytest.mark.slow
def test_two_ranks_match_one_rank(ppo_1p, ppo_2p):
    assert_same_run(ppo_1p, ppo_2p, PPO_CURVES)


@pytest.mark.slow
def test_fsdp_on_two_ranks_matches_one_rank(ppo_1p, ppo_fsdp):
    """Policy and value model sharded and trained (with gradient checkpointing), reference and reward model sharded
    frozen, sampling through the shards: the same run as one unsharded rank."""
    assert_same_run(ppo_1p, ppo_fsdp, PPO_CURVES)


def test_resume_from_a_checkpoint_is_exact(ppo_1p, sft_policy, reward_model, tmp_path):
    check_resume_from_checkpoint(ppo, short_ppo(sft_policy, reward_model), ppo_1p, tmp_path / "resumed", update=1)


@pytest.mark.slow
def test_preempted_fsdp_run_resumes_exactly(ppo_fsdp, sft_policy, reward_model, tmp_path):
    """SIGTERM to a 2-rank FSDP2 run: its sharded checkpoint resumes to the uninterrupted run's weights, bitwise."""
    check_preempt_and_resume("ppo.py", [*short_ppo(sft_policy, reward_model), *FSDP], ppo_fsdp,
                             tmp_path / "preempted", nproc=2)


def test_nonfinite_updates_are_skipped_then_stop_the_run(ppo_1p, sft_policy, reward_model, tmp_path, capsys):
    check_nonfinite_guard(ppo, short_ppo(sft_policy, reward_model), ppo_1p, tmp_path, good=1, capsys=capsys)


@pytest.mark.slow
def test_short_run_raises_the_held_out_reward_above_the_sft_policy(session_dir, sft_policy, reward_model):
    out = session_dir / "ppo_learns"
    check_short_run_learns("ppo.py", learning_args(sft_policy, reward_model, "--ppo.noptepochs", "2"), out, 0.5)
    samples = (out / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 256  # every held-out answer, before and after, with its scores


def test_reward_model_with_another_tokenizer_end_to_end(sft_policy, chat_reward_model, tmp_path, capsys):
    """A GPT-2 policy scored by a Llama-3-style reward model: responses go to it as re-tokenized text, and the value
    model (which must read the policy's tokens) starts from the policy with a new scalar head."""
    run_in_process(ppo, [*ppo_args(sft_policy, chat_reward_model), "--total_episodes", "16", "--eval_size", "4"],
                   tmp_path / "out")
    assert "the reward model's tokenizer differs from the policy's" in capsys.readouterr().out
    rows = metrics(tmp_path / "out")
    assert rows[-1]["update"] == 1 and math.isfinite(rows[-1]["objective/scores"])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_resume_with_other_settings_is_refused(ppo_1p, sft_policy, reward_model, tmp_path, no_model_loading):
    check_resume_refuses_other_settings(ppo, short_ppo(sft_policy, reward_model), ppo_1p, tmp_path,
                                        [("--ppo.kl_coef", "0.05", "0.2"), ("--seed", "1", "7")])


def test_ratio_is_one_before_the_first_step_with_dropout_in_the_config(tmp_path):
    """Llama reads `attention_dropout` from its config as a float (no nn.Dropout module): a non-zero value left in
    the config makes train mode stochastic, so the first PPO step would see a ratio other than 1."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    for name, cls, extra in (("policy", AutoModelForCausalLM, {}),
                             ("rm", AutoModelForSequenceClassification, {"num_labels": 1})):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(TINY_LLAMA, attention_dropout=0.5, **extra)
        cls.from_config(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    run_in_process(ppo, [*ppo_args(tmp_path / "policy", tmp_path / "rm"), "--total_episodes", "16", "--eval_size",
                         "4"], tmp_path / "out")
    first = metrics(tmp_path / "out")[1]
    assert first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0 and first["policy/approxkl_avg"] == 0.0
    assert first["val/clipfrac_avg"] == 0.0  # the value model (a Llama too) predicts as it did in the rollout


@pytest.fixture(scope="session")
def nan_reward_setup(session_dir, reward_model):
    """A reward model whose embedding of one byte token ('Â', the first byte of '§') is NaN, so it scores NaN for
    exactly the prompts that hold '§'; and prompts where every fourth training prompt does (none held out)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    rm = session_dir / "nan_rm"
    if not rm.exists():
        shutil.copytree(reward_model, rm, ignore=shutil.ignore_patterns("checkpoints", "*.jsonl"))
        state = load_file(str(rm / "model.safetensors"))
        state["transformer.wte.weight"][127] = float("nan")
        save_file(state, str(rm / "model.safetensors"), metadata={"format": "pt"})
    data = session_dir / "nan_prompts"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 64), ("validation", 8)):
        with open(SST2 / f"{split}.jsonl") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(n))]
        for i, row in enumerate(rows):
            row["sentence"] = ("§ " if split == "train" and i % 4 == 0 else "") + row["sentence"]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rm, data


@pytest.mark.slow
def test_nonfinite_rewards_stop_the_run_naming_the_reward_model(nan_reward_setup, sft_policy, tmp_path, capsys):
    rm, data = nan_reward_setup
    args = [*ppo_args(sft_policy, rm), "--task.dataset", data, "--total_episodes", "32"]
    # in the rollout, over 2 ranks: the count of the whole batch, before any update
    proc = run("ppo.py", *args, "--output_dir", tmp_path / "rollout", nproc=2, check=False)
    poisoned = sum(i % 4 == 0 for i in ppo.batch_indices(64, 16, 0, 1))
    assert proc.returncode != 0 and poisoned > 0
    expected = (f"stopping at update 1: --reward_model_name_or_path {rm}: {poisoned} of 16 scores in the rollout are "
                "NaN or inf, e.g. for the prompt '§ ")
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert [m["update"] for m in metrics(tmp_path / "rollout")] == [0]  # the clean held-out evaluation only
    assert not (tmp_path / "rollout" / "model.safetensors").exists()
    # in the held-out evaluation, before the first update
    with pytest.raises(SystemExit) as stop:
        run_in_process(ppo, [*args, "--task.eval_split", "train"], tmp_path / "eval")
    assert stop.value.code == 1
    assert (f"stopping at update 0: --reward_model_name_or_path {rm}: 2 of 8 scores in the held-out evaluation are "
            "NaN or inf, e.g. for the prompt '§ ") in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_several_minibatches(sft_policy, reward_model, tmp_path):
    """Minibatches are drawn from the global batch and split over the ranks, so 2 ranks make the updates 1 rank
    makes for nminibatches > 1 too (each rank used to draw its minibatches from its own rows only)."""
    args = ppo_args(sft_policy, reward_model, "--total_episodes", "32", "--ppo.nminibatches", "2",
                    "--ppo.noptepochs", "2")
    one, two = run_into("ppo.py", args, tmp_path / "1p"), run_into("ppo.py", args, tmp_path / "2p", nproc=2)
    assert_same_run(one, two, ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "eval/scores"))


def test_reward_function_instead_of_a_reward_model(sft_policy, tmp_path, capsys):
    """--reward_fn: the function scores every rollout and held-out answer with the data's other columns (here SST-2's
    label); no reward model is loaded (the path given does not exist), the value model starts from the policy."""
    fn = tmp_path / "words.py"
    fn.write_text("def words_plus_label(prompts, responses, label, **columns):\n"
                  "    return [len(r.split()) + 10 * l for r, l in zip(responses, label)]\n")
    run_in_process(ppo, [*ppo_args(sft_policy, "/no/such/reward_model"), "--reward_fn", f"{fn}:words_plus_label",
                         "--total_episodes", "16", "--eval_size", "8"], tmp_path / "out")
    assert f"the value model starts from {sft_policy}" in capsys.readouterr().out
    labels = [json.loads(line)["label"] for line in (SST2 / "validation.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {s["update"] for s in samples} == {0, 1}
    for s in samples:
        assert s["score"] == len(s["response"].split()) + 10 * labels[s["index"]]
    rows = metrics(tmp_path / "out")
    assert rows[-1]["update"] == 1 and math.isfinite(rows[-1]["objective/scores"])
    # the value model's new head starts at 0 (a random one predicts noise that GAE bootstraps from): the rollout's
    # values are all 0, so returns - values = returns and the explained variance is exactly 0
    assert rows[-1]["val/value_avg"] == 0.0 and rows[-1]["val/explained_variance"] == 0.0
    with pytest.raises(ValueError, match=r"--reward_fn .*words.py:nope: .*has no function 'nope'"):
        run_in_process(ppo, [*ppo_args(sft_policy, "/no/rm"), "--reward_fn", f"{fn}:nope"], tmp_path / "bad")


def test_chat_prompts_go_through_the_chat_template(chat_policy, chat_reward_model, tmp_path, capsys):
    """--task.prompt_format chat: message lists rendered with the policy's chat template (the tiny chat policy then
    answers and ends its turn), the reward model reading the conversation through its own template; the run says at
    start which tokens end a response."""
    from conftest import chat_prompt
    from transformers import AutoTokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": chat_prompt(i)}]}) + "\n"
                            for i in range(16)))
    run_in_process(ppo, ["--model_name_or_path", chat_policy, "--reward_model_name_or_path", chat_reward_model,
                         "--task.dataset", data, "--task.prompt_column", "messages", "--task.prompt_format", "chat",
                         "--task.prompt_words", "0", "--task.eval_split", "train", "--task.maxlen_prompt", "64",
                         "--task.response_length", "32", "--batch_size", "8", "--local_micro_batch_size", "4",
                         "--total_episodes", "16", "--eval_size", "4"], tmp_path / "out")
    samples = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples[:4]] == [chat_prompt(i) for i in range(4)]
    tokenizer = AutoTokenizer.from_pretrained(chat_policy)
    assert all(s["eos"] and s["response"].strip() for s in samples)  # answered, and ended the assistant turn
    assert not any(token in s["response"] for s in samples for token in tokenizer.all_special_tokens)
    assert metrics(tmp_path / "out")[-1]["update"] == 2
    assert "responses end at the first of: 1 '<|end_of_text|>', 4 '<|eot_id|>'" in capsys.readouterr().out


class FakeEngine:
    """Records what the Sampler asks of a vLLM engine (vLLM is not needed): the order of wake-ups and weight pushes,
    and whether the weights arrive as a stream (one tensor at a time) or as a list of the whole model."""

    def __init__(self, responses):
        self.calls, self.responses = [], responses

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def collective_rpc(self, method, kwargs):
        weights = kwargs["weights_iterator"]
        assert not isinstance(weights, (list, tuple, dict)), "the whole model was materialised before the push"
        first = next(weights)
        self.calls.append((method, first[0], first[1].dtype, 1 + sum(1 for _ in weights)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def fake_vllm_sampler(monkeypatch, responses, sleeps):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.pad_token = tokenizer.eos_token
    args = ppo.Args(model_name_or_path=str(TINY_LLAMA))
    args.task.response_length = 4
    policy = ppo.CausalLogprobs(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)), 1.0, 64)
    sampler = ppo.Sampler(args, policy, tokenizer, 1, torch.device("cpu"))
    sampler.llm, sampler.dtype, sampler.sleeps = FakeEngine(responses), torch.bfloat16, sleeps
    seen = {}

    def fake_sample(llm, prompt_ids, rows, stream, stop_ids, args, greedy=False):
        seen["stop_ids"] = stop_ids
        llm.calls.append(("generate",))
        return responses, [[0.0] * len(r) for r in responses]

    monkeypatch.setattr(ppo, "vllm_sample", fake_sample)
    monkeypatch.setattr(ppo, "global_width", lambda width, device: width)
    return sampler, seen


def test_vllm_sampler_streams_weights_and_wakes_them_before_the_kv_cache(monkeypatch):
    """Sleep mode (level 2 frees weights and KV cache): waking, the weights' memory comes back first, the weights are
    pushed as a stream in the engine's dtype, and only then the KV cache; the engine stops at the same tokens as the
    hf backend."""
    sampler, seen = fake_vllm_sampler(monkeypatch, [[7, 1], [7, 8, 9, 6]], sleeps=True)
    n = len(sampler.policy.model.state_dict())
    responses, _ = sampler([[5, 6], [5]], [0, 1], 0, 0)
    assert seen["stop_ids"] == [1, 4]
    assert responses.tolist() == [[7, 1, 4, 4], [7, 8, 9, 6]]
    first_push = ("reload_weights", "model.embed_tokens.weight", torch.bfloat16, n)
    assert sampler.llm.calls == [first_push, ("reset_prefix_cache",), ("generate",), ("sleep", 2)]
    sampler.llm.calls.clear()
    sampler([[5, 6], [5]], [0, 1], 1, 0)  # asleep: same version, but level 2 discarded the weights
    assert sampler.llm.calls == [("wake_up", ("weights",)), first_push, ("reset_prefix_cache",),
                                 ("wake_up", ("kv_cache",)), ("generate",), ("sleep", 2)]


def test_vllm_sampler_refuses_a_response_cut_without_a_stop_token(monkeypatch):
    """A vLLM response shorter than --task.response_length that does not end on a stop token would be padded with
    pad = EOS and read as ending with an EOS it never sampled: refused, naming the rows."""
    sampler, _ = fake_vllm_sampler(monkeypatch, [[7, 1], [7, 8]], sleeps=False)
    with pytest.raises(RuntimeError, match=r"rows \[1\].*without a stop token \[1, 4\]"):
        sampler([[5, 6], [5]], [0, 1], 0, 0)
