"""The correction of the sampler/trainer mismatch in the online scripts (ppo.py, rloo.py, grpo.py, rebel_online.py: one
helper, identical copies). Where the truth is known exactly: responses sampled at one temperature and the trainer's
logprobs taken at another, so every per-token ratio is exp(log softmax(z / T2) - log softmax(z / T1)) of the same
logits z; the weights and masks of every mode and the logged ratios against a slow reference, the edge cases (padding,
a ratio of exactly C or 1/C), bad input refused before any model is loaded, and short runs of every script with the
correction on and off."""

import dataclasses
import json
import math

import pytest
import torch
import tyro
from conftest import TINY_GPT2, assert_weights_equal, metrics, run_in_process, run_into, weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import grpo
import ppo
import rebel_online
import rloo

SCRIPTS = [ppo, rloo, grpo, rebel_online]
MODES = ["none", "token_truncate", "token_mask", "sequence_mask"]
SAMPLE_T, TRAIN_T = 0.8, 1.2  # the sampler's temperature and the trainer's: a mismatch of known size


def slow_reference(trainer, sampler, mask, mode, cap):
    """Token by token in float64 Python: the weights of `mode` and the logged ratios (mean, min and max of the
    per-token ratio, fractions of tokens above C, of tokens outside [1/C, C], of responses outside it)."""
    weights, ratios, above, outside, dropped = [], [], 0, 0, 0
    for row_t, row_s, row_m in zip(trainer.tolist(), sampler.tolist(), mask.tolist()):
        real = [t for t, m in enumerate(row_m) if m]
        ratio = {t: math.exp(row_t[t] - row_s[t]) for t in real}
        whole = math.exp(sum(row_t[t] - row_s[t] for t in real))
        ratios += ratio.values()
        above += sum(r > cap for r in ratio.values())
        outside += sum(not 1 / cap <= r <= cap for r in ratio.values())
        dropped += not 1 / cap <= whole <= cap
        weights.append([0.0 if t not in ratio else {"token_truncate": min(ratio[t], cap),
                                                    "token_mask": float(1 / cap <= ratio[t] <= cap),
                                                    "sequence_mask": float(1 / cap <= whole <= cap)}.get(mode, 1.0)
                        for t in range(len(row_m))])
    return torch.tensor(weights, dtype=torch.float64), {
        "rollout/is_ratio_mean": sum(ratios) / len(ratios), "rollout/is_ratio_min": min(ratios),
        "rollout/is_ratio_max": max(ratios), "rollout/is_truncated_frac": above / len(ratios),
        "rollout/is_masked_frac": outside / len(ratios), "rollout/is_seq_masked_frac": dropped / len(mask)}


def is_args(mode, cap):
    return ppo.Args(importance_sampling=mode, importance_sampling_cap=cap)


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory):
    """The tiny GPT-2 with seeded random weights of std 0.1 (not 0.02: its logits spread enough for two temperatures
    to give ratios well outside [1/C, C]), saved with its tokenizer."""
    out = tmp_path_factory.mktemp("peaked_gpt2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_GPT2, initializer_range=0.1)).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_GPT2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_temperatures(policy_folder):
    """Responses the hf Sampler drew at SAMPLE_T (in two chunks of different widths), its own logprobs of them, the
    trainer's at TRAIN_T (CausalLogprobs, as the scripts compute them) and the exact logprobs at both temperatures from
    one full forward in float64; padding as the scripts write it."""
    tokenizer = AutoTokenizer.from_pretrained(policy_folder)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy_folder).eval()
    args = ppo.Args(model_name_or_path=str(policy_folder), local_rollout_forward_batch_size=3, seed=3)
    args.task.temperature, args.task.response_length = SAMPLE_T, 12
    prompt_ids = [tokenizer(t).input_ids for t in ("a great", "the movie is", "dull", "it", "one of the best")]
    rows = list(range(len(prompt_ids)))
    sampler = ppo.Sampler(args, ppo.CausalLogprobs(model, SAMPLE_T, 7), tokenizer, 1, torch.device("cpu"))
    responses, sampler_logprobs = sampler(prompt_ids, rows, 0, 0)
    queries, query_mask = ppo.left_pad(prompt_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        trainer = ppo.forward_response(ppo.CausalLogprobs(model, TRAIN_T, 7), queries, query_mask, responses)[0]
        full = torch.cat([query_mask, torch.ones_like(responses)], 1)
        logits = model(torch.cat([queries, responses], 1), attention_mask=full,
                       position_ids=(full.cumsum(1) - 1).clamp(min=0)).logits[:, queries.shape[1] - 1:-1].double()
    exact = {t: (logits / t).log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1) for t in (SAMPLE_T, TRAIN_T)}
    mask = torch.arange(responses.shape[1])[None] < torch.tensor([12, 3, 7, 1, 10])[:, None]  # responses cut short
    return {"mask": mask, "sampler": sampler_logprobs.masked_fill(~mask, 0.0), "exact": exact,
            "trainer": trainer.masked_fill(~mask, ppo.INVALID_LOGPROB)}


def test_the_hf_sampler_returns_the_logprobs_of_what_it_sampled_from(two_temperatures):
    """Its own logprobs (KV-cache logits / T) equal the full forward's at the sampling temperature; the trainer's
    equal those at the training temperature."""
    d = two_temperatures
    torch.testing.assert_close(d["sampler"][d["mask"]].double(), d["exact"][SAMPLE_T][d["mask"]], atol=1e-5, rtol=0)
    torch.testing.assert_close(d["trainer"][d["mask"]].double(), d["exact"][TRAIN_T][d["mask"]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_weights_and_ratios_match_the_exact_ratio_of_two_temperatures(two_temperatures, mode):
    d, cap = two_temperatures, 2.0
    expected, expected_metrics = slow_reference(d["exact"][TRAIN_T], d["exact"][SAMPLE_T], d["mask"], mode, cap)
    ratio = (d["exact"][TRAIN_T] - d["exact"][SAMPLE_T]).exp()[d["mask"]]
    assert ((ratio - cap).abs().min() > 1e-3 and (ratio - 1 / cap).abs().min() > 1e-3), "a ratio too near the band"
    assert 0 < expected_metrics["rollout/is_truncated_frac"] < expected_metrics["rollout/is_masked_frac"] < 1
    assert 0 < expected_metrics["rollout/is_seq_masked_frac"] < 1  # every mode has something to do
    got, got_metrics = ppo.importance_sampling(d["trainer"], d["sampler"], d["mask"].float(), is_args(mode, cap))
    if mode == "none":
        assert got is None  # the scripts then leave the loss exactly as it was
    else:
        assert not got.requires_grad
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert got_metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-5), key


def test_a_ratio_of_exactly_c_or_1_over_c_is_kept_and_padding_counts_for_nothing():
    cap = 2.0
    up = torch.tensor(math.log(cap))
    assert up.exp() == cap and (-up).exp() == 1 / cap  # float32 log(2): exp gives 2 and 1/2 exactly
    up, pad = up.item(), ppo.INVALID_LOGPROB
    # response 0: ratios C, 1/C, then padding holding the scripts' fill values (a ratio of e there); response 1: one
    # token at exactly C (its sequence ratio C: kept); response 2: two tokens of ratio C (its sequence ratio C^2)
    trainer = torch.tensor([[up, -up, pad], [up, pad, pad], [up, up, pad]])
    sampler = torch.zeros(3, 3)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 0]])
    expected = {"token_truncate": [[cap, 1 / cap, 0], [cap, 0, 0], [cap, cap, 0]],
                "token_mask": [[1, 1, 0], [1, 0, 0], [1, 1, 0]],
                "sequence_mask": [[1, 1, 0], [1, 0, 0], [0, 0, 0]]}
    for mode, want in expected.items():
        got, logged = ppo.importance_sampling(trainer, sampler, mask, is_args(mode, cap))
        assert torch.equal(got, torch.tensor(want)), mode
        assert logged == {"rollout/is_ratio_mean": (4 * cap + 1 / cap) / 5, "rollout/is_ratio_min": 1 / cap,
                          "rollout/is_ratio_max": cap, "rollout/is_truncated_frac": 0.0,
                          "rollout/is_masked_frac": 0.0, "rollout/is_seq_masked_frac": 1 / 3}


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("cap", ["1", "0.5", "nan"])
def test_a_cap_of_at_most_1_is_refused_before_anything_is_loaded(module, cap, tmp_path, no_model_loading):
    argv = ["--importance_sampling", "sequence_mask", "--importance_sampling_cap", cap, "--output_dir",
            str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"--importance_sampling_cap must be > 1 .*got {cap}"):
        module.main(tyro.cli(module.Args, use_underscores=True, args=argv))
    assert not list(tmp_path.iterdir())


def test_auto_is_sequence_mask_with_vllm_and_off_with_hf_and_rebel_has_no_token_modes():
    for backend, resolved in (("vllm", "sequence_mask"), ("hf", "none")):
        args = ppo.Args(backend=backend)
        ppo.check_importance_sampling(args)
        assert args.importance_sampling == resolved
    with pytest.raises(SystemExit):  # REBEL regresses whole responses: a token weight has no place in its loss
        tyro.cli(rebel_online.Args, use_underscores=True, args=["--importance_sampling", "token_truncate"])


REWARD_FN = "def length(prompts, responses, **columns):\n    return [len(r) / 8.0 for r in responses]\n"
WORDS = "new old long short fine bad good odd dull great slow fast cold warm dark wild".split()
ON = {"ppo": "token_truncate", "rloo": "token_mask", "grpo": "token_truncate", "rebel_online": "sequence_mask"}


def short_run_args(policy_folder, tmp_path):
    """One update of 8 responses of 8 tokens to 16 prompts, scored by their length in characters (a reward function:
    no reward model; no EOS penalty, since no response of the random policy ends), C = 1.5."""
    (tmp_path / "fn.py").write_text(REWARD_FN)
    prompts = "".join(json.dumps({"sentence": f"the {word} movie is"}) + "\n" for word in WORDS)
    (tmp_path / "prompts.jsonl").write_text(prompts)
    return ["--model_name_or_path", policy_folder, "--reward_fn", f"{tmp_path / 'fn.py'}:length", "--task.dataset",
            tmp_path / "prompts.jsonl", "--task.eval_split", "train", "--task.temperature", str(TRAIN_T),
            "--task.response_length", "8", "--lr", "1e-3", "--batch_size", "8", "--local_micro_batch_size", "4",
            "--total_episodes", "8", "--eval_size", "4", "--save_freq", "0", "--importance_sampling_cap", "1.5",
            "--task.no_non_eos_penalty"]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_short_runs_with_the_correction_on_and_off(module, policy_folder, tmp_path, monkeypatch):
    """One update of each script on the tiny GPT-2 with a reward function, sampling at SAMPLE_T and training at TRAIN_T
    (a real mismatch). The rollout's ratios are logged the same whatever the choice; the correction changes the update;
    and a sequence mask wide enough to keep every response leaves the run bitwise equal to the one without it (the
    correction's lines change nothing else)."""
    sample = module.sample

    def sample_at_another_temperature(policy, queries, query_mask, rows, stream, stop_ids, args, greedy=False,
                                      logprobs=None):
        other = dataclasses.replace(args, task=dataclasses.replace(args.task, temperature=SAMPLE_T))
        return sample(policy, queries, query_mask, rows, stream, stop_ids, other, greedy, logprobs)

    monkeypatch.setattr(module, "sample", sample_at_another_temperature)
    common = short_run_args(policy_folder, tmp_path)
    name = module.__name__
    runs = {}
    for label, extra in (("off", []), ("on", ["--importance_sampling", ON[name]]),
                         ("wide", ["--importance_sampling", "sequence_mask", "--importance_sampling_cap", "1e30"])):
        run_in_process(module, [*common, *extra], tmp_path / label)
        runs[label] = metrics(tmp_path / label)[1]
    logged = [key for key in runs["off"] if key.startswith("rollout/is_")]
    assert len(logged) == 6 and all(runs["on"][k] == runs["off"][k] for k in logged)
    assert runs["off"]["rollout/is_masked_frac"] > 0 and runs["off"]["rollout/is_seq_masked_frac"] > 0
    assert runs["wide"]["rollout/is_seq_masked_frac"] == 0
    off, on, wide = (weights(tmp_path / label) for label in ("off", "on", "wide"))
    assert any(not torch.equal(off[k], on[k]) for k in off), "the correction did not change the update"
    assert all(torch.equal(off[k], wide[k]) for k in off)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["grpo.py", "rebel_online.py"])
def test_two_ranks_with_the_correction_on_match_one_rank(script, policy_folder, tmp_path):
    """The weights are computed per rank and gathered with the rollout, the logged ratios reduced over ranks: 2 ranks
    (gloo) with the correction on end close to 1 rank (the hf sampler's ratios are 1 +- 1e-6 here, so the runs differ
    only by the order of float sums)."""
    mode = "token_truncate" if script == "grpo.py" else "sequence_mask"
    args = [*short_run_args(policy_folder, tmp_path), "--importance_sampling", mode, "--total_episodes", "16"]
    one = run_into(script, args, tmp_path / "one")
    two = run_into(script, args, tmp_path / "two", nproc=2)
    assert_weights_equal(one, two, exact=False)
    for a, b in zip(metrics(one), metrics(two)):
        for key in (k for k in a if k.startswith("rollout/is_")):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
