"""sft.py: the loss mask and loss against a slow reference (text pairs and chat, right-padded as the script pads), no
gradient through prompt tokens, end-to-end runs on text pairs and on chat messages that learn and save a loadable
model, resume equal to an uninterrupted run, 2 ranks (DDP and FSDP2) equal to 1, and bad input refused before any
model is loaded. Data: a small TL;DR-shaped corpus written here (summary = the post's first three words)."""

import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import (
    TINY_GPT2,
    TINY_LLAMA,
    assert_weights_equal,
    check_resume_from_checkpoint,
    metrics,
    run,
    run_in_process,
)

import sft

WORDS = "cat dog sun rain tree car book film song road".split()


def rows(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        post = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 8)))
        summary = " ".join(post.split()[:3])
        out.append({"prompt": f"POST: {post}\nTL;DR:", "completion": " " + summary,
                    "messages": [{"role": "user", "content": post}, {"role": "assistant", "content": summary}]})
    return out


def write_split(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tldr_like")
    write_split(folder, "train", rows(192, seed=0))
    write_split(folder, "validation", rows(32, seed=1))
    return folder


def short_args(model, data, *extra):
    return ["--model_name_or_path", model, "--from_scratch", "--disable_dropout", "--task.dataset", data,
            "--lr", "3e-3", "--warmup_ratio", "0.1", "--weight_decay", "0", "--batch_size", "16",
            "--local_micro_batch_size", "8", "--total_episodes", "192", "--eval_freq", "6", "--num_samples", "4",
            "--task.maxlen_prompt", "64", "--task.maxlen", "16", "--save_freq", "4", "--keep_checkpoints", "10",
            "--no_progress", *extra]


def text_args(corpus, *extra):
    return short_args(TINY_GPT2, corpus, *extra)


def chat_args(corpus, *extra):
    return short_args(TINY_LLAMA, corpus, "--task.messages_column", "messages", *extra)


@pytest.fixture(scope="module")
def text_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_text") / "run"
    run_in_process(sft, text_args(corpus), out)
    return out


@pytest.fixture(scope="module")
def chat_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_chat") / "run"
    run_in_process(sft, chat_args(corpus), out)
    return out


def examples_of(data, tokenizer, **task):
    args = SimpleNamespace(task=SimpleNamespace(**{**vars(sft.TaskArgs()), "maxlen_prompt": 256, "maxlen": 256,
                                                   **task}))
    return sft.build_examples(datasets.Dataset.from_list(data), tokenizer, args, "test data")


def slow_token_nll(model, ids):
    """-log p(token t | tokens < t) for t = 1..len-1, one unpadded sequence at a time, in float64."""
    logits = model(torch.tensor([ids])).logits[0].double()
    return [-(logits[t].log_softmax(-1)[ids[t + 1]]).item() for t in range(len(ids) - 1)]


def char_spans(tokenizer, ids):
    """(start, end) of each token in the decoded text, from cumulative decoding (slow, independent of offsets)."""
    ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends))


def reference_mask(row, tokenizer, ids, chat):
    """(loss mask over the response tokens, prompt length), found from the text alone: text pairs, every token after
    the prompt's; chat, every token whose text lies inside an assistant message's content plus the end-of-turn token
    that follows it, the prompt being the tokens before the first of them."""
    if not chat:
        prompt_len = len(tokenizer(row["prompt"]).input_ids)
        return [0] * prompt_len + [1] * (len(ids) - prompt_len), prompt_len
    last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(row["messages"][:last + 1], tokenize=False)  # the conversation
    spans, start = [], 0
    for m in row["messages"][:last + 1]:
        start = text.index(m["content"], start)
        if m["role"] == "assistant":
            spans.append((start, start + len(m["content"]) + len("<|eot_id|>")))
            assert text[spans[-1][1] - len("<|eot_id|>"):spans[-1][1]] == "<|eot_id|>"
        start += len(m["content"])
    mask = [int(any(a <= s and e <= b for a, b in spans)) for s, e in char_spans(tokenizer, ids)]
    return mask, mask.index(1)


MULTI_TURN = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                            {"role": "assistant", "content": "ok then, cat dog"}]},
              {"messages": [{"role": "user", "content": "sun rain"}, {"role": "assistant", "content": "tree"}]},
              {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c d e f g"},
                            {"role": "user", "content": "unanswered"}]}]


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
@pytest.mark.parametrize("loss_on_prompt", [False, True], ids=["response", "loss_on_prompt"])
def test_loss_mask_and_loss_match_a_slow_reference(chat, loss_on_prompt):
    """The loss mask covers exactly the response tokens (EOS / end-of-turn included; every assistant turn of a
    multi-turn chat), and the right-padded batch's per-token loss summed over it equals a per-sequence slow sum."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = TINY_LLAMA if chat else TINY_GPT2
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = MULTI_TURN if chat else [{"prompt": "POST: a b\nTL;DR:", "completion": " a b"},
                                    {"prompt": "x", "completion": " y z w v u t"},
                                    {"prompt": "POST: q\nTL;DR:", "completion": " ends with eos<|endoftext|>"}]
    task = {"messages_column": "messages"} if chat else {}
    examples = examples_of(data, tokenizer, loss_on_prompt=loss_on_prompt, **task)
    eos = sft.end_of_turn_id(tokenizer)
    assert eos == tokenizer.convert_tokens_to_ids("<|eot_id|>" if chat else "<|endoftext|>")
    expected_masks = []
    for row, (ids, mask, prompt_len, end) in zip(data, examples):
        ids = ids.tolist()
        assert ids[-1] == eos
        if not chat:  # the prompt's tokens, the response's, and one EOS (none added to a response ending with it)
            response = tokenizer(row["completion"], add_special_tokens=False).input_ids
            assert ids == tokenizer(row["prompt"]).input_ids + response + ([] if response[-1] == eos else [eos])
        expected, expected_prompt_len = reference_mask(row, tokenizer, ids, chat)
        assert mask.tolist() == ([1] * len(ids) if loss_on_prompt else expected)
        assert prompt_len == expected_prompt_len and expected[prompt_len:end] == [1] * (end - prompt_len)
        assert ids[end - 1] == eos and (end == len(ids) or expected[end] == 0)  # the first response, whole
        expected_masks.append(mask.tolist())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
    input_ids, attention_mask, loss_mask = sft.collate(examples, pad_id=eos)  # pad == EOS, as the script pads here
    assert input_ids.shape[1] == max(len(x[0]) for x in examples) and (attention_mask.sum(1) == torch.tensor(
        [len(x[0]) for x in examples])).all()
    with torch.no_grad():
        nll, mask = sft.token_nll(model, input_ids, attention_mask, loss_mask)
    for row, (ids, *_) in enumerate(examples):
        slow = slow_token_nll(model, ids.tolist())
        targets = expected_masks[row][1:]
        assert mask[row].tolist() == targets + [0] * (mask.shape[1] - len(targets))  # padding never in the loss
        assert nll[row].sum().item() == pytest.approx(sum(v for v, t in zip(slow, targets) if t), rel=1e-5)
        assert nll[row, :len(targets)].tolist() == pytest.approx([v if t else 0 for v, t in zip(slow, targets)],
                                                                 abs=1e-4)


def test_prompt_tokens_get_no_gradient():
    """Only the logits that predict response tokens receive a gradient: none at positions predicting prompt tokens or
    padding; with --task.loss_on_prompt, every position predicting a real token does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_GPT2)
    data = [{"prompt": "POST: a b c\nTL;DR:", "completion": " a b"}, {"prompt": "x", "completion": " y z w v u t"}]
    for loss_on_prompt in (False, True):
        examples = examples_of(data, tokenizer, loss_on_prompt=loss_on_prompt)
        input_ids, attention_mask, loss_mask = sft.collate(examples, pad_id=tokenizer.eos_token_id)
        logits = torch.randn(*input_ids.shape, len(tokenizer), requires_grad=True)
        fake = lambda input_ids, attention_mask, out=logits: SimpleNamespace(logits=out)  # noqa: E731
        nll, _ = sft.token_nll(fake, input_ids, attention_mask, loss_mask)
        nll.sum().backward()
        touched = (logits.grad.abs().sum(-1) > 0).int()
        for row, (ids, _, prompt_len, _) in enumerate(examples):
            first = 0 if loss_on_prompt else prompt_len - 1  # position t predicts token t + 1
            expected = [int(first <= t < len(ids) - 1) for t in range(input_ids.shape[1])]
            assert touched[row].tolist() == expected


def check_run(out, chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evals = [m for m in metrics(out) if "val/loss" in m]
    assert [m["update"] for m in evals] == [0, 6, 12]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 2.0, evals  # from near log(1024) = 6.9
    assert evals[-1]["val/perplexity"] < evals[0]["val/perplexity"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) and (tokenizer.chat_template is not None) == chat
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["update"] for s in samples] == [u for u in (0, 6, 12) for _ in range(4)]
    end = "<|eot_id|>" if chat else "<|endoftext|>"
    assert all(s["reference"].endswith(end) for s in samples)
    assert all(s["prompt"].endswith("<|end_header_id|>\n\n" if chat else "TL;DR:") for s in samples)
    return evals


def test_text_pairs_run_learns_and_saves_a_loadable_model(text_run):
    check_run(text_run, chat=False)


def test_chat_run_learns_and_saves_a_loadable_model(chat_run):
    check_run(chat_run, chat=True)


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_exact(text_run, corpus, tmp_path):
    check_resume_from_checkpoint(sft, text_args(corpus), text_run, tmp_path / "resumed", update=4)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_ddp_and_with_fsdp2(chat_run, corpus, tmp_path):
    """torchrun with 2 processes (DDP, then FSDP2) ends with the one-process run's weights and curves, and samples
    the same responses (seeded per prompt; the models agree to float rounding)."""
    for extra in ([], ["--fsdp"]):
        out = tmp_path / ("fsdp" if extra else "ddp")
        run("sft.py", *chat_args(corpus, *extra), "--output_dir", out, nproc=2)
        assert_weights_equal(chat_run, out, exact=False)
        one, two = metrics(chat_run), metrics(out)
        for key in ("loss/sft_avg", "val/loss"):
            assert [m[key] for m in two if key in m] == pytest.approx([m[key] for m in one if key in m], rel=1e-4)
        assert (out / "samples.jsonl").read_text() == (chat_run / "samples.jsonl").read_text()


@pytest.mark.parametrize("case", ["missing_column", "empty_response", "no_assistant_turn", "no_chat_template",
                                  "not_messages"])
def test_bad_input_fails_before_any_model_is_loaded(case, tmp_path, no_model_loading):
    data = rows(8, seed=2)
    model, extra = TINY_GPT2, []
    if case == "missing_column":
        data = [{"prompt": r["prompt"], "summary": r["completion"]} for r in data]
        message = r"--task.dataset .*train.jsonl split train: missing column\(s\) \['completion'\]"
    elif case == "empty_response":
        data[5]["completion"] = "  "
        message = r"--task.dataset .*train.jsonl split train, row 5, column completion: expected non-empty text"
    elif case == "no_assistant_turn":
        data[3]["messages"] = data[3]["messages"][:1]
        model, extra = TINY_LLAMA, ["--task.messages_column", "messages"]
        message = r"split train, row 3, column messages: the conversation has no assistant turn"
    elif case == "not_messages":
        data = [{**r, "messages": r["prompt"]} for r in data]
        model, extra = TINY_LLAMA, ["--task.messages_column", "messages"]
        message = r"split train, row 0, column messages: expected chat messages"
    else:
        extra = ["--task.messages_column", "messages"]
        message = r"--task.messages_column messages: the tokenizer of --model_name_or_path .*tiny-gpt2 has no chat"
    write_split(tmp_path, "train", data)
    out = tmp_path / "out"
    with pytest.raises((ValueError, SystemExit), match=message):
        run_in_process(sft, ["--model_name_or_path", model, "--task.dataset", tmp_path / "train.jsonl",
                             "--task.eval_split", "None", "--batch_size", "4", "--local_micro_batch_size", "4",
                             *extra], out)
    assert not out.exists()
