"""The bad inputs users really hit, for every script: each gets a clear error naming the file, column or argument (or
the documented handling) before any model is loaded, and leaves no output behind. README's "Failure modes" table
lists the same cases."""

import dataclasses
import json
import math
import os
import re

import datasets
import pytest
import torch
import transformers
import tyro
from conftest import SST2, TINY_GPT2, TINY_LLAMA

import dpo
import filter as filter_stage
import generate
import ppo
import rebel
import reward
import reward_sst2
import score
import sft
import sft_sst2

ERRORS = (ValueError, FileExistsError, FileNotFoundError, SystemExit)


def save(rows, path):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def empty(columns, path):
    datasets.Dataset.from_dict({c: [] for c in columns}).save_to_disk(str(path))
    return str(path)


def pairs(path, **override):
    """filter.py's layout (prompt width 7, response width 6, ids < 1024), three pairs in each split; `override`
    replaces columns of row 1."""
    rows = []
    for i in range(3):
        row = {"prompt_input_ids": [0] * 4 + [10, 11, 12], "prompt_attention_mask": [0] * 4 + [1] * 3,
               "chosen_input_ids": [20, 21, 0, 0, 0, 0], "chosen_attention_mask": [1, 1, 0, 0, 0, 0],
               "reject_input_ids": [30, 0, 0, 0, 0, 0], "reject_attention_mask": [1, 0, 0, 0, 0, 0],
               "chosen_reward": 1.0, "reject_reward": 0.0}
        rows.append({**row, **(override if i == 1 else {})})
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split in ("train", "test")}).save_to_disk(path)
    return path


def tokenizer_without_eos(path):
    """tiny-gpt2's tokenizer and config with the EOS token removed (it has no pad token either)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_GPT2)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text((TINY_GPT2 / "config.json").read_text())
    return str(path)


def make(case, tmp):
    """(module, argv, expected message) of each case; files are created in tmp."""
    out = ["--output_dir", str(tmp / "out")]
    sst2 = ["--model_name_or_path", str(TINY_GPT2), "--from_scratch"]
    gpt2 = ["--model_name_or_path", str(TINY_GPT2)]
    finished = tmp / "finished"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    sentences = [{"sentence": "a fine film .", "label": 1}, {"sentence": "dull .", "label": 0}] * 40
    ppo_models = ["--model_name_or_path", str(TINY_GPT2), "--reward_model_name_or_path", str(TINY_GPT2)]
    gen = ["--model_name_or_path", str(TINY_LLAMA), "--split", "train", "--backend", "hf"]
    generated = {"prompt_id": "a", "prompt": "hi", "response_0": "x", "response_1": "y"}
    scored = {**generated, "prompt_token_ids": [0, 5], "response_0_token_ids": [7, 4], "response_1_token_ids": [8, 4],
              "response_0_reward": 1.0, "response_1_reward": 0.0}
    pair_path = lambda name, **override: pairs(str(tmp / name), **override)  # noqa: E731
    rebel_args = lambda path: [*gpt2, "--task.dataset", path, "--task.maxlen_prompt", "7", "--task.maxlen", "6",  # noqa: E731
                               "--batch_size", "2"]
    broken_json = tmp / "broken.jsonl"
    broken_json.write_text('{"sentence": "a fine film .", "label": 1}\n{"sentence": "dull .", "label": 0\n')
    not_utf8 = tmp / "latin1.jsonl"
    not_utf8.write_bytes('{"prompt": "a fine film"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    broken_folder = tmp / "broken_folder"
    broken_folder.mkdir()
    (broken_folder / "train.jsonl").write_text('{"sentence": "a fine film ."}\n\n{"sentence": "dull .", }\n')
    no_eos = tokenizer_without_eos(tmp / "no_eos")
    lora = [*gpt2, "--lora_r", "4"]
    lacks = lambda name: (rf"--lora_target_modules {name}: --model_name_or_path .*tiny-gpt2 has no linear layer "  # noqa: E731
                          rf"named {name}; its linear layers: \[.*'c_attn', 'c_fc', 'c_proj'")
    cases = {
        # sft_sst2.py
        "sft: malformed JSON line": (sft_sst2, [*sst2, "--dataset", str(broken_json)],
                                     r"broken.jsonl line 2: not valid JSON \(Expecting ',' delimiter at column 34\)"),
        "sft: tokenizer without an EOS token": (sft_sst2, ["--model_name_or_path", no_eos, "--from_scratch"],
                                                r"no_eos: its tokenizer has no EOS token"),
        "sft: misnamed column": (sft_sst2, [*sst2, "--dataset", str(SST2), "--text_column", "text"],
                                 r"split train: missing column\(s\) \['text'\]"),
        "sft: empty dataset": (sft_sst2, [*sst2, "--dataset", empty(["sentence", "label"], tmp / "e")],
                               r"--dataset .*/e: no rows"),
        "sft: empty file": (sft_sst2, [*sst2, "--dataset", jsonl([], tmp / "e.jsonl")], r"e.jsonl: the file is empty"),
        "sft: only empty sentences": (sft_sst2, [*sst2, "--dataset", jsonl([{"sentence": " ", "label": 1}] * 40,
                                                                             tmp / "blank.jsonl"), "--eval_split",
                                                 "None"], r"--batch_size 32 is larger than the data \(0 examples\)"),
        "sft: no such data file": (sft_sst2, [*sst2, "--dataset", "./nope.jsonl"], r"--dataset ./nope.jsonl: no such"),
        "sft: no such split": (sft_sst2, [*sst2, "--dataset", str(SST2), "--eval_split", "dev"], r"no split 'dev'"),
        "sft: nonexistent model": (sft_sst2, ["--model_name_or_path", "/no/such/model", "--dataset", str(SST2)],
                                   r"--model_name_or_path /no/such/model: cannot load a tokenizer"),
        "sft: finished output": (sft_sst2, [*sst2, "--dataset", str(SST2), "--output_dir", str(finished)],
                                 r"already holds a finished run"),
        "sft: batch does not divide": (sft_sst2, [*sst2, "--dataset", str(SST2), "--local_micro_batch_size", "5"],
                                       r"not a multiple of --local_micro_batch_size 5"),
        # reward_sst2.py
        "reward: non-UTF-8 file": (reward_sst2, [*sst2, "--dataset", str(not_utf8)],
                                   r"--dataset .*latin1.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 16\)"),
        "reward: labels not 0/1": (reward_sst2, [*sst2, "--dataset", jsonl([{"sentence": "ok", "label": 2}] * 40,
                                                                            tmp / "l.jsonl"), "--eval_split", "None"],
                                   r"column 'label' must hold 0 or 1"),
        "reward: one label only": (reward_sst2, [*sst2, "--dataset", jsonl(sentences[::2], tmp / "p.jsonl"),
                                                 "--eval_split", "None"], r"needs sentences of both labels"),
        "reward: nonexistent model": (reward_sst2, ["--model_name_or_path", "/no/such/model"],
                                      r"/no/such/model: cannot load a tokenizer"),
        "reward: finished output": (reward_sst2, [*sst2, "--output_dir", str(finished)], r"finished run"),
        # ppo.py
        "ppo: malformed JSON in a folder of data files": (ppo, [*ppo_models, "--task.dataset", str(broken_folder)],
                                                          r"--task.dataset .*broken_folder/train.jsonl line 3: not "
                                                          r"valid JSON"),
        "ppo: policy tokenizer without an EOS token": (ppo, ["--model_name_or_path", no_eos,
                                                             "--reward_model_name_or_path", str(TINY_GPT2)],
                                                       r"--model_name_or_path .*no_eos: its tokenizer has no EOS"),
        "ppo: misnamed prompt column": (ppo, [*ppo_models, "--task.dataset", str(SST2), "--task.prompt_column", "text"],
                                        r"missing column\(s\) \['text'\]"),
        "ppo: every prompt too long": (ppo, [*ppo_models, "--task.dataset", str(SST2), "--task.maxlen_prompt", "1"],
                                       r"no prompt left after dropping empty ones and those over --task.maxlen_prompt"),
        "ppo: nonexistent reward model": (ppo, [*gpt2, "--reward_model_name_or_path", "/no/rm"],
                                          r"--reward_model_name_or_path /no/rm: cannot load a tokenizer"),
        "ppo: minibatches do not divide": (ppo, [*ppo_models, "--ppo.nminibatches", "3"], r"does not split into"),
        "ppo: finished output": (ppo, [*ppo_models, "--output_dir", str(finished)], r"finished run"),
        # generate.py
        "generate: non-UTF-8 file": (generate, [*gen, "--dataset", str(not_utf8)],
                                     r"latin1.jsonl line 2: not UTF-8 text"),
        "generate: tokenizer without an EOS token": (generate, ["--model_name_or_path", no_eos, "--dataset",
                                                                "x.jsonl", "--prompt_format", "text"],
                                                     r"no_eos: its tokenizer has no EOS token"),
        "generate: empty slice": (generate, [*gen, "--dataset", jsonl([{"prompt": "hi"}], tmp / "g.jsonl"),
                                             "--start_idx", "5"], r"no prompts selected"),
        "generate: empty dataset": (generate, [*gen, "--dataset", empty(["prompt"], tmp / "g0")], r"no rows"),
        "generate: nonexistent model": (generate, ["--model_name_or_path", "/no/model", "--dataset", "x.jsonl"],
                                        r"/no/model: cannot load a tokenizer"),
        "generate: finished output": (generate, [*gen, "--dataset", "x.jsonl", "--output_dir", str(finished)],
                                      r"already holds a finished dataset"),
        # score.py
        "score: empty prompt": (score, ["--reward_model", str(TINY_LLAMA), "--dataset", save(
            [{**generated, "prompt": [{"role": "user", "content": "hi"}]},
             {**generated, "prompt_id": "b", "prompt": [{"role": "system", "content": ""},
                                                        {"role": "user", "content": " "}]}], tmp / "s4")],
                                r"split train: row 1 \(prompt_id b\) has an empty prompt \(1 such rows\)"),
        "score: reward tokenizer without a pad or EOS token": (score, ["--reward_model", no_eos, "--dataset", "x"],
                                                               r"--reward_model .*no_eos: its tokenizer has neither "
                                                               r"a pad nor an EOS token"),
        "score: misnumbered responses": (score, ["--reward_model", str(TINY_LLAMA), "--dataset", save(
            [{"prompt": "hi", "response_0": "a", "response_2": "b"}], tmp / "s")], r"not numbered 0 ... 1: \[0, 2\]"),
        "score: longer than the reward model": (score, ["--reward_model", str(TINY_LLAMA), "--dataset", save(
            [{**generated, "response_1": "word " * 400}], tmp / "s2")], r"row 0 response_1 is \d+ tokens with the "
                                                                         r"prompt, more than the reward model's 256"),
        "score: no chat template": (score, ["--reward_model", str(TINY_GPT2), "--dataset",
                                            save([generated], tmp / "s3")],
                                    r"--reward_model .*tiny-gpt2: its tokenizer has no chat template"),
        "score: finished output": (score, ["--dataset", "x", "--output_dir", str(finished)], r"finished dataset"),
        # filter.py
        "filter: empty prompt": (filter_stage, ["--model_name_or_path", str(TINY_LLAMA), "--dataset", save(
            [scored, {**scored, "prompt_id": "b", "prompt": " \n"}], tmp / "f3")],
                                 r"split train: row 1 \(prompt_id b\) has an empty prompt"),
        "filter: tokenizer without an EOS token": (filter_stage, ["--model_name_or_path", no_eos, "--dataset",
                                                                  "x"], r"no_eos: its tokenizer has no EOS token"),
        "filter: non-finite reward": (filter_stage, ["--model_name_or_path", str(TINY_LLAMA), "--dataset", save(
            [scored, {**scored, "prompt_id": "b", "response_1_reward": math.nan}], tmp / "f")],
                                      r"row 1 \(prompt_id b\) has a non-finite or missing reward nan"),
        "filter: no chat template": (filter_stage, [*gpt2, "--dataset", save(
            [{k: v for k, v in scored.items() if k != "prompt_token_ids"}], tmp / "f2")], r"has no chat template"),
        "filter: nonexistent model": (filter_stage, ["--model_name_or_path", "/no/model", "--dataset", "x"],
                                      r"/no/model: cannot load a tokenizer"),
        "filter: finished output": (filter_stage, ["--dataset", "x", "--output_dir", str(finished)], r"finished"),
        # rebel.py
        "rebel: tokenizer without an EOS token": (rebel, ["--model_name_or_path", no_eos],
                                                  r"no_eos: its tokenizer has no EOS token"),
        "rebel: missing column": (rebel, rebel_args(save([{"prompt_input_ids": [1]}], tmp / "r")),
                                  r"missing column\(s\) \['prompt_attention_mask'"),
        "rebel: widths differ from --task.maxlen": (rebel, [*rebel_args(pair_path("ok")), "--task.maxlen", "5"],
                                                    r"chosen_input_ids is padded to 6 tokens, but --task.maxlen is 5"),
        "rebel: non-finite reward": (rebel, rebel_args(pair_path("inf", reject_reward=math.inf)),
                                     r"split train: row 1 has a non-finite reward \[1.0, inf\]"),
        "rebel: empty response": (rebel, rebel_args(pair_path("empty", reject_attention_mask=[0] * 6)),
                                  r"row 1 has an empty reject response"),
        "rebel: ids outside the embedding table": (rebel, rebel_args(pair_path("vocab", chosen_input_ids=[5000] * 6)),
                                                   r"chosen_input_ids holds ids outside the model's embedding table"),
        "rebel: batch does not divide": (rebel, [*rebel_args(pair_path("ok2")), "--local_micro_batch_size", "3"],
                                         r"not a multiple of --local_micro_batch_size 3"),
        "rebel: nonexistent model": (rebel, ["--model_name_or_path", "/no/model"], r"cannot load a tokenizer"),
        "rebel: finished output": (rebel, [*gpt2, "--output_dir", str(finished)], r"finished run"),
        # LoRA (sft.py's and the online scripts' check_lora, before any weights load)
        "sft: LoRA target module the model lacks": (
            sft, [*gpt2, "--lora_r", "4", "--lora_target_modules", "c_attn", "q_proj"],
            r"--lora_target_modules q_proj: --model_name_or_path .*tiny-gpt2 has no linear layer named q_proj; its "
            r"linear layers: \['c_attn', 'c_fc', 'c_proj', 'lm_head'\] \(or all-linear\)"),
        "sft: LoRA on an output layer tied to the embeddings": (
            sft, [*gpt2, "--lora_r", "4", "--lora_target_modules", "lm_head"],
            r"--lora_target_modules: --model_name_or_path .*tiny-gpt2's output layer lm_head shares its weights"),
        "sft: LoRA dropout 1": (sft, [*gpt2, "--lora_r", "4", "--lora_dropout", "1"],
                                r"--lora_dropout must be in \[0, 1\), got 1.0"),
        "ppo: LoRA target module the value model lacks": (
            ppo, [*ppo_models, "--value_model_name_or_path", str(TINY_LLAMA), "--lora_r", "8", "--lora_target_modules",
                  "c_attn"],
            r"--lora_target_modules c_attn: --value_model_name_or_path .*tiny-llama.* has no linear layer named "
            r"c_attn; its linear layers: \[.*'q_proj'"),
        "sft.py: LoRA on random weights": (sft, [*lora, "--from_scratch"], r"--lora_r with --from_scratch"),
        "ppo: LoRA target module the policy lacks": (
            ppo, [*ppo_models, "--lora_r", "8", "--lora_target_modules", "query_key_value"],
            r"--lora_target_modules query_key_value: --model_name_or_path .*tiny-gpt2 has no linear layer named "
            r"query_key_value"),
        # LoRA in the offline scripts: a target the model lacks is found on a meta-device copy of it
        "sft: LoRA dropout of 1": (sft_sst2, [*lora, "--lora_dropout", "1"],
                                   r"--lora_dropout must be in \[0, 1\), got 1.0"),
        "sft: LoRA on random weights": (sft_sst2, [*lora, "--from_scratch"], r"--lora_r with --from_scratch"),
        "reward: LoRA on random weights": (reward, [*lora, "--from_scratch"], r"--lora_r with --from_scratch"),
        "sft: LoRA target the model lacks": (sft_sst2, [*lora, "--lora_target_modules", "q_proj"], lacks("q_proj")),
        "reward: LoRA target the model lacks": (reward_sst2, [*lora, "--lora_target_modules", "c_attn", "q_proj"],
                                                lacks("q_proj")),
        "reward.py: LoRA target the model lacks": (reward, [*lora, "--lora_target_modules", "gate_proj"],
                                                   lacks("gate_proj")),
        "rebel: LoRA target the model lacks": (rebel, [*lora, "--lora_target_modules", "v_proj"], lacks("v_proj")),
        "dpo: LoRA target the model lacks": (dpo, [*lora, "--lora_target_modules", "q_proj"], lacks("q_proj")),
    }
    module, argv, match = cases[case]
    return module, (argv if "--output_dir" in argv else [*argv, *out]), match


CASES = [
    "sft: malformed JSON line", "sft: tokenizer without an EOS token", "reward: non-UTF-8 file",
    "ppo: malformed JSON in a folder of data files", "ppo: policy tokenizer without an EOS token",
    "generate: non-UTF-8 file", "generate: tokenizer without an EOS token",
    "score: reward tokenizer without a pad or EOS token", "score: empty prompt", "filter: empty prompt",
    "filter: tokenizer without an EOS token",
    "rebel: tokenizer without an EOS token",
    "sft: misnamed column", "sft: empty dataset", "sft: empty file", "sft: only empty sentences",
    "sft: no such data file", "sft: no such split", "sft: nonexistent model", "sft: finished output",
    "sft: batch does not divide",
    "reward: labels not 0/1", "reward: one label only", "reward: nonexistent model", "reward: finished output",
    "ppo: misnamed prompt column", "ppo: every prompt too long", "ppo: nonexistent reward model",
    "ppo: minibatches do not divide", "ppo: finished output",
    "generate: empty slice", "generate: empty dataset", "generate: nonexistent model", "generate: finished output",
    "score: misnumbered responses", "score: longer than the reward model", "score: no chat template",
    "score: finished output",
    "filter: non-finite reward", "filter: no chat template", "filter: nonexistent model", "filter: finished output",
    "rebel: missing column", "rebel: widths differ from --task.maxlen", "rebel: non-finite reward",
    "rebel: empty response", "rebel: ids outside the embedding table", "rebel: batch does not divide",
    "rebel: nonexistent model", "rebel: finished output",
    "sft: LoRA target module the model lacks", "sft: LoRA on an output layer tied to the embeddings",
    "sft: LoRA dropout 1", "ppo: LoRA target module the policy lacks", "ppo: LoRA target module the value model lacks",
    "sft.py: LoRA on random weights",
    "sft: LoRA dropout of 1", "sft: LoRA on random weights", "reward: LoRA on random weights",
    "sft: LoRA target the model lacks", "reward: LoRA target the model lacks", "reward.py: LoRA target the model lacks",
    "rebel: LoRA target the model lacks", "dpo: LoRA target the model lacks",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_early_error_and_leaves_nothing(case, tmp_path, no_model_loading):
    module, argv, match = make(case, tmp_path)
    with pytest.raises(ERRORS, match=match):
        module.main(tyro.cli(module.Args, use_underscores=True, args=argv))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert not leftovers, f"left behind: {leftovers}"
    assert sorted(p.name for p in (tmp_path / "finished").iterdir()) == ["config.json"]


def test_batch_that_does_not_divide_across_ranks_names_the_argument():
    args = sft_sst2.Args(batch_size=32)
    with pytest.raises(ValueError, match="--batch_size 32 does not divide across 3 ranks"):
        sft_sst2.derive_batch_sizes(args, 3)
    with pytest.raises(ValueError, match="--batch_size 64 does not split into --ppo.nminibatches 1 minibatches over "
                                         "3 ranks"):
        ppo.derive_ppo_batch_sizes(ppo.Args(batch_size=64), 3)


def test_responses_without_eos_get_the_documented_penalty():
    scores, has_eos = torch.tensor([0.5, 2.0, -0.3]), torch.tensor([True, False, True])
    args = ppo.Args()
    expected = torch.tensor([0.5, args.task.penalty_reward_value, -0.3])
    assert torch.equal(ppo.apply_non_eos_penalty(scores, has_eos, args), expected)
    args.task.non_eos_penalty = False
    assert torch.equal(ppo.apply_non_eos_penalty(scores, has_eos, args), scores)


def test_empty_responses_are_kept_as_real_samples():
    columns = ["response_0", "response_1"]
    row = {"prompt_id": "a", "prompt": "p", "prompt_token_ids": [0, 5], "response_0": "", "response_0_token_ids": [4],
           "response_1": "fine", "response_1_token_ids": [9, 4], "response_0_reward": -1.0, "response_1_reward": 1.0}
    args = filter_stage.Args(maxlen_prompt=4, maxlen=4)
    kept, stats = filter_stage.filter_rows([row], columns, None, 4, {4}, 4, args)
    assert stats["kept"] == 1 and kept[0]["reject"] == "" and kept[0]["reject_input_ids"] == [4, 4, 4, 4]
    assert kept[0]["reject_attention_mask"] == [1, 0, 0, 0]  # the empty response is its end-of-turn token


MODULES = [sft_sst2, reward_sst2, sft, reward, ppo, rebel, dpo, generate, score, filter_stage]
UNBOUNDED = {"seed", "task.penalty_reward_value"}  # numeric arguments where every value means something


def numeric_arguments(cls, prefix=""):
    """Dotted names of the int and float fields a user can set (computed fields are hidden from the command line)."""
    for f in dataclasses.fields(cls):
        if "Suppress" in str(f.type):
            continue
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            yield from numeric_arguments(type(f.default_factory()), f"{prefix}{f.name}.")
        elif re.search(r"\b(int|float)\b", str(f.type)):
            yield prefix + f.name


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_numeric_argument_is_range_checked_before_anything_is_written(module, tmp_path, no_model_loading):
    names = [name for name in numeric_arguments(module.Args) if name not in UNBOUNDED]
    assert len(names) >= 2
    for name in names:
        argv = [f"--{name}", "-1", "--output_dir", str(tmp_path / "out")]
        with pytest.raises(ValueError, match=rf"--{re.escape(name)} must be .*, got -1"):
            module.main(tyro.cli(module.Args, use_underscores=True, args=argv))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--total_episodes", "-16"), ("--batch_size", "0"), ("--lr", "-1e-3"),
                                         ("--warmup_ratio", "1.5"), ("--lr", "nan")])
def test_the_reported_numbers_are_refused(flag, value, tmp_path, no_model_loading):
    argv = [flag, value, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"{flag} must be"):
        sft_sst2.main(tyro.cli(sft_sst2.Args, use_underscores=True, args=argv))
    assert not list(tmp_path.iterdir())


def test_a_data_stage_on_a_folder_in_use_is_refused(tmp_path, no_model_loading):
    """generate.py and score.py take the folder's lock before their first shard (and before loading a model), filter.py
    before it filters. The holder here is this process itself, through another open file, which flock treats as
    another owner (tests/test_sft.py holds it from another process, and kills it)."""
    row = {"prompt_id": "a", "prompt": "hi", "prompt_token_ids": [0, 5], "response_0": "x", "response_1": "y",
           "response_0_token_ids": [7, 4], "response_1_token_ids": [8, 4], "response_0_reward": 1.0,
           "response_1_reward": 0.0}
    scored = save([row, {**row, "prompt_id": "b"}], tmp_path / "scored")
    prompts = jsonl([{"prompt": "hi"}, {"prompt": "a film"}], tmp_path / "prompts.jsonl")
    stages = {"filter": (filter_stage, ["--model_name_or_path", str(TINY_LLAMA), "--dataset", scored]),
              "score": (score, ["--reward_model", str(TINY_LLAMA), "--dataset", scored]),
              "generate": (generate, ["--model_name_or_path", str(TINY_LLAMA), "--dataset", prompts, "--split", "train",
                                      "--backend", "hf"])}
    for name, (module, argv) in stages.items():
        out = tmp_path / f"out_{name}"
        lock = module.lock_output_dir(str(out), 0)
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {os.getpid()} on "):
            module.main(tyro.cli(module.Args, use_underscores=True, args=[*argv, "--output_dir", str(out)]))
        lock.close()
        assert not out.exists() and not (tmp_path / f"out_{name}.partial").exists(), name


@pytest.mark.parametrize("script", ["ppo.py", "generate.py", "rebel.py"])
def test_a_gpu_torch_cannot_use_stops_instead_of_falling_back_to_the_cpu(script, monkeypatch):
    """init_distributed (the same copy in every script): an NVIDIA GPU present (/dev/nvidiactl) that torch cannot use
    stops with torch's reason and what to do; CUDA_VISIBLE_DEVICES='' runs on the CPU on purpose; no GPU: the CPU."""
    import importlib
    import os

    module = importlib.import_module(script[:-3])
    real_exists = os.path.exists
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert module.init_distributed()[2].type == "cpu"  # no GPU on this machine: the CPU, by design
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidiactl" or real_exists(p))
    with pytest.raises(SystemExit, match=r"has an NVIDIA GPU \(/dev/nvidiactl\) but torch .* cannot use it: .*"
                                         r"CUDA_VISIBLE_DEVICES=''"):
        module.init_distributed()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert module.init_distributed()[2].type == "cpu"


def test_eval_policy_stops_on_a_gpu_torch_cannot_use(monkeypatch, tmp_path):
    """tools/eval_policy.py picks its device with ppo.py's init_distributed, so it stops as the training scripts do
    (with torch's reason) instead of evaluating on the CPU, before any model loads or anything is written."""
    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import eval_policy

    real_exists = os.path.exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidiactl" or real_exists(p))
    monkeypatch.setattr(ppo, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer before the check"))
    argv = ["--policies", "/no/policy", "--episodes", "1", "--reference", "/no/ref", "--reward_model", "/no/rm",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"has an NVIDIA GPU \(/dev/nvidiactl\) but torch .* cannot use it"):
        eval_policy.main(tyro.cli(eval_policy.Args, use_underscores=True, args=argv))
    assert not (tmp_path / "out").exists()
