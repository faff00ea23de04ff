"""--task.reward_with_eos (ppo.py, rloo.py, grpo.py, rebel_online.py, tools/eval_policy.py) and score.py's
--reward_with_eos: the reward model reads the response's EOS, as summarize_from_feedback_details' (sfd) and REBEL's
TL;DR reward models were trained and are read. Exact token lists of reward_inputs with and without it; a converted
sfd reward model read through ppo.py's Rewards and through score.py equal to sfd's own forward on query + response +
EOS, and not equal without the flag; the settings it cannot work with refused before any weights load. Seconds."""

import json
import sys

import datasets
import pytest
import torch
from conftest import ROOT, TINY_GPT2, TINY_LLAMA
from test_convert_sfd_reward import QUERIES, RESPONSES, convert, make_scalar_model, sfd_get_reward
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import grpo
import ppo
import rebel_online
import rloo
import score

sys.path.insert(0, str(ROOT / "tools"))
import eval_policy  # noqa: E402

CPU = torch.device("cpu")


def rollout(tokenizer, texts, ends, pad_id, stop_ids=None):
    """Responses as the online scripts hold them after sampling: token rows of one width, each cut after its first
    stop token (ends[i]: the stop token response i ends with, or None for one that fills the width without one)."""
    tokens = [tokenizer(t).input_ids for t in texts]
    width = max(len(t) + (e is not None) for t, e in zip(tokens, ends))
    rows = [t + [e] + [pad_id] * (width - len(t) - 1) if e is not None else t + [pad_id] * (width - len(t))
            for t, e in zip(tokens, ends)]
    # a row without a stop token fills the width, as a truncated one does
    assert all(e is not None or len(t) == width for t, e in zip(tokens, ends)), "the unfinished one must be longest"
    stop_ids = stop_ids or sorted({e for e in ends if e is not None})
    responses, mask, _, has_eos = ppo.truncate_after_eos(torch.tensor(rows), stop_ids, pad_id)
    return tokens, responses, mask, has_eos


def test_reward_inputs_with_and_without_the_flag():
    policy_tok, rm_tok = AutoTokenizer.from_pretrained(TINY_GPT2), AutoTokenizer.from_pretrained(TINY_LLAMA)
    eos, other_stop = policy_tok.eos_token_id, policy_tok(" .").input_ids[0]  # a second stop token (end of turn)
    prompts = ["the film is", "a story of", "it was"]
    prompt_ids = [policy_tok(p).input_ids for p in prompts]
    texts = [" a delight", " two brothers who never meet again", " fine"]
    tokens, responses, mask, has_eos = rollout(policy_tok, texts, [eos, None, other_stop], eos, [eos, other_stop])
    assert has_eos.tolist() == [True, False, True]

    def inputs(rm, same, with_eos, chat=False, prompt_list=prompts):
        return ppo.reward_inputs(prompt_list, prompt_ids, responses, mask, has_eos, policy_tok, rm, same, chat,
                                 with_eos)

    # the same tokenizer: token ids pass as they are; the stop token is dropped, or replaced by the EOS with the flag
    assert inputs(policy_tok, True, False) == [p + t for p, t in zip(prompt_ids, tokens)]
    assert inputs(policy_tok, True, True) == [prompt_ids[0] + tokens[0] + [eos], prompt_ids[1] + tokens[1],
                                              prompt_ids[2] + tokens[2] + [eos]]
    # another tokenizer: the text re-tokenized, the reward tokenizer's own EOS appended with the flag
    retokenized = [rm_tok(p + t).input_ids for p, t in zip(prompts, texts)]
    assert rm_tok.eos_token_id not in (eos, None) and retokenized[0][0] == rm_tok.bos_token_id
    assert inputs(rm_tok, False, False) == retokenized
    assert inputs(rm_tok, False, True) == [retokenized[0] + [rm_tok.eos_token_id], retokenized[1],
                                           retokenized[2] + [rm_tok.eos_token_id]]
    # the default is off: the existing call (no with_eos) is unchanged
    assert ppo.reward_inputs(prompts, prompt_ids, responses, mask, has_eos, policy_tok, policy_tok, True, False) \
        == inputs(policy_tok, True, False)
    # chat prompts (refused with the flag in main): the chat template's turn end, with or without it
    messages = [[{"role": "user", "content": p}] for p in prompts]
    assert inputs(rm_tok, False, True, chat=True, prompt_list=messages) == \
        inputs(rm_tok, False, False, chat=True, prompt_list=messages)


def sfd_rows(tokenizer, pad_id, ended):
    """sfd's layout (queries left-padded with [PAD] to one width, responses right-padded, with EOS where ended[i]) for
    QUERIES[i % 2] + RESPONSES[i]; returns the rows and the query width."""
    queries = [tokenizer(q).input_ids for q in QUERIES]
    width = max(map(len, queries))
    rows = []
    for i, response in enumerate(RESPONSES):
        query = queries[i % len(queries)]
        tokens = tokenizer(response).input_ids + [tokenizer.eos_token_id] * ended[i]
        rows.append([pad_id] * (width - len(query)) + query + tokens + [pad_id] * (40 - len(tokens)))
    return torch.tensor(rows), width


@pytest.fixture(scope="module")
def sfd_converted(tmp_path_factory):
    """A tiny sfd ScalarModel folder converted by tools/convert_sfd_reward.py; (folder, backbone, head, tokenizer,
    model loaded as the online scripts load a reward model)."""
    tmp_path = tmp_path_factory.mktemp("sfd")
    backbone, head = make_scalar_model(tmp_path / "sfd")
    convert(tmp_path, tmp_path / "sfd", output="converted")
    out = tmp_path / "converted"
    tokenizer = ppo.load_tokenizer(str(out), "--reward_model_name_or_path", needs_eos=False)
    model = ppo.load_pretrained(AutoModelForSequenceClassification, str(out), "--reward_model_name_or_path",
                                ppo.Args())
    model.config.pad_token_id = tokenizer.pad_token_id
    return out, backbone, head, tokenizer, ppo.freeze(model)


@pytest.mark.parametrize("policy_tokenizer", ["same", "other"])
def test_online_rewards_of_an_sfd_model_equal_sfd_at_the_eos(sfd_converted, policy_tokenizer):
    """ppo.py's Rewards (shared by the online scripts) with the flag: sfd's reward of query + response + EOS, to 1e-5;
    a response without EOS (the longest, filling the width) is read at its last token, as sfd reads it. Without the
    flag every response with EOS is read one token early: a different reward."""
    out, backbone, head, rm_tok, model = sfd_converted
    pad, eos = rm_tok.pad_token_id, rm_tok.eos_token_id
    # the same tokenizer (sfd's SFT policy's: Pythia with [PAD]), or one without [PAD]: re-tokenized text
    policy_tok = rm_tok if policy_tokenizer == "same" else AutoTokenizer.from_pretrained(TINY_GPT2)
    assert ppo.tokenizers_match(policy_tok, rm_tok) == (policy_tokenizer == "same")
    ended = [True, False, True, True]
    _, responses, mask, has_eos = rollout(policy_tok, RESPONSES, [eos if e else None for e in ended],
                                          policy_tok.pad_token_id if policy_tokenizer == "same" else eos)
    prompts = [QUERIES[i % 2] for i in range(4)]
    prompt_ids = [policy_tok(p).input_ids for p in prompts]
    rows, width = sfd_rows(rm_tok, pad, ended)
    reference = sfd_get_reward(backbone, head, rows, pad, width)

    def rewards(with_eos):
        args = ppo.Args(reward_model_name_or_path=str(out), task=ppo.TaskArgs(reward_with_eos=with_eos))
        return ppo.Rewards(args, model, None, policy_tok, rm_tok, CPU)(list(range(4)), prompts, prompt_ids, {},
                                                                        responses, mask, has_eos)

    torch.testing.assert_close(rewards(True), reference, atol=1e-5, rtol=0)
    off = rewards(False)
    assert off[1] == rewards(True)[1]  # no EOS: as before
    assert (off[[0, 2, 3]] - reference[[0, 2, 3]]).abs().min() > 1e-3, (off, reference)


def test_score_py_with_the_flag_equals_sfd_at_the_eos(sfd_converted, tmp_path):
    """score.py as a user runs it (in-process), on generate.py-shaped text: with --reward_with_eos its rewards equal
    sfd's of query + response + EOS, to 1e-5 (every response gets the EOS: the text cannot say whether it ended);
    without it they differ."""
    out, backbone, head, rm_tok, _ = sfd_converted
    pad = rm_tok.pad_token_id
    rows, width = sfd_rows(rm_tok, pad, [True] * 4)
    reference = sfd_get_reward(backbone, head, rows, pad, width).tolist()
    data = tmp_path / "generated.jsonl"
    data.write_text("".join(json.dumps({"prompt": QUERIES[k], "response_0": RESPONSES[k], "response_1":
                                        RESPONSES[k + 2]}) + "\n" for k in range(2)))
    expected = [[reference[0], reference[2]], [reference[1], reference[3]]]
    found = {}
    for flag in (True, False):
        output = tmp_path / f"scored_{flag}"
        score.main(score.Args(reward_model=str(out), dataset=str(data), prompt_format="text", reward_with_eos=flag,
                              output_dir=str(output), local_micro_batch_size=4, progress=False))
        scored = datasets.load_from_disk(str(output))
        found[flag] = [[row["response_0_reward"], row["response_1_reward"]] for row in scored]
        assert json.loads((output / "args.json").read_text())["reward_with_eos"] is flag
    torch.testing.assert_close(torch.tensor(found[True]), torch.tensor(expected), atol=1e-5, rtol=0)
    assert (torch.tensor(found[False]) - torch.tensor(expected)).abs().min() > 1e-3


@pytest.mark.parametrize("module", [ppo, rloo, grpo, rebel_online], ids=lambda m: m.__name__)
def test_online_scripts_refuse_what_the_flag_cannot_work_with(module, tmp_path):
    """Before any weights load (tiny-gpt2 has none: a load would fail otherwise): a reward tokenizer that pads with
    its EOS (tiny-gpt2 has no pad token, so it pads with EOS), chat prompts, a reward function."""
    def run_main(**task):
        args = module.Args(model_name_or_path=str(TINY_GPT2), reward_model_name_or_path=str(TINY_GPT2),
                           output_dir=str(tmp_path / "out"), task=module.TaskArgs(reward_with_eos=True, **task))
        module.main(args)

    with pytest.raises(SystemExit, match=r"--task.reward_with_eos: the tokenizer of --reward_model_name_or_path "
                                         r".*tiny-gpt2 pads with its EOS '<\|endoftext\|>' \(id 0;"):
        run_main()
    with pytest.raises(SystemExit, match="--task.reward_with_eos is for text prompts"):
        args = module.Args(model_name_or_path=str(TINY_LLAMA), reward_model_name_or_path=str(TINY_LLAMA),
                           output_dir=str(tmp_path / "out"),
                           task=module.TaskArgs(reward_with_eos=True, prompt_format="chat"))
        module.main(args)
    assert not (tmp_path / "out").exists()


def test_reward_function_and_eval_policy(tmp_path):
    """ppo.py refuses the flag with --reward_fn; tools/eval_policy.py passes it on and refuses the same reward model,
    naming its own arguments."""
    reward_fn = tmp_path / "fn.py"
    reward_fn.write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    with pytest.raises(SystemExit, match="--task.reward_with_eos gives a reward model the response's EOS; --reward_fn"):
        ppo.main(ppo.Args(model_name_or_path=str(TINY_GPT2), reward_fn=f"{reward_fn}:f",
                          output_dir=str(tmp_path / "out"), task=ppo.TaskArgs(reward_with_eos=True)))
    with pytest.raises(SystemExit, match="--reward_with_eos: the tokenizer of --reward_model .*tiny-gpt2 pads with"):
        eval_policy.main(eval_policy.Args(policies=(), episodes=(), reference=str(TINY_GPT2),
                                          reward_model=str(TINY_GPT2), output_dir=str(tmp_path / "eval"),
                                          reward_with_eos=True))
    assert not (tmp_path / "eval").exists()


def test_score_py_refuses_a_pad_token_equal_to_the_eos(sfd_converted, tmp_path):
    """score.py keeps a reward model's own config.pad_token_id (it sets the tokenizer's only where the config has
    none): either one equal to the EOS is refused before the weights load, naming which; so are chat prompts."""
    out = sfd_converted[0]
    data = tmp_path / "generated.jsonl"
    data.write_text(json.dumps({"prompt": QUERIES[0], "response_0": RESPONSES[0]}) + "\n")

    def run_score(model, **kwargs):
        score.main(score.Args(reward_model=str(model), dataset=str(data), reward_with_eos=True,
                              output_dir=str(tmp_path / "scored"), **{"prompt_format": "text", **kwargs}))

    with pytest.raises(SystemExit, match="tiny-gpt2: its tokenizer has no pad token of its own .* skip the EOS"):
        run_score(TINY_GPT2)  # no weights there: refused before a load would fail
    eos_padded = tmp_path / "eos_padded"
    eos_padded.mkdir()
    for file in out.iterdir():
        (eos_padded / file.name).write_bytes(file.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (eos_padded / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    with pytest.raises(SystemExit, match=r"its config.pad_token_id is 0, the EOS '<\|endoftext\|>' \(id 0\)"):
        run_score(eos_padded)
    with pytest.raises(SystemExit, match="--reward_with_eos is for --prompt_format text"):
        run_score(out, prompt_format="chat")
    assert not (tmp_path / "scored").exists()
