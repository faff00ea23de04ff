"""LoRA (--lora_r, peft): the merged weights against peft's own merge and as a plain model, only the adapters train,
the reference with the adapters off is the initial policy exactly; end-to-end runs of sft.py and rloo.py that train
the adapters alone, save a merged plain model that generates what the adapted model generates plus the adapter on its
own, and resume exactly; 2 ranks (DDP, FSDP2) equal 1 (slow); --lora_r 0 leaves a run bitwise what it was before LoRA
existed (slow: the scripts of commit BEFORE_LORA run beside today's)."""

import copy
import json

import pytest
import torch
from conftest import (
    TINY_GPT2,
    TINY_LLAMA,
    assert_weights_equal,
    check_resume_from_checkpoint,
    metrics,
    online_args,
    run,
    run_in_process,
    run_of_commit,
    weights,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import rloo
import sft

BEFORE_LORA = "988ad07"  # the last commit before --lora_r: runs with --lora_r 0 must equal its runs bit for bit


def lora(**kw):
    return sft.Args(lora_r=4, lora_alpha=8.0, **kw)


def tiny(path, cls=AutoModelForCausalLM, seed=0):
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=0) if cls is \
        AutoModelForSequenceClassification else AutoConfig.from_pretrained(path)
    return cls.from_config(config).eval()


def perturb(model):
    """Adapters as after some training (B starts at zero, which would hide a wrong merge)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


IDS = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [AutoModelForCausalLM, AutoModelForSequenceClassification],
                         ids=["causal", "reward"])
@pytest.mark.parametrize("path", [TINY_GPT2, TINY_LLAMA], ids=["gpt2-conv1d", "llama"])
def test_merged_weights_are_peft_merge_and_a_plain_model_computes_the_adapted_one(path, cls):
    model = tiny(path, cls)
    names = list(model.state_dict())
    peft = sft.add_lora(model, lora(), train_heads=cls is AutoModelForSequenceClassification)
    perturb(model)
    merged = dict(sft.merged_weights(model))
    assert list(merged) == names  # the plain model's names, in its order
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    plain = tiny(path, cls, seed=5)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    initial = tiny(path, cls).state_dict()
    changed = [n for n in names if not torch.equal(merged[n], initial[n])]
    assert changed and all(n.rpartition(".")[0] in sft.lora_targets(plain, ("all-linear",), "x") or
                           n.startswith("score.") for n in changed)


def test_only_the_adapters_train_and_the_adapted_model_starts_as_the_base():
    model = tiny(TINY_LLAMA)
    base = copy.deepcopy(model)
    state = torch.get_rng_state()
    sft.add_lora(model, lora())
    assert torch.equal(torch.get_rng_state(), state)  # A drawn from --seed, the global RNG left alone
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = sft.lora_targets(base, ("all-linear",), "x")
    assert "lm_head" not in targets and {t.rpartition(".")[2] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)  # B = 0: exactly the base model


def test_reference_with_adapters_off_is_the_initial_policy():
    """rloo.py's reference under LoRA: the policy's own module with the adapters switched off gives the initial
    policy's logprobs bit for bit after training moved the adapters; switched on again, they train."""
    initial = rloo.CausalLogprobs(tiny(TINY_LLAMA), 0.7, 5)
    policy = rloo.CausalLogprobs(tiny(TINY_LLAMA), 0.7, 5)
    peft = sft.add_lora(policy.model, lora())
    perturb(policy)
    reference = sft.AdaptersOff(policy, peft)
    queries, mask, responses = IDS[:, :5], torch.ones(2, 5, dtype=torch.long), IDS[:, 5:]
    with torch.no_grad():
        expected = rloo.forward_response(initial, queries, mask, responses)[0]
        assert torch.equal(rloo.forward_response(reference, queries, mask, responses)[0], expected)
        assert not torch.allclose(rloo.forward_response(policy, queries, mask, responses)[0], expected)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)


class RecordingEngine:
    """What push_weights hands a vLLM engine (vLLM is not needed here)."""

    def collective_rpc(self, method, kwargs):
        self.method, self.weights = method, dict(kwargs["weights_iterator"])

    def reset_prefix_cache(self):
        self.reset = True


def test_vllm_receives_the_merged_weights_under_the_plain_models_names():
    """--backend vllm: the engine serves the plain model; the push gives it W + scale * B @ A, in its dtype."""
    model = tiny(TINY_LLAMA)
    names = list(model.state_dict())
    peft = sft.add_lora(model, lora())
    perturb(model)
    engine = RecordingEngine()
    rloo.push_weights(engine, model, torch.bfloat16)
    assert engine.method == "reload_weights" and engine.reset and list(engine.weights) == names
    expected = copy.deepcopy(peft).merge_and_unload().state_dict()
    for name in names:
        assert engine.weights[name].dtype == torch.bfloat16
        torch.testing.assert_close(engine.weights[name].float(), expected[name].bfloat16().float(), rtol=1e-2,
                                   atol=1e-6, msg=name)


# ---- end to end: sft.py (text pairs on a saved tiny Llama) and rloo.py


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory):
    """A saved tiny Llama with its tokenizer: LoRA trains on top of pretrained weights, reloaded from this folder."""
    folder = tmp_path_factory.mktemp("base_llama")
    tiny(TINY_LLAMA).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_sft_general import rows, write_split

    folder = tmp_path_factory.mktemp("lora_corpus")
    write_split(folder, "train", rows(96, seed=0))
    write_split(folder, "validation", rows(16, seed=1))
    return folder


def sft_lora_args(base, corpus, *extra):
    return ["--model_name_or_path", base, "--task.dataset", corpus, "--lr", "1e-2", "--weight_decay", "0",
            "--batch_size", "16", "--local_micro_batch_size", "8", "--total_episodes", "96", "--eval_freq", "3",
            "--num_samples", "2", "--task.maxlen_prompt", "64", "--task.maxlen", "16", "--save_freq", "2",
            "--keep_checkpoints", "10", "--no_progress", "--lora_r", "8", "--lora_alpha", "16", *extra]


@pytest.fixture(scope="module")
def sft_lora(base_llama, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_lora") / "run"
    run_in_process(sft, sft_lora_args(base_llama, corpus), out)
    return out


def greedy(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)


def test_sft_lora_trains_the_adapters_and_saves_a_merged_plain_model(sft_lora, base_llama, corpus):
    from peft import PeftModel

    evals = [m for m in metrics(sft_lora) if "val/loss" in m]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5, evals
    base, merged = weights(base_llama), weights(sft_lora)
    assert merged.keys() == base.keys()
    targets = set(sft.lora_targets(tiny(TINY_LLAMA), ("all-linear",), "x"))
    for name in base:  # frozen weights unchanged, every adapted weight moved
        assert torch.equal(merged[name], base[name]) != (name.removesuffix(".weight") in targets), name
    config = json.loads((sft_lora / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and set(config["target_modules"]) == targets
    # the merged folder loads as a plain model and generates, greedily, what the base plus the adapter (the model as
    # it was in memory: unmerged) generates
    tokenizer = AutoTokenizer.from_pretrained(sft_lora)
    plain = AutoModelForCausalLM.from_pretrained(sft_lora).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_llama), sft_lora / "adapter").eval()
    prompts = [json.loads(line)["prompt"] for line in (corpus / "validation.jsonl").read_text().splitlines()[:4]]
    out = greedy(plain, tokenizer, prompts)
    assert torch.equal(out, greedy(adapted, tokenizer, prompts))
    assert not torch.equal(out, greedy(AutoModelForCausalLM.from_pretrained(base_llama).eval(), tokenizer, prompts))


def test_sft_lora_resumes_exactly(sft_lora, base_llama, corpus, tmp_path):
    check_resume_from_checkpoint(sft, sft_lora_args(base_llama, corpus), sft_lora, tmp_path / "resumed", update=2)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "resumed" / "adapter" / name).read_bytes() == (sft_lora / "adapter" / name).read_bytes()


ONLINE = {"rloo.py": ["--rloo.k", "4"], "ppo.py": ["--ppo.noptepochs", "1"], "rebel_online.py": [],
          "grpo.py": ["--grpo.loss_type", "dapo", "--grpo.beta", "0.04"]}  # beta: dapo's default 0 has no KL term


def online_lora_args(script, sft_policy, reward_model, *extra):
    return online_args(sft_policy, reward_model, "--lr", "3e-3", "--total_episodes", "48", "--save_freq", "1",
                       "--keep_checkpoints", "10", "--no_progress", *ONLINE[script], "--lora_r", "4", *extra)


def rloo_lora_args(sft_policy, reward_model, *extra):
    return online_lora_args("rloo.py", sft_policy, reward_model, *extra)


@pytest.fixture(scope="module")
def rloo_lora(sft_policy, reward_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rloo_lora") / "run"
    run_in_process(rloo, rloo_lora_args(sft_policy, reward_model), out)
    return out


def check_online_lora_run(out, sft_policy):
    """The reference is the initial policy (KL exactly 0 before the first step, then not), only the adapted weights
    of the merged policy moved (GPT-2: c_attn, c_proj, c_fc; embeddings, norms and biases not), the adapter saved."""
    rows = metrics(out)
    assert rows[0]["eval/kl"] == 0.0 and rows[1]["objective/kl"] == 0.0
    assert rows[-1]["objective/kl"] > 0 and rows[-1]["eval/kl"] != 0
    base, merged = weights(sft_policy), weights(out)
    assert merged.keys() == base.keys()
    moved = {name for name in base if not torch.equal(merged[name], base[name])}
    assert moved and all(name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) for name in moved)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_rloo_lora_reference_is_the_initial_policy_and_only_adapters_move(rloo_lora, sft_policy):
    check_online_lora_run(rloo_lora, sft_policy)
    assert metrics(rloo_lora)[1]["val/ratio"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ppo.py", "grpo.py", "rebel_online.py"])
def test_other_online_lora_runs(script, sft_policy, reward_model, tmp_path):
    """ppo.py (whose value model gets adapters too, its head trained whole), grpo.py, rebel_online.py."""
    run(script, *online_lora_args(script, sft_policy, reward_model), "--output_dir", tmp_path / "run")
    check_online_lora_run(tmp_path / "run", sft_policy)


@pytest.mark.slow
def test_rloo_lora_resumes_exactly(rloo_lora, sft_policy, reward_model, tmp_path):
    check_resume_from_checkpoint(rloo, rloo_lora_args(sft_policy, reward_model), rloo_lora, tmp_path / "resumed",
                                 update=1)


@pytest.mark.slow
def test_lora_two_ranks_match_one_rank_with_ddp_and_with_fsdp2(sft_lora, rloo_lora, base_llama, corpus, sft_policy,
                                                               reward_model, tmp_path):
    """sft.py and rloo.py with LoRA under torchrun, 2 processes, DDP then FSDP2 (frozen base weights and trained
    adapters in the same FSDP2 units), and with gradient checkpointing: the one-process run's merged weights; ppo.py
    (a value model with adapters and a head trained whole) under FSDP2 likewise."""
    ppo_one = tmp_path / "ppo_one"
    run("ppo.py", *online_lora_args("ppo.py", sft_policy, reward_model), "--output_dir", ppo_one)
    both = ([], ["--fsdp", "--gradient_checkpointing"])
    for script, args, one, extras in (("sft.py", sft_lora_args(base_llama, corpus), sft_lora, both),
                                      ("rloo.py", rloo_lora_args(sft_policy, reward_model), rloo_lora, both),
                                      ("ppo.py", online_lora_args("ppo.py", sft_policy, reward_model), ppo_one,
                                       (["--fsdp"],))):
        for extra in extras:
            out = tmp_path / f"{script}{len(extra)}"
            run(script, *args, *extra, "--output_dir", out, nproc=2)
            assert_weights_equal(one, out, exact=False)


@pytest.mark.slow
def test_lora_r_0_leaves_runs_bitwise_as_before_lora(base_llama, corpus, sft_policy, reward_model, tmp_path):
    """sft.py and the four online scripts with --lora_r 0 (the default) against the same scripts at BEFORE_LORA, same
    arguments: the same weights bit for bit and the same metrics (timing aside)."""
    cases = [("sft.py", sft_lora_args(base_llama, corpus)[:-4])]
    cases += [(script, online_lora_args(script, sft_policy, reward_model)[:-2]) for script in ONLINE]
    for script, args in cases:
        before = run_of_commit(BEFORE_LORA, script, args, tmp_path / f"before_{script}", tmp_path)
        now = tmp_path / f"now_{script}"
        run(script, *args, "--lora_r", "0", "--output_dir", now)
        assert_weights_equal(before, now)
        # every metric logged before, with the same value (timing aside); metrics added since (the importance
        # sampling ratios, rollout/is_*) may be there too
        old_rows, new_rows = metrics(before), metrics(now)
        assert len(old_rows) == len(new_rows)
        for old, new in zip(old_rows, new_rows):
            assert {k: v for k, v in old.items() if k not in ("eps", "elapsed")} == \
                {k: new.get(k) for k in old if k not in ("eps", "elapsed")}, script
