"""reward.py: the K-wise Bradley-Terry loss against explicit pairs, the reward read at the last real token, tiny
end-to-end runs on text pairs, chat pairs and rankings that learn, a saved folder that score.py reads unchanged, the
normalisation shift, 2 ranks == 1 rank, exact resume, and bad comparison data refused before any model loads."""

import itertools
import json
import random

import pytest
import torch
from conftest import (
    SST2,
    TINY_GPT2,
    TINY_LLAMA,
    assert_weights_equal,
    chat_prompt,
    check_resume_from_checkpoint,
    metrics,
    run_in_process,
    run_into,
)

import reward
import score

COMMON = ["--lr", "1e-3", "--warmup_ratio", "0.1", "--batch_size", "16", "--local_micro_batch_size", "8",
          "--save_freq", "4", "--keep_checkpoints", "100", "--no_progress"]


def sentences(split):
    """SST-2 sentences of the offline corpus: (positives, negatives)."""
    with open(SST2 / f"{split}.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["sentence"] for r in rows if r["label"] == 1], [r["sentence"] for r in rows if r["label"] == 0]


def text_pairs(split, n):
    positive, negative = sentences(split)
    return [{"prompt": "Review: ", "chosen": p, "rejected": q} for p, q in zip(positive[:n], negative[:n])]


def chat_pairs(split, n):
    """TRL's conversational form: chosen and rejected are whole conversations; the prompt column is their first
    message."""
    positive, negative = sentences(split)
    rows = []
    for i, (p, q) in enumerate(zip(positive[:n], negative[:n])):
        prompt = [{"role": "user", "content": chat_prompt(i)}]
        rows.append({"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": p}],
                     "rejected": prompt + [{"role": "assistant", "content": q}]})
    return rows


def rankings(split, n, seed=0):
    """K = 2, 3, 4 in turn. Each of a row's K responses joins K - 1 sentences; the k-th best has K - 1 - k positive
    ones (of at most 8 words: short sequences), so the ranking is strict and a sentiment reward orders it."""
    positive, negative = ([s for s in group if len(s.split()) <= 8] for group in sentences(split))
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        responses = []
        for rank in range(k):
            parts = rng.sample(positive, k - 1 - rank) + rng.sample(negative, rank)
            rng.shuffle(parts)
            responses.append(" ".join(parts))
        rows.append({"prompt": f"Reviews of film {i}: ", "ranked": responses})
    return rows


def write_jsonl(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


KINDS = {  # data, model, extra arguments, train rows
    "text": (text_pairs, TINY_GPT2, []),
    "chat": (chat_pairs, TINY_LLAMA, []),
    "ranked": (rankings, TINY_GPT2, ["--task.dataset_format", "ranked", "--center_coef", "0.01"]),
}


def make_data(kind, folder, train=640, valid=256):
    make = KINDS[kind][0]
    write_jsonl(make("train", train), folder / "train.jsonl")
    write_jsonl(make("validation", valid), folder / "validation.jsonl")
    return folder


def kind_args(kind, folder):
    return ["--model_name_or_path", KINDS[kind][1], "--from_scratch", "--task.dataset", folder, *KINDS[kind][2],
            *COMMON]


def normalize_rows(n=48):
    """generate.py's layout: a prompt and response_0, response_1 per row (here held-out SST-2 sentences)."""
    positive, negative = sentences("validation")
    return [{"prompt": "Review: ", "response_0": p, "response_1": q} for p, q in zip(positive[-n:], negative[-n:])]


def run_args(kind, session_dir):
    """A run's arguments: its data (written once) and, for text data, the normalisation to generate.py-style
    samples."""
    data = session_dir / f"rm_{kind}_data"
    if not data.exists():
        make_data(kind, data)
    normalize = session_dir / "rm_norm" / "n.jsonl"
    if not normalize.exists():
        write_jsonl(normalize_rows(), normalize)
    return [*kind_args(kind, data), *(["--normalize_dataset", normalize] if kind != "chat" else [])]


@pytest.fixture(scope="session")
def rm_runs(session_dir):
    """One short run per kind of data (40 updates of 16 rows); the text and ranked runs also normalise their
    rewards. Returns (data folder, run folder)."""
    runs = {}

    def get(kind):
        if kind not in runs:
            run_in_process(reward, run_args(kind, session_dir), session_dir / f"rm_{kind}")
            runs[kind] = (session_dir / f"rm_{kind}_data", session_dir / f"rm_{kind}")
        return runs[kind]

    return get


def tiny_model(path):
    """reward.py's model and tokenizer (pad id as the script sets it), random weights."""
    args = reward.Args(model_name_or_path=str(path), from_scratch=True)
    tokenizer = reward.load_tokenizer(args.model_name_or_path, needs_eos=False)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    model, target, wrapped, _ = reward.build_model(args, tokenizer, torch.device("cpu"), False)
    return model.eval(), wrapped.eval(), tokenizer


def slow_losses(r, sizes, center_coef):
    """Every row's loss from its explicit pairs, enumerated one by one."""
    losses, start = [], 0
    for k in sizes:
        terms = [-torch.log(1 / (1 + torch.exp(-(r[start + i] - r[start + j]))))
                 + center_coef * (r[start + i] + r[start + j]) ** 2 for i, j in itertools.combinations(range(k), 2)]
        losses.append(sum(terms) / len(terms))
        start += k
    return torch.stack(losses)


@pytest.mark.parametrize("center_coef", [0.0, 0.1])
def test_kwise_loss_matches_explicit_pairs(center_coef):
    sizes = [2, 4, 3, 2, 4]
    r = torch.randn(sum(sizes), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    losses, margin = reward.comparison_losses(r, sizes, center_coef)
    torch.testing.assert_close(losses, slow_losses(r, sizes, center_coef))
    assert len(margin) == 1 + 6 + 3 + 1 + 6  # every pair of every row


def test_kwise_loss_of_a_padded_batch_matches_sequences_scored_alone():
    """K = 2, 3 and 4 in one right-padded micro-batch (sequences of 1 to 9 tokens) give the losses of the explicit
    pairs of rewards computed one sequence at a time, with no padding."""
    _, wrapped, tokenizer = tiny_model(TINY_GPT2)
    g = torch.Generator().manual_seed(0)
    sizes = [3, 2, 4]
    sequences = [torch.randint(5, 1000, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(sum(sizes))]
    with torch.no_grad():
        batched = reward.rewards(wrapped, sequences, tokenizer.pad_token_id, "cpu")
        alone = torch.cat([reward.rewards(wrapped, [x], tokenizer.pad_token_id, "cpu") for x in sequences])
        losses, _ = reward.comparison_losses(batched, sizes, 0.05)
    assert len({len(x) for x in sequences}) > 3
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses, slow_losses(alone.double(), sizes, 0.05).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_reward_is_read_at_the_last_real_token(kind, tmp_path):
    """As the script pads (right, with the pad id the saved config names), the reward of a sequence is the one it has
    alone, and left padding (with positions counted from the first real token) gives it too: the pooling reads the last
    real token. For the Llama-3 chat template the
    pad id is <|eot_id|>, which ends every rendered conversation: the pooling then reads the token before it, the
    same token whatever the padding."""
    model, wrapped, tokenizer = tiny_model(TINY_GPT2 if kind == "text" else TINY_LLAMA)
    rows = (text_pairs if kind == "text" else chat_pairs)("validation", 4)
    data, _, _ = reward.load_comparisons(str(write_jsonl(rows, tmp_path / "d.jsonl")), "train", reward.Args(),
                                         tokenizer, "--task.dataset")
    sequences = [x for i in range(len(data)) for x in data.row(i)]
    pad = tokenizer.pad_token_id
    assert len({len(x) for x in sequences}) > 1
    with torch.no_grad():
        right = reward.rewards(wrapped, sequences, pad, "cpu")
        alone = torch.cat([reward.rewards(wrapped, [x], pad, "cpu") for x in sequences])
        width = max(map(len, sequences))
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in sequences])
        left = model(input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in sequences]), attention_mask=mask,
                     position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, 0]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["text", "chat", "ranked"])
def test_held_out_pairwise_accuracy_rises(kind, rm_runs):
    """Measured over seeds 1-3 at these settings (40 updates of 16 rows): held-out pairwise accuracy from 0.45-0.52
    at update 0 to 0.72-0.81 (text), 0.79-0.84 (chat), 0.80-0.83 (rankings: every pair of K = 2, 3, 4 counted)."""
    evals = [m for m in metrics(rm_runs(kind)[1]) if "val/accuracy" in m]
    assert [m["update"] for m in evals] == [0, 40]
    assert evals[0]["val/accuracy"] < 0.6 and evals[-1]["val/accuracy"] > max(0.65, evals[0]["val/accuracy"] + 0.15)


def score_py_rewards(folder, prompts, responses, prompt_format):
    """Rewards as score.py computes them: its loading, its encoding of (prompt, response), its batching."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    args = score.Args(reward_model=str(folder), prompt_format=prompt_format)
    sequences = score.encode_pairs(prompts, responses, tokenizer, args)
    return torch.tensor(score.score_sequences(model, sequences, tokenizer.pad_token_id, 5, "cpu"))


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_saved_folder_gives_score_py_the_trained_rewards(kind, rm_runs):
    """score.py (and so ppo.py and the other online scripts, which load the folder the same way) reads the saved
    folder unchanged and gets the rewards training measured last: the same held-out accuracy, and the same mean
    reward less the normalisation shift (text run)."""
    data, run = rm_runs(kind)
    with open(data / "validation.jsonl") as f:
        rows = [json.loads(line) for line in f]
    prompts = [row["prompt"] for row in rows for _ in range(2)]
    responses = [r if kind == "text" else r[-1]["content"] for row in rows for r in (row["chosen"], row["rejected"])]
    r = score_py_rewards(run, prompts, responses, "text" if kind == "text" else "chat").double()
    final = [m for m in metrics(run) if "val/accuracy" in m][-1]
    shift = next((m["normalize/reward_mean"] for m in metrics(run) if "normalize/reward_mean" in m), 0.0)
    assert (kind == "text") == (shift != 0.0)  # the chat run is not normalised
    assert (r[0::2] > r[1::2]).double().mean().item() == pytest.approx(final["val/accuracy"], abs=1e-9)
    assert r.mean().item() == pytest.approx(final["val/reward_mean"] - shift, abs=1e-4)
    assert r.std(unbiased=False).item() == pytest.approx(final["val/reward_std"], rel=1e-3)


def test_normalized_rewards_average_zero_on_the_normalize_dataset(rm_runs, session_dir):
    """--normalize_dataset: its responses, scored from the saved folder as score.py scores them, average 0 and keep
    the spread measured before the shift (GPT-2's head has no bias: the shift went into the final LayerNorm's)."""
    run = rm_runs("text")[1]
    logged = next(m for m in metrics(run) if "normalize/reward_mean" in m)
    rows = normalize_rows()
    r = score_py_rewards(run, [row["prompt"] for row in rows for _ in range(2)],
                         [row[f"response_{i}"] for row in rows for i in range(2)], "text").double()
    assert logged["normalize/responses"] == 96 and abs(logged["normalize/reward_mean"]) > 0.05
    assert abs(r.mean().item()) < 1e-4
    assert r.std(unbiased=False).item() == pytest.approx(logged["normalize/reward_std"], rel=1e-3)


def test_offset_goes_into_a_bias_or_is_refused_before_training(tmp_path):
    gpt2, _, tokenizer = tiny_model(TINY_GPT2)
    assert reward.offset_target(gpt2, tokenizer.pad_token_id) == ("norm", "transformer.ln_f", "score")
    llama, _, tokenizer = tiny_model(TINY_LLAMA)
    assert reward.offset_target(llama, tokenizer.pad_token_id) is None  # RMSNorm: no bias anywhere
    state = {"score.weight": torch.tensor([[3.0, 4.0]]), "score.bias": torch.tensor([1.0])}
    assert reward.fold_offset(dict(state), ("head", "score"), 0.25)["score.bias"].item() == 0.75
    data = make_data("chat", tmp_path / "chat", train=16, valid=8)
    norm = write_jsonl([{"prompt": "hi", "completion": "a film"}], tmp_path / "n.jsonl")
    with pytest.raises(SystemExit, match="head of LlamaForSequenceClassification has no bias"):
        run_in_process(reward, [*kind_args("chat", data), "--normalize_dataset", norm, "--normalize_response_column",
                                "completion", "--task.prompt_format", "chat"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_exact(rm_runs, session_dir, tmp_path):
    run = rm_runs("text")[1]
    check_resume_from_checkpoint(reward, run_args("text", session_dir), run, tmp_path / "resumed", update=8)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_match_one_rank(rm_runs, session_dir, fsdp):
    """Rankings (K varies within a micro-batch) on 2 ranks, with DDP or FSDP2, give the 1-rank run's weights (the
    normalisation shift folded in) and losses."""
    run = rm_runs("ranked")[1]
    args = [*run_args("ranked", session_dir), *(["--fsdp"] if fsdp else [])]
    two = run_into("reward.py", args, session_dir / f"rm_ranked_2p_{fsdp}", nproc=2)
    assert_weights_equal(run, two, exact=False)
    one, other = metrics(run), metrics(two)
    for key in ("loss/reward_avg", "val/accuracy", "val/reward_mean", "normalize/reward_mean"):
        # FSDP2 sums in another order than one rank: rewards (about +-2 here) agree to 1e-4, far below what a
        # wrong split of the batch would change
        assert [m[key] for m in other if key in m] == pytest.approx([m[key] for m in one if key in m], rel=1e-4,
                                                                     abs=1e-4), key


def bad_cases(tmp_path):
    """(arguments, expected error) of comparison data that is wrong, each refused before any model loads."""
    pairs, chats, ranked = text_pairs("train", 20), chat_pairs("train", 20), rankings("train", 20)
    other = [{"role": "user", "content": "something else"}]

    def edit(rows, i, **changes):
        rows = [dict(row) for row in rows]
        rows[i].update(changes)
        return rows

    def data(rows, name):
        return ["--model_name_or_path", TINY_GPT2, "--task.dataset", write_jsonl(rows, tmp_path / name / "train.jsonl"),
                "--task.eval_split", "None", "--batch_size", "4", "--local_micro_batch_size", "4"]

    chat = ["--model_name_or_path", TINY_LLAMA]
    return {
        "missing rejected": (data([{k: v for k, v in r.items() if k != "rejected"} for r in pairs], "a"),
                             r"--task.dataset \S+/a/train.jsonl split train: missing column\(s\) \['rejected'\]"),
        "missing prompt": (data([{k: v for k, v in r.items() if k != "prompt"} for r in pairs], "b"),
                           r"missing column\(s\) \['prompt'\] \(pass --task.prompt_column None"),
        "ranking of one": ([*data(edit(ranked, 7, ranked=["only one"]), "c"), "--task.dataset_format", "ranked"],
                           r"row 7, column ranked: a ranking needs at least 2 responses"),
        "repeated in ranking": ([*data(edit(ranked, 4, ranked=["a b", "c", "a b"]), "d"), "--task.dataset_format",
                                 "ranked"], r"row 4, column ranked: responses 0 and 2 are the same"),
        "prompt disagrees": ([*data(edit(chats, 5, prompt=other), "e"), *chat],
                             r"row 5: column prompt disagrees with the leading messages of column chosen"),
        "different conversations": ([*data(edit(chats, 3, rejected=other + chats[3]["rejected"][1:]), "f"),
                                     "--task.prompt_column", "None", *chat],
                                    r"row 3: columns chosen and rejected continue different conversations"),
        "all identical": (data([{**r, "rejected": r["chosen"]} for r in pairs], "g"),
                          r"no comparisons left of 20 rows \(20 with chosen equal to rejected"),
        "chat data as text": ([*data(chats, "h"), *chat, "--task.prompt_format", "text"],
                              r"row 0, column prompt: expected text, got .*need --task.prompt_format auto or chat"),
        "not a response": (data(edit(pairs, 2, chosen=""), "i"), r"row 2, column chosen: expected a non-empty text"),
        "no response columns to normalise": ([*data(pairs, "j"), "--normalize_dataset", write_jsonl(pairs, tmp_path /
                                              "n.jsonl")], r"--normalize_dataset \S+n.jsonl split train: no "
                                                           r"response_0, response_1, ... columns"),
        "longer than the model": ([*data(edit(pairs, 1, chosen=" good" * 200), "k"), "--task.maxlen", "5000"],
                                  r"sequences of up to \d+ tokens, more than the 128 positions"),
    }


@pytest.mark.parametrize("case", ["missing rejected", "missing prompt", "ranking of one", "repeated in ranking",
                                  "prompt disagrees", "different conversations", "all identical", "chat data as text",
                                  "not a response", "no response columns to normalise", "longer than the model"])
def test_bad_comparisons_are_refused_before_any_model_loads(case, tmp_path, no_model_loading):
    args, message = bad_cases(tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        run_in_process(reward, args, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_identical_pairs_are_skipped_counted_and_reported(tmp_path):
    """A pair whose chosen equals its rejected says nothing about preference: where only some rows are so, they are
    skipped, and the count and the first rows are reported."""
    rows = text_pairs("train", 12)
    for i in (3, 8):
        rows[i]["rejected"] = rows[i]["chosen"]
    args = reward.Args()
    tokenizer = reward.load_tokenizer(str(TINY_GPT2), needs_eos=False)
    data, chat, report = reward.load_comparisons(str(write_jsonl(rows, tmp_path / "d.jsonl")), "train", args,
                                                 tokenizer, "--task.dataset")
    assert len(data) == 10 and not chat and report["identical"] == [3, 8]
    line = reward.describe("train", data, report, args)
    assert "10 of 12 rows (K=2: 10)" in line and "skipped 2 whose chosen equals rejected (rows [3, 8])" in line
    assert data.row(3) == tokenizer([rows[4]["prompt"] + rows[4]["chosen"], rows[4]["prompt"] + rows[4]["rejected"]]
                                    ).input_ids


def test_chat_prompt_column_is_optional_and_explicit_prompts_are_continued(tmp_path):
    """Whole conversations in chosen/rejected need no prompt column; TRL's explicit-prompt form (prompt messages,
    responses holding only the assistant's turn) and a text prompt (one user turn) render the same sequences."""
    rows = chat_pairs("train", 6)
    tokenizer = reward.load_tokenizer(str(TINY_LLAMA), needs_eos=False)
    forms = {"whole": [{k: r[k] for k in ("chosen", "rejected")} for r in rows], "with prompt": rows,
             "explicit": [{"prompt": r["prompt"], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
                          for r in rows],
             "text prompt": [{**r, "prompt": r["prompt"][0]["content"]} for r in rows]}
    loaded = {}
    for name, form in forms.items():
        data, chat, _ = reward.load_comparisons(str(write_jsonl(form, tmp_path / f"{name}.jsonl")), "train",
                                                reward.Args(), tokenizer, "--task.dataset")
        assert chat
        loaded[name] = [data.row(i) for i in range(len(data))]
    expected = [tokenizer(tokenizer.apply_chat_template([r["chosen"], r["rejected"]], tokenize=False),
                          add_special_tokens=False).input_ids for r in rows]
    assert all(value == expected for value in loaded.values())
