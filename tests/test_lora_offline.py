"""LoRA (--lora_r) in the offline training scripts: sft_sst2.py, reward_sst2.py, reward.py, rebel.py and dpo.py.

Each trains only its adapters (and, for reward models, the scalar head in full) on a tiny pretrained-like model, saves
a merged folder that loads as a plain model with from_pretrained and gives the in-memory trained model's greedy tokens
or scores, plus the adapter alone, which on the base model gives the same; REBEL's and DPO's reference is the policy
with its adapters off, which equals the initial policy bitwise; LoRA runs resume exactly; 2 ranks (DDP, FSDP2 with
gradient checkpointing) match 1 rank; `--lora_r 0` leaves a run bitwise what it was before LoRA existed (slow: the
scripts of commit BEFORE_LORA run beside today's)."""

import contextlib
import math

import pytest
import torch
from conftest import (
    SST2,
    TINY_GPT2,
    TINY_LLAMA,
    assert_weights_equal,
    check_resume_from_checkpoint,
    metrics,
    pair_rows,
    run,
    run_in_process,
    run_of_commit,
    save_tiny,
    weights,
)

import dpo
import rebel
import reward
import reward_sst2
import sft_sst2

BEFORE_LORA = "988ad07"  # the last commit before --lora_r: runs with --lora_r 0 must equal its runs bit for bit
LORA = ["--lora_r", "4", "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny GPT-2 with seeded random weights, saved as a pretrained model with its tokenizer (LoRA adapts a model
    that a folder keeps: --from_scratch is refused with --lora_r)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("lora") / "tiny_lm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_GPT2)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_GPT2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("lora") / "policy"
    return save_tiny(path, AutoConfig.from_pretrained(TINY_LLAMA), AutoModelForCausalLM)


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """8 train and 8 test pairs in filter.py's layout (prompt width 7, response width 6), chosen rewarded 1."""
    import datasets

    path = tmp_path_factory.mktemp("lora") / "pairs"
    lengths = [(1 + i % 7, 1 + (3 * i) % 6, 1 + (5 * i + 2) % 6) for i in range(8)]
    datasets.DatasetDict({"train": pair_rows(lengths=lengths, seed=2),
                          "test": pair_rows(lengths=lengths[::-1], seed=3)}).save_to_disk(str(path))
    return path


def pairs_args(script, policy, pairs):
    """3 epochs of 8 pairs, 4 per update (6 updates), a checkpoint every 3."""
    own = ["--dpo.beta", "0.1"] if script == "dpo.py" else ["--rebel.eta", "1"]
    return ["--model_name_or_path", policy, "--task.dataset", pairs, "--task.maxlen_prompt", "7", "--task.maxlen", "6",
            *own, "--lr", "2e-3", "--batch_size", "4", "--local_micro_batch_size", "1", "--num_train_epochs", "3",
            "--eval_freq", "3", "--save_freq", "3", "--keep_checkpoints", "10", "--no_progress", *LORA]


def sst2_args(lm):
    return ["--model_name_or_path", lm, "--dataset", SST2, "--eval_split", "None", "--lr", "3e-3", "--batch_size", "16",
            "--local_micro_batch_size", "8", "--total_episodes", "96", "--save_freq", "3", "--keep_checkpoints", "10",
            "--no_progress", *LORA]


def reward_args(lm, data):
    return ["--model_name_or_path", lm, "--task.dataset", data, "--task.eval_split", "None", "--lr", "3e-3",
            "--batch_size", "16", "--local_micro_batch_size", "8", "--save_freq", "2", "--no_progress", *LORA]


def comparisons(folder, n=48):
    """Text pairs of the offline SST-2 corpus: a positive sentence chosen over a negative one."""
    import json

    rows = [json.loads(line) for line in open(SST2 / "train.jsonl")]
    positive = [r["sentence"] for r in rows if r["label"] == 1][:n]
    negative = [r["sentence"] for r in rows if r["label"] == 0][:n]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": "Review: ", "chosen": p, "rejected": q}) + "\n"
                                                for p, q in zip(positive, negative)))
    return folder


@contextlib.contextmanager
def trained_model(module):
    """Record the in-memory model (the transformers model carrying the adapters) and its PeftModel as the script hands
    them to save_lora at the end of training."""
    real, seen = module.save_lora, {}

    def record(model, peft, args, rank):
        seen.update(model=model, peft=peft)
        return real(model, peft, args, rank)

    module.save_lora = record
    try:
        yield seen
    finally:
        module.save_lora = real


def check_frozen_base_and_merge(out, base_path, cls):
    """The merged folder holds the base model's weights untouched outside the adapted layers and W + scale * B @ A in
    them (B trained away from its zero init); the adapter folder holds only adapters (and modules_to_save)."""
    import json

    from safetensors.torch import load_file

    base = cls.from_pretrained(base_path).state_dict()
    merged, adapter = weights(out), load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    targets = set(config["target_modules"])
    prefix, heads = "base_model.model.", config["modules_to_save"] or ()
    assert targets and all(".lora_" in k or k.removeprefix(prefix).split(".")[0] in heads for k in adapter), adapter
    for name, tensor in merged.items():
        layer, _, leaf = name.rpartition(".")
        if layer in targets and leaf == "weight":
            a, b = adapter[f"{prefix}{layer}.lora_A.weight"], adapter[f"{prefix}{layer}.lora_B.weight"]
            assert b.abs().max() > 0, f"{layer}: B never moved from its zero init"
            delta = b @ a
            delta = delta.T if config["fan_in_fan_out"] else delta
            torch.testing.assert_close(tensor, base[name] + scale * delta, atol=1e-6, rtol=1e-5)
        elif name.split(".")[0] in heads:  # a head trained in full: in the adapter as it is in the merged model
            assert torch.equal(tensor, adapter[prefix + name]), name
        else:
            assert torch.equal(tensor, base[name]), f"{name} changed, but only adapters train"


@pytest.mark.parametrize("script", ["dpo.py", "rebel.py"])
def test_pairs_scripts_train_adapters_against_the_policy_with_adapters_off(script, tiny_policy, tiny_pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = {"dpo.py": dpo, "rebel.py": rebel}[script]
    out = tmp_path / "run"
    with trained_model(module) as seen:
        run_in_process(module, pairs_args(script, tiny_policy, tiny_pairs), out)
    rows = metrics(out)
    assert rows[1]["objective/kl"] == 0.0  # the first update's forward: the policy is its reference exactly
    assert rows[-1]["objective/kl"] != 0.0  # then it moved away
    check_frozen_base_and_merge(out, tiny_policy, AutoModelForCausalLM)

    # the reference (computed by the LoRA policy with its adapters off, cached) equals the plain initial policy's
    args = module.Args(model_name_or_path=str(tiny_policy))
    args.task.maxlen_prompt, args.task.maxlen, args.local_micro_batch_size = 7, 6, 1
    args.task.dataset, args.task.train_split = str(tiny_pairs), "train"
    plain = module.SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_policy).eval(), args.task.temperature,
                                    args.logprob_chunk_size)
    cached = torch.load(next((out / "ref_logprobs").glob("*.pt")))
    import datasets

    for split, name in (("train", "train"), ("test", "eval")):
        data = datasets.load_from_disk(str(tiny_pairs))[split].with_format("torch")
        expected = module.sharded_pass(plain, data, list(range(len(data))), args, 0, 1, torch.device("cpu"),
                                       contextlib.nullcontext())
        assert torch.equal(cached[name], expected), split

    # after training, the adapters switched off still give the initial policy, bitwise
    trained = seen["model"].eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        off = module.AdaptersOff(trained, seen["peft"])(input_ids=ids).logits
        assert torch.equal(off, plain.model(input_ids=ids).logits)
        assert not torch.equal(trained(input_ids=ids).logits, off)

    # the merged folder, a plain model, generates the trained model's greedy tokens; so does base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy), out / "adapter").eval()
    greedy = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    expected = trained.generate(input_ids=ids, **greedy)
    assert torch.equal(merged.generate(input_ids=ids, **greedy), expected)
    assert torch.equal(adapted.generate(input_ids=ids, **greedy), expected)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_sft_sst2_lora_learns_and_its_merged_model_generates_the_trained_tokens(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    with trained_model(sft_sst2) as seen:
        run_in_process(sft_sst2, sst2_args(tiny_lm), out)
    losses = [m["loss/sft_avg"] for m in metrics(out) if "loss/sft_avg" in m]
    assert losses[-1] < losses[0] - 0.1, losses
    check_frozen_base_and_merge(out, tiny_lm, AutoModelForCausalLM)
    trained = seen["model"].eval()
    ids = AutoTokenizer.from_pretrained(out)("the film", return_tensors="pt").input_ids
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = trained.generate(input_ids=ids, **greedy)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).generate(input_ids=ids, **greedy), expected)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), out / "adapter").eval()
    assert torch.equal(adapted.generate(input_ids=ids, **greedy), expected)


@pytest.mark.parametrize("script", ["reward_sst2.py", "reward.py"])
def test_reward_lora_trains_adapters_and_the_whole_head_and_saves_a_plain_classifier(script, tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = {"reward_sst2.py": reward_sst2, "reward.py": reward}[script]
    out = tmp_path / "run"
    args = sst2_args(tiny_lm) if script == "reward_sst2.py" else reward_args(tiny_lm, comparisons(tmp_path / "data"))
    with trained_model(module) as seen:
        run_in_process(module, args, out)
    losses = [m["loss/reward_avg"] for m in metrics(out) if "loss/reward_avg" in m]
    assert all(math.isfinite(x) for x in losses)
    check_frozen_base_and_merge(out, tiny_lm, AutoModelForSequenceClassification)
    head = [n for n, p in seen["peft"].named_parameters() if p.requires_grad and "lora_" not in n]
    assert head and all(".modules_to_save." in n for n in head), head  # the head, trained in full
    initial = {n.split("original_module.")[1]: p for n, p in seen["peft"].named_parameters() if "original_module" in n}
    assert initial and not any(p.requires_grad for p in initial.values())
    assert all(not torch.equal(weights(out)[f"score.{n}"], p) for n, p in initial.items())  # the head trained

    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["a superb , moving and witty film .", "the plot is dull ."]
    sequences = [tokenizer(t).input_ids for t in texts]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        expected = module.rewards(seen["model"].eval(), sequences, pad, "cpu") if script == "reward_sst2.py" else \
            module.rewards(module.ScalarReward(seen["model"].eval()), sequences, pad, "cpu")
        merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert merged.config.pad_token_id == pad
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        torch.testing.assert_close(merged(**batch).logits[:, 0], expected, atol=1e-5, rtol=1e-5)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1, pad_token_id=pad)
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(adapted(**batch).logits[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_reward_lora_normalization_shifts_the_merged_model_not_the_adapter(tiny_lm, tmp_path):
    """reward.py --normalize_dataset with LoRA: the mean reward of the normalisation data is folded into the merged
    folder (GPT-2's head has no bias: into the final LayerNorm's), which scores the trained model's rewards minus that
    mean; the adapter alone keeps the trained, unshifted rewards (documented)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"prompt": "Review: ", "response_0": "a fine film .", "response_1": "dull and long ."}] * 4
    (tmp_path / "norm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with trained_model(reward) as seen:
        run_in_process(reward, [*reward_args(tiny_lm, comparisons(tmp_path / "data")), "--normalize_dataset",
                                tmp_path / "norm.jsonl"], out)
    mean = next(m["normalize/reward_mean"] for m in metrics(out) if "normalize/reward_mean" in m)
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["Review: a fine film .", "Review: dull and long .", "the plot is dull ."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = reward.rewards(reward.ScalarReward(seen["model"].eval()), [tokenizer(x).input_ids for x in texts],
                                 tokenizer.pad_token_id, "cpu")
        merged = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits[:, 0]
        base = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1,
                                                                  pad_token_id=tokenizer.pad_token_id)
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(**batch).logits[:, 0]
    assert abs(mean) > 1e-3
    torch.testing.assert_close(merged, trained - mean, atol=1e-4, rtol=1e-4)
    assert merged[:2].mean().item() == pytest.approx(0.0, abs=1e-4)  # the normalisation data now average 0
    torch.testing.assert_close(adapted, trained, atol=1e-5, rtol=1e-5)


def test_lora_runs_resume_exactly(tiny_policy, tiny_pairs, tiny_lm, tmp_path):
    """DPO's policy (the reference recomputed with the adapters off in the resumed run's new folder) and a reward
    model (the head in modules_to_save): resumed from a mid-run checkpoint, the merged weights, the adapter and the
    metrics equal the uninterrupted run's bitwise."""
    from safetensors.torch import load_file

    for module, args, update in ((dpo, pairs_args("dpo.py", tiny_policy, tiny_pairs), 3),
                                 (reward_sst2, sst2_args(tiny_lm), 3)):
        full, resumed = tmp_path / f"{module.__name__}_full", tmp_path / f"{module.__name__}_resumed"
        run_in_process(module, args, full)
        check_resume_from_checkpoint(module, args, full, resumed, update)
        a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_rank_lora_runs_match_one_rank_with_ddp_and_fsdp2(tiny_policy, tiny_pairs, tiny_lm, tmp_path):
    """DPO (rebel.py shares its model code) with DDP, and with FSDP2 plus gradient checkpointing; reward.py (its own
    model code, the head in modules_to_save) with FSDP2: merged weights and adapters close to one rank's."""
    from safetensors.torch import load_file

    def adapters(out):
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))

    cases = [("dpo.py", pairs_args("dpo.py", tiny_policy, tiny_pairs), [[], ["--fsdp", "--gradient_checkpointing"]]),
             ("reward.py", reward_args(tiny_lm, comparisons(tmp_path / "data")), [["--fsdp"]])]
    for script, args, variants in cases:
        one = tmp_path / f"{script}_1p"
        run(script, *args, "--output_dir", one)
        for i, extra in enumerate(variants):
            two = tmp_path / f"{script}_2p_{i}"
            run(script, *args, *extra, "--output_dir", two, nproc=2)
            assert_weights_equal(one, two, exact=False)
            a, b = adapters(one), adapters(two)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=f"{script} {extra} {k}")


@pytest.mark.slow
def test_lora_r_0_leaves_runs_bitwise_as_before_lora(tiny_policy, tiny_pairs, tiny_lm, tmp_path):
    """The five scripts with --lora_r 0 (the default) against the same scripts at BEFORE_LORA, same arguments (the LoRA
    ones left out): the same weights bit for bit and the same metrics (timing aside)."""
    data = comparisons(tmp_path / "data")
    cases = [("dpo.py", pairs_args("dpo.py", tiny_policy, tiny_pairs)),
             ("rebel.py", pairs_args("rebel.py", tiny_policy, tiny_pairs)),
             ("reward.py", reward_args(tiny_lm, data)), ("reward_sst2.py", sst2_args(tiny_lm)),
             ("sft_sst2.py", sst2_args(tiny_lm))]
    skip = ("eps", "elapsed")
    for script, args in cases:
        assert args[-len(LORA):] == LORA
        args = args[:-len(LORA)]
        if script == "sft_sst2.py":  # with its evaluation (greedy samples) too
            args += ["--eval_split", "validation", "--eval_freq", "3", "--num_samples", "2"]
        before = run_of_commit(BEFORE_LORA, script, args, tmp_path / f"before_{script}", tmp_path)
        now = tmp_path / f"now_{script}"
        run(script, *args, "--output_dir", now)
        assert_weights_equal(before, now)
        assert [{k: v for k, v in m.items() if k not in skip} for m in metrics(before)] == \
            [{k: v for k, v in m.items() if k not in skip} for m in metrics(now)], script
