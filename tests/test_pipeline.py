"""The REBEL data stages on a tiny Llama-3-style chat setup: generate.py -> score.py -> filter.py chained end to end,
torchrun == one process, every filter rule on a crafted fixture, the layout token by token, no double BOS, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch
from conftest import ROOT, TINY_GPT2, TINY_LLAMA, chat_prompt, command, run, run_in_process

import filter as filter_stage
import generate
import score

GEN = ["--num_responses", "4", "--maxlen", "32", "--backend", "hf", "--shard_size", "10",
       "--local_micro_batch_size", "4", "--split", "train"]


def score_args(reward_model, dataset):
    return ["--reward_model", reward_model, "--dataset", dataset, "--shard_size", "4", "--local_micro_batch_size", "8"]


@pytest.fixture(scope="session")
def generated(session_dir, chat_policy, chat_prompts):
    out = session_dir / "gen_1p"
    run("generate.py", "--model_name_or_path", chat_policy, "--dataset", chat_prompts, *GEN, "--output_dir", out)
    return out


@pytest.fixture(scope="session")
def scored(session_dir, generated, chat_reward_model):
    out = session_dir / "score_1p"
    run("score.py", *score_args(chat_reward_model, generated), "--output_dir", out)
    return out


def test_generate_writes_prompts_in_order_with_single_bos(generated, chat_prompts, chat_policy):
    from transformers import AutoTokenizer

    data = datasets.load_from_disk(str(generated))
    tokenizer = AutoTokenizer.from_pretrained(chat_policy)
    assert data["prompt_id"] == [f"id{i:03d}" for i in range(24)]  # gathered back in prompt order
    expected = {"prompt_id", "prompt", "prompt_token_ids"} | {f"response_{i}{s}" for i in range(4)
                                                               for s in ("", "_token_ids")}
    assert set(data.column_names) == expected
    bos = tokenizer.bos_token_id
    for row in data:
        ids = row["prompt_token_ids"]
        assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1  # the template's BOS, not a second one
        assert ids == tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True)["input_ids"]
        for i in range(4):
            assert tokenizer.decode(row[f"response_{i}_token_ids"], skip_special_tokens=True) == row[f"response_{i}"]
    finished = [row[f"response_{i}_token_ids"][-1] == tokenizer.eos_token_id for row in data for i in range(4)]
    assert sum(finished) > len(finished) // 2  # the tiny policy learned to end its turn


@pytest.mark.parametrize("prompts", ["shared_system_prompt", "identical", "nothing_shared"])
def test_generate_hf_encodes_shared_prompt_tokens_once_with_the_same_responses(chat_policy, prompts):
    """generate_hf computes the tokens all prompts share once, and each prompt once for its n responses (rows laid out
    [shared, padding, own tokens]): greedy responses equal plain generate on each prompt alone, and sampled ones equal
    generate on the left-padded batch with num_return_sequences and the same seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_generate import plain_generate

    tokenizer = AutoTokenizer.from_pretrained(chat_policy)
    model = AutoModelForCausalLM.from_pretrained(chat_policy).eval()
    system = {"role": "system", "content": "you write short reviews of films for a newspaper"}
    chats = {"shared_system_prompt": [[system, {"role": "user", "content": chat_prompt(i) + " please" * (i % 3)}]
                                      for i in range(5)],
             "identical": [[system, {"role": "user", "content": chat_prompt(0)}]] * 3,
             "nothing_shared": [[{"role": "user", "content": chat_prompt(i)}] for i in range(3)]}[prompts]
    prompt_ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]
                  for c in chats]
    if prompts == "nothing_shared":  # the chat template's common start cut off
        prompt_ids = [x[generate.shared_prefix_length(prompt_ids):] for x in prompt_ids]
        assert generate.shared_prefix_length(prompt_ids) == 0
    stop_ids = generate.stop_token_ids(tokenizer, str(chat_policy))
    assert tokenizer.pad_token_id is None  # generate_hf pads with stop_ids[0]; the reference pads alike
    for temperature, n in ((0.0, 1), (1.0, 3)):
        args = generate.Args(temperature=temperature, top_p=1.0, num_responses=n, maxlen=12, local_micro_batch_size=2,
                             seed=3)
        got = generate.generate_hf(model, tokenizer, prompt_ids, 0, stop_ids, args, torch.device("cpu"))
        if temperature == 0:  # each prompt alone, no padding at all
            config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=stop_ids)
            expected = [[generate.cut_at_stop(model.generate(input_ids=torch.tensor([x]), generation_config=config)
                                              [0, len(x):].tolist(), stop_ids)] for x in prompt_ids]
        else:  # generate.py's earlier way: left-padded batches, num_return_sequences, the same seeds
            expected = plain_generate(model, prompt_ids, stop_ids, stop_ids[0], args)
        assert got == expected
        if n > 1:
            assert len({tuple(r) for rows in got for r in rows}) > 1


@pytest.mark.slow
def test_two_ranks_generate_and_score_the_same(session_dir, generated, scored, chat_policy, chat_prompts,
                                               chat_reward_model):
    gen2, score2 = session_dir / "gen_2p", session_dir / "score_2p"
    run("generate.py", "--model_name_or_path", chat_policy, "--dataset", chat_prompts, *GEN, "--output_dir", gen2,
        nproc=2)
    assert datasets.load_from_disk(str(gen2)).to_list() == datasets.load_from_disk(str(generated)).to_list()
    run("score.py", *score_args(chat_reward_model, gen2), "--output_dir", score2, nproc=2)
    assert datasets.load_from_disk(str(score2)).to_list() == datasets.load_from_disk(str(scored)).to_list()


def test_batched_scores_equal_one_at_a_time(scored, chat_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = datasets.load_from_disk(str(scored))
    model = AutoModelForSequenceClassification.from_pretrained(chat_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(chat_reward_model)
    for row in data.select(range(3)):
        for i in range(4):
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row[f"response_{i}"]}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")["input_ids"]
            assert (ids[0] == tokenizer.bos_token_id).sum() == 1
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0, 0].item()
            assert row[f"response_{i}_reward"] == pytest.approx(alone, abs=1e-5)


def test_chain_generate_score_filter(session_dir, scored, chat_policy):
    out = session_dir / "filter_chain"
    run("filter.py", "--dataset", scored, "--model_name_or_path", chat_policy, "--maxlen_prompt", "32", "--maxlen",
        "40", "--test_size", "4", "--output_dir", out)
    data = datasets.load_from_disk(str(out))
    assert set(data) == {"train", "test"} and len(data["test"]) == 4
    assert data["train"].column_names == filter_stage.OUTPUT_COLUMNS
    row = data["train"][0]
    assert len(row["prompt_input_ids"]) == 32 and len(row["chosen_input_ids"]) == 40
    assert row["chosen_reward"] >= row["reject_reward"] and row["chosen"] != row["reject"]
    assert (out / "args.json").exists() and (out / "filter_stats.json").exists()


def crafted_rows():
    """Six rows, each hitting one rule (or none), with response ids made up so the lengths are known."""
    eot, end_of_text, bos = 4, 1, 0
    prompt = [bos, 2, 50, 51, 3]

    def row(pid, prompt_ids, responses, rewards):
        out = {"prompt_id": pid, "prompt": f"prompt {pid}", "prompt_token_ids": prompt_ids}
        for i, ((text, ids), reward) in enumerate(zip(responses, rewards)):
            out |= {f"response_{i}": text, f"response_{i}_token_ids": ids, f"response_{i}_reward": reward}
        return out

    good = [("a fine film", [60, 61, 62, eot]), ("dull", [70, end_of_text]), ("ok", [80, eot])]
    return [
        row("keep", prompt, good, [0.5, -1.0, 2.0]),  # chosen: "ok" (2.0), reject: "dull" (-1.0)
        row("long_prompt", prompt + [52] * 6, good, [0.1, 0.2, 0.3]),
        row("no_eos", prompt, [good[0], ("cut", [90, 91, 92]), good[2]], [0.1, 0.2, 0.3]),
        row("long_response", prompt, [good[0], ("long", [93] * 8 + [eot]), good[2]], [0.1, 0.2, 0.3]),
        row("identical", prompt, [("same", [94, eot]), ("same", [94, eot]), ("same", [94, eot])], [1.0, 1.0, 1.0]),
        row("tie_keep", prompt, good, [1.0, 1.0, 0.0]),  # ties: first argmax (0), first argmin (2)
    ]


def test_filter_rules_and_layout_token_by_token(tmp_path):
    args = filter_stage.Args(model_name_or_path=str(TINY_LLAMA), maxlen_prompt=8, maxlen=6, dataset="crafted")
    columns = ["response_0", "response_1", "response_2"]
    end_of_turn, stops, pad = filter_stage.special_ids(generate.load_tokenizer(str(TINY_LLAMA)), args)
    assert (end_of_turn, stops, pad) == (4, {1, 4}, 4)  # Llama-3 style: no pad token, so pad with <|eot_id|>
    rows, stats = filter_stage.filter_rows(crafted_rows(), columns, None, end_of_turn, stops, pad, args)
    assert stats == {"input_rows": 6, "prompt_too_long": 1, "no_eos": 1, "response_too_long": 1, "identical": 1,
                     "other_stop_token": 1, "kept": 2}
    keep, tie = rows
    assert (keep["prompt_id"], keep["chosen"], keep["reject"]) == ("keep", "ok", "dull")
    assert (keep["chosen_reward"], keep["reject_reward"]) == (2.0, -1.0)
    assert keep["prompt_input_ids"] == [4, 4, 4, 0, 2, 50, 51, 3]  # left-padded to maxlen_prompt
    assert keep["prompt_attention_mask"] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert keep["chosen_input_ids"] == [80, 4, 4, 4, 4, 4] and keep["chosen_attention_mask"] == [1, 1, 0, 0, 0, 0]
    # "dull" stopped on <|end_of_text|>: it keeps the token it sampled, inside the mask (counted in other_stop_token)
    assert keep["reject_input_ids"] == [70, 1, 4, 4, 4, 4] and keep["reject_attention_mask"] == [1, 1, 0, 0, 0, 0]
    assert (tie["chosen"], tie["reject"]) == ("a fine film", "ok")


def test_end_of_turn_comes_from_the_chat_template_not_the_eos(tmp_path):
    """A Llama-3-Instruct tokenizer whose EOS is <|end_of_text|> (older configs on the hub) while its turns end with
    <|eot_id|>: the sampled <|eot_id|> stays in the layout, and text without ids gets <|eot_id|> appended."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "old-llama3"
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.eos_token = "<|end_of_text|>"
    tokenizer.save_pretrained(model)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(TINY_LLAMA / name, model / name)
    tokenizer = generate.load_tokenizer(str(model))
    assert tokenizer.eos_token_id == 1 and tokenizer.convert_ids_to_tokens(4) == "<|eot_id|>"
    args = filter_stage.Args(model_name_or_path=str(model), maxlen_prompt=8, maxlen=6, dataset="crafted")
    end_of_turn, stops, pad = filter_stage.special_ids(tokenizer, args)
    assert (end_of_turn, stops, pad) == (4, {1, 4}, 4)
    assert generate.stop_token_ids(tokenizer, str(model)) == [1, 4]
    columns = ["response_0", "response_1", "response_2"]
    (keep,), _ = filter_stage.filter_rows(crafted_rows()[:1], columns, tokenizer, end_of_turn, stops, pad, args)
    assert keep["chosen_input_ids"][:2] == [80, 4] and keep["chosen_attention_mask"] == [1, 1, 0, 0, 0, 0]
    assert keep["reject_input_ids"][:2] == [70, 1] and keep["reject_attention_mask"] == [1, 1, 0, 0, 0, 0]
    text_only = {k: v for k, v in crafted_rows()[0].items() if not k.endswith("_token_ids") or k == "prompt_token_ids"}
    (keep,), _ = filter_stage.filter_rows([text_only], columns, tokenizer, end_of_turn, stops, pad, args)
    ids = keep["chosen_input_ids"][:sum(keep["chosen_attention_mask"])]
    assert ids == tokenizer("ok", add_special_tokens=False).input_ids + [4]


def test_filter_can_leave_out_unfinished_responses_instead_of_rows():
    args = filter_stage.Args(model_name_or_path=str(TINY_LLAMA), maxlen_prompt=8, maxlen=6, dataset="crafted",
                             unfinished="drop_response")
    columns = ["response_0", "response_1", "response_2"]
    end_of_turn, stops, pad = filter_stage.special_ids(generate.load_tokenizer(str(TINY_LLAMA)), args)
    rows, stats = filter_stage.filter_rows(crafted_rows(), columns, None, end_of_turn, stops, pad, args)
    assert stats == {"input_rows": 6, "prompt_too_long": 1, "no_eos": 0, "response_too_long": 0, "identical": 1,
                     "other_stop_token": 1, "responses_left_out": 2, "kept": 4}
    by_id = {r["prompt_id"]: r for r in rows}
    # the cut (reward 0.2) and the over-long (0.2) responses are out of the choice: best 0.3, worst 0.1 of the rest
    for pid in ("no_eos", "long_response"):
        assert (by_id[pid]["chosen"], by_id[pid]["reject"], by_id[pid]["reject_reward"]) == ("ok", "a fine film", 0.1)


def write(rows, path):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def test_bad_inputs_fail_before_work_and_leave_nothing(tmp_path, chat_policy, scored):
    out = tmp_path / "out"
    rows = crafted_rows()
    missing_reward = write([{k: v for k, v in r.items() if k != "response_2_reward"} for r in rows], tmp_path / "a")
    with pytest.raises(ValueError, match=r"3 response columns but reward columns"):
        filter_stage.main(filter_stage.Args(dataset=missing_reward, model_name_or_path=str(TINY_LLAMA),
                                            output_dir=str(out)))
    only_no_eos = write([rows[2]], tmp_path / "b")
    with pytest.raises(ValueError, match=r"no rows left after filtering.*'no_eos': 1"):
        filter_stage.main(filter_stage.Args(dataset=only_no_eos, model_name_or_path=str(TINY_LLAMA),
                                            output_dir=str(out)))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\]"):
        score.main(score.Args(reward_model=str(chat_policy), dataset=str(scored), prompt_column="question",
                              output_dir=str(out)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(ValueError, match=r"tiny-gpt2: its tokenizer has no chat template"):
        generate.main(generate.Args(model_name_or_path=str(TINY_GPT2), dataset=str(prompts), split="train",
                                    backend="hf", output_dir=str(out)))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\]"):
        generate.main(generate.Args(model_name_or_path=str(TINY_LLAMA), dataset=str(prompts), split="train",
                                    prompt_column="question", backend="hf", output_dir=str(out)))
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not (tmp_path / "out.tmp").exists()


def test_vllm_asked_for_but_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="--backend vllm: vLLM is not installed"):
        generate.main(generate.Args(model_name_or_path=str(TINY_LLAMA), dataset="x.jsonl", backend="vllm",
                                    output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("stage", ["generate", "score"])
def test_data_stage_killed_part_way_resumes_to_identical_output(stage, tmp_path, capsys, generated, scored,
                                                                 chat_policy, chat_prompts, chat_reward_model):
    """SIGKILL once the first shard is on disk (a crash); the same command again skips the finished shards and
    writes exactly what the uninterrupted run wrote."""
    if stage == "generate":
        script, args, reference = "generate.py", ["--model_name_or_path", chat_policy, "--dataset", chat_prompts,
                                                  *GEN], generated
    else:
        script, args, reference = "score.py", score_args(chat_reward_model, generated), scored
    out = tmp_path / stage
    proc = subprocess.Popen(command(script, [*args, "--output_dir", out]), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / f"{stage}.partial" / "shard_000000"
    while not first.exists():
        assert proc.poll() is None, f"{script} ended before writing a shard"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = [p for p in (tmp_path / f"{stage}.partial").glob("shard_*") if not p.name.endswith(".tmp")]
    total = {"generate": 3, "score": 6}[stage]  # 24 prompts in shards of 10, 24 rows in shards of 4
    assert not out.exists() and 1 <= len(shards) < total, "the kill came too late to leave partial work"
    module = generate if stage == "generate" else score
    run_in_process(module, args, out)  # the same command again (in-process, to save a start-up)
    assert f"{len(shards)} done by an earlier run" in capsys.readouterr().out
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(reference)).to_list()
    assert not (tmp_path / f"{stage}.partial").exists()


class Crash(Exception):
    pass


def crash_after(monkeypatch, module, shards):
    """Make `module` die like a killed run once `shards` shards are on disk (the partial folder stays)."""
    real, written = module.write_shard, []

    def write_then_crash(path, rows):
        if len(written) == shards:
            raise Crash
        real(path, rows)
        written.append(path)

    monkeypatch.setattr(module, "write_shard", write_then_crash)


def test_score_refuses_partial_work_made_from_another_input(tmp_path, monkeypatch, capsys, generated, scored,
                                                            chat_reward_model):
    """Killed part-way, its input regenerated in place with other responses, the same command again: refused, not
    mixed (old rewards for new responses). With the input restored, it resumes, also when --output_dir gains a
    trailing slash, and writes what an uninterrupted run wrote."""
    data, out = tmp_path / "generated", tmp_path / "scored"
    shutil.copytree(generated, data)
    with monkeypatch.context() as m, pytest.raises(Crash):
        crash_after(m, score, 2)
        run_in_process(score, score_args(chat_reward_model, data), out)
    assert len(list((tmp_path / "scored.partial").glob("shard_??????"))) == 2
    other_policy = datasets.load_from_disk(str(data)).map(lambda row: {"response_0": row["response_0"][::-1]})
    other_policy.save_to_disk(str(tmp_path / "regenerated"))
    shutil.rmtree(data)
    os.replace(tmp_path / "regenerated", data)
    with pytest.raises(ValueError, match=rf"the input --dataset {data} changed since the partial work in "
                                         rf"{out}.partial was made \(identity \w+ -> \w+\).*--overwrite"):
        run_in_process(score, score_args(chat_reward_model, data), out)
    assert not out.exists() and len(list((tmp_path / "scored.partial").glob("shard_??????"))) == 2
    shutil.rmtree(data)
    shutil.copytree(generated, data)  # the original input again
    capsys.readouterr()
    run_in_process(score, score_args(chat_reward_model, data), f"{out}/")
    assert "2 done by an earlier run" in capsys.readouterr().out
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(scored)).to_list()


def test_generate_refuses_partial_work_made_by_other_weights(tmp_path, monkeypatch, chat_policy, chat_prompts):
    """The policy's weights replaced in place (the next iteration's policy saved to the same folder) between a crash
    and the rerun: refused, naming --model_name_or_path."""
    from transformers import AutoModelForCausalLM

    policy, out = tmp_path / "policy", tmp_path / "gen"
    shutil.copytree(chat_policy, policy)
    args = ["--model_name_or_path", policy, "--dataset", chat_prompts, *GEN]
    with monkeypatch.context() as m, pytest.raises(Crash):
        crash_after(m, generate, 1)
        run_in_process(generate, args, out)
    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(policy)
    with pytest.raises(ValueError, match=rf"the input --model_name_or_path {policy} changed since the partial work"):
        run_in_process(generate, args, out)
    run_in_process(generate, [*args, "--overwrite"], out)  # redone from scratch with the new weights
    assert len(datasets.load_from_disk(str(out))) == 24 and not (tmp_path / "gen.partial").exists()


def test_generate_drops_empty_prompts_and_counts_them(tmp_path, chat_policy):
    """Blank strings (text format) and chat prompts whose messages are all blank are dropped before generation,
    counted in generate_stats.json; the kept prompts keep their prompt_id (or row index)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tiny = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_GPT2)).save_pretrained(tiny)
    AutoTokenizer.from_pretrained(TINY_GPT2).save_pretrained(tiny)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a fine", "", "dull and", " \t\n", "ok"]))
    chats = tmp_path / "chats.jsonl"
    messages = [[{"role": "user", "content": "write a short review"}], [{"role": "user", "content": "  "}],
                [{"role": "system", "content": ""}, {"role": "user", "content": "\n"}],
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review a film"}]]
    chats.write_text("".join(json.dumps({"prompt_id": f"c{i}", "prompt": m}) + "\n" for i, m in enumerate(messages)))
    short = ["--split", "train", "--backend", "hf", "--num_responses", "1", "--maxlen", "4"]
    run_in_process(generate, ["--model_name_or_path", tiny, "--dataset", texts, "--prompt_format", "text", *short],
                   tmp_path / "text_out")
    run_in_process(generate, ["--model_name_or_path", chat_policy, "--dataset", chats, *short], tmp_path / "chat_out")
    text_out, chat_out = (datasets.load_from_disk(str(tmp_path / d)) for d in ("text_out", "chat_out"))
    assert text_out["prompt"] == ["a fine", "dull and", "ok"] and text_out["prompt_id"] == [0, 2, 4]
    assert chat_out["prompt_id"] == ["c0", "c3"]
    stats = json.loads((tmp_path / "text_out" / "generate_stats.json").read_text())
    assert stats == {"input_rows": 5, "empty_prompt": 2, "kept": 3}
    assert json.loads((tmp_path / "chat_out" / "generate_stats.json").read_text())["empty_prompt"] == 2


def test_score_stops_on_a_non_finite_reward_naming_the_row(tmp_path, monkeypatch, generated, chat_reward_model):
    real, poisoned_once = score.reward_batch, []

    def poisoned(model, sequences, pad_id, device):  # the first full batch of 8 returns a NaN
        rewards = real(model, sequences, pad_id, device)
        if len(sequences) == 8 and not poisoned_once:
            poisoned_once.append(1)
            rewards[0] = math.nan
        return rewards

    monkeypatch.setattr(score, "reward_batch", poisoned)
    with pytest.raises(ValueError, match=r"non-finite reward nan for row \d+ \(prompt_id id\d{3}\) response_\d"):
        run_in_process(score, score_args(chat_reward_model, generated), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reward_is_read_from_score_or_logits():
    class Output:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Fake(torch.nn.Module):
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, input_ids, attention_mask):
            return self.output(input_ids)

    armo_like = Fake(lambda ids: Output(score=torch.full((len(ids), 1), 2.0), logits=torch.zeros(len(ids), 19)))
    plain = Fake(lambda ids: Output(logits=torch.full((len(ids), 1), -1.0)))
    assert score.reward_batch(armo_like, [[1, 2], [3]], 0, "cpu") == [2.0, 2.0]  # ArmoRM's output carries .score
    assert score.reward_batch(plain, [[1, 2], [3]], 0, "cpu") == [-1.0, -1.0]


def test_a_reward_model_that_mishandles_padding_is_refused():
    class CountsPadding(torch.nn.Module):  # a pooling bug: the reward depends on how much padding follows
        def forward(self, input_ids, attention_mask):
            return type("Output", (), {"logits": attention_mask.sum(1, keepdim=True).float() + input_ids.shape[1]})

    model = CountsPadding()
    model.name_or_path = "counts-padding"
    model.dummy = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(SystemExit, match="counts-padding: rewards change with right padding"):
        score.check_padding(model, [[5, 6, 7], [5], [8, 9], [4, 4, 4, 4, 4]], 0, "cpu")


def test_vllm_seeds_give_no_two_prompts_the_same_sample_noise():
    """vLLM seeds sample j of a request with seed + j (vllm/v1/engine/parallel_sampling.py). generate.py's per-prompt
    seeds are spread n apart, so the n samples of all prompts get distinct seeds, whatever the seed; consecutive
    per-prompt seeds (the old `seed * 1000003 + index`) gave prompt i's sample j the seed of prompt i + j's sample 0."""
    for seed, n in ((1, 4), (7, 1), (3, 16)):
        seeds = [generate.request_seed(seed, index, n) + j for index in range(300) for j in range(n)]
        assert len(set(seeds)) == len(seeds)
        assert generate.request_seed(seed, 5, n) != generate.request_seed(seed + 1, 5, n)
    old = [1 * 1_000_003 + index + j for index in range(300) for j in range(4)]
    assert len(set(old)) == 303  # the collision this replaces


def test_stop_tokens_fall_back_to_the_model_config_like_vllm(tmp_path):
    """Without a generation_config.json, vLLM reads the eos ids of config.json: so does stop_token_ids, and filter.py
    counts a response that ended on any of them as finished (its stop set is generate.py's)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    config.eos_token_id = [4, 5]
    config.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    assert generate.stop_token_ids(tokenizer, str(tmp_path)) == [4, 5]
    args = filter_stage.Args(model_name_or_path=str(tmp_path), dataset="crafted")
    assert filter_stage.special_ids(tokenizer, args)[1] == {4, 5}
