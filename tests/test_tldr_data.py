"""The miniature TL;DR data (data/tldr, made by data/make_tldr.py): the shipped files are what the generator writes,
every subset has its columns, the splits share no post, every comparison and ranking follows `quality`, and every
row fits the tiny models' positions. Seconds: the files are small and read once."""

import filecmp
import json
import random

import pytest
from conftest import DATA, TINY_GPT2, TINY_LLAMA

from data import make_tldr

TLDR = DATA / "tldr"
SPLITS = ("train", "validation")
COLUMNS = {"sft": {"id", "prompt", "completion", "messages"}, "preference": {"id", "prompt", "chosen", "rejected"},
           "preference_chat": {"id", "prompt", "chosen", "rejected"}, "ranked": {"id", "prompt", "ranked"}}
ROWS = {"sft": (1200, 200), "preference": (1200, 200), "preference_chat": (1200, 200), "ranked": (400, 100)}


def read(subset, split):
    with open(TLDR / subset / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data():
    return {subset: {split: read(subset, split) for split in SPLITS} for subset in COLUMNS}


def completions(data, split):
    """(prompt, text completion) of every completion of a split, in every text subset."""
    return [(r["prompt"], c) for subset, keys in (("sft", ["completion"]), ("preference", ["chosen", "rejected"]))
            for r in data[subset][split] for c in (r[k] for k in keys)] + \
        [(r["prompt"], c) for r in data["ranked"][split] for c in r["ranked"]]


def test_tldr_regenerates_byte_for_byte_and_atomically(tmp_path):
    make_tldr.main(make_tldr.Args(output_dir=str(tmp_path / "tldr")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tldr"]  # no temporary or old folder left behind
    written = sorted(str(p.relative_to(tmp_path / "tldr")) for p in (tmp_path / "tldr").rglob("*"))
    assert written == sorted(str(p.relative_to(TLDR)) for p in TLDR.rglob("*"))
    assert len(written) == len(COLUMNS) * (1 + len(SPLITS))  # the four folders and their two files
    for subset in COLUMNS:
        for split in SPLITS:
            assert filecmp.cmp(tmp_path / "tldr" / subset / f"{split}.jsonl", TLDR / subset / f"{split}.jsonl",
                               shallow=False), f"{subset}/{split}"
    (tmp_path / "tldr" / "sft" / "train.jsonl").write_text("stale")
    make_tldr.main(make_tldr.Args(output_dir=str(tmp_path / "tldr"), num_train=10, num_validation=5,
                                  num_ranked_train=3, num_ranked_validation=2))  # replaces the folder whole
    assert len(read_lines(tmp_path / "tldr" / "sft" / "train.jsonl")) == 10
    assert len(read_lines(tmp_path / "tldr" / "ranked" / "validation.jsonl")) == 2
    with pytest.raises(ValueError, match="--num_ranked_train"):
        make_tldr.main(make_tldr.Args(output_dir=str(tmp_path / "bad"), num_train=2, num_ranked_train=3))
    assert not (tmp_path / "bad").exists()


def read_lines(path):
    return path.read_text().splitlines()


def test_tldr_subsets_have_their_columns_and_share_posts(data):
    for subset, columns in COLUMNS.items():
        for split, count in zip(SPLITS, ROWS[subset]):
            rows = data[subset][split]
            assert len(rows) == count, f"{subset}/{split}"
            assert all(set(r) == columns for r in rows), f"{subset}/{split}"
            assert [r["id"] for r in rows] == [f"{split}-{i:04d}" for i in range(count)], f"{subset}/{split}"
    for split in SPLITS:
        sft, preference = data["sft"][split], data["preference"][split]
        assert len({r["prompt"] for r in sft}) == len(sft)  # every post once per split
        assert [r["prompt"] for r in preference] == [r["prompt"] for r in sft]  # the same posts, by id
        assert [r["prompt"] for r in data["ranked"][split]] == [r["prompt"] for r in sft[:len(data["ranked"][split])]]
        for r in sft:
            assert r["prompt"].startswith("SUBREDDIT: r/") and "\nTITLE: " in r["prompt"] and "\nPOST: " in r["prompt"]
            assert r["prompt"].endswith("\nTL;DR:")
            post = r["prompt"].removesuffix("\nTL;DR:")
            user = {"role": "user", "content": f"{make_tldr.INSTRUCTION}\n\n{post}"}
            assert r["messages"] == [user, {"role": "assistant", "content": r["completion"][1:]}]
        for text, chat in zip(preference, data["preference_chat"][split]):
            user = sft[int(text["id"].split("-")[1])]["messages"][0]
            assert chat["prompt"] == [user]
            for key in ("chosen", "rejected"):
                assert chat[key] == [user, {"role": "assistant", "content": text[key][1:]}]
        for _, completion in completions(data, split):
            assert completion.startswith(" ") and not completion.startswith("  ") and completion == completion.rstrip()


def test_tldr_splits_share_no_post_nor_combination_of_facts(data):
    prompts = {split: {r["prompt"] for r in data["sft"][split]} for split in SPLITS}
    assert not prompts["train"] & prompts["validation"]
    facts = {split: {tuple(make_tldr.post_facts(p).values()) for p in prompts[split]} for split in SPLITS}
    assert len(facts["train"]) == len(prompts["train"]) and len(facts["validation"]) == len(prompts["validation"])
    assert not facts["train"] & facts["validation"]


def test_quality_counts_facts_stated_wrong_facts_and_cut_off_summaries():
    prompt = ("SUBREDDIT: r/roommates\nTITLE: my roommate\nPOST: hello. i (24f) need help. my roommate never cleans up."
              " so what now?\nTL;DR:")
    assert make_tldr.post_facts(prompt) == {"other": "roommate", "problem": "never cleans up", "question": "what now?",
                                            "who": "i (24f)"}
    for summary, expected in [
        (" i (24f) have a roommate who never cleans up, what now?", 4),
        (" My roommate never cleans up. I (24F) ask: what now?", 4),  # any wording, any case
        (" i have a roommate who never cleans up, what now?", 3),
        (" i (25f) have a roommate who never cleans up, what now?", 2),
        (" i (24m) have a boss who never cleans up, what now?", 0),  # two facts wrong
        (" i (24f) have a roommate who never cleans up, what now? my boss too.", 3),  # a wrong fact added
        (" i (24f) have a roommate who never", 1),
        (" i (24f) have a roommate who never cleans up, what now", 2),  # no "?": cut off, and the question unstated
        (" hello.", 0),
        ("", -1),
    ]:
        assert make_tldr.quality(prompt, summary) == expected, summary
    with pytest.raises(ValueError, match=r"states \['boss', 'roommate'\] for other"):
        make_tldr.post_facts(prompt.replace("need help.", "my boss knows."))
    with pytest.raises(ValueError, match=r"states \[\] for who"):
        make_tldr.post_facts(prompt.replace("i (24f)", "i"))


def test_every_kind_of_summary_has_its_quality_for_every_post(data):
    """The five kinds score 4, 3, 2, 1, 0 for every shipped post, whichever fact is dropped or replaced; no fact's
    value matches inside another value or the grammar's filler."""
    fillers = [*make_tldr.OPENERS, *make_tldr.TITLES, *make_tldr.WHO_SENTENCES, *make_tldr.MIDDLE,
               *make_tldr.PROBLEM_SENTENCES, *make_tldr.ASKS, " have a ", " who ", " have someone "]
    values = [*make_tldr.OTHERS, *make_tldr.PROBLEMS, *make_tldr.QUESTIONS]
    for value in values:
        inside = [text for text in fillers + values if text != value and make_tldr.word_pattern(value).search(text)]
        assert not inside, f"{value!r} matches inside {inside}"
    rng = random.Random(0)
    for split in SPLITS:
        for r in data["sft"][split]:
            facts, post = make_tldr.post_facts(r["prompt"]), r["prompt"].split("\nPOST: ")[1]
            first_sentence = post.split(". ")[0] + "."
            kinds = make_tldr.candidates(facts, first_sentence, rng)
            assert kinds[0] == r["completion"]
            assert [make_tldr.quality(r["prompt"], s) for s in kinds] == [4, 3, 2, 1, 0], r["id"]
            for slot in make_tldr.SLOTS:
                assert make_tldr.quality(r["prompt"], make_tldr.dropped(facts, slot)) == 3, (r["id"], slot)
                assert make_tldr.quality(r["prompt"], make_tldr.wrong(facts, slot, rng)) == 2, (r["id"], slot)


def test_comparisons_and_rankings_follow_quality(data):
    for split in SPLITS:
        for r in data["preference"][split]:
            assert r["chosen"] != r["rejected"], r["id"]
            assert make_tldr.quality(r["prompt"], r["chosen"]) > make_tldr.quality(r["prompt"], r["rejected"]), r["id"]
        for r in data["ranked"][split]:
            assert len(r["ranked"]) == make_tldr.K == len(set(r["ranked"])), r["id"]
            scores = [make_tldr.quality(r["prompt"], c) for c in r["ranked"]]
            assert scores == sorted(set(scores), reverse=True), (r["id"], scores)  # best first, no tie
        assert all(make_tldr.quality(r["prompt"], r["completion"]) == 4 for r in data["sft"][split])
    pairs = [(make_tldr.quality(r["prompt"], r["chosen"]), make_tldr.quality(r["prompt"], r["rejected"]))
             for r in data["preference"]["train"]]
    assert len(set(pairs)) == 10  # every pair of the five kinds occurs


def test_every_row_fits_the_tiny_models(data):
    from transformers import AutoConfig, AutoTokenizer

    gpt2, llama = AutoTokenizer.from_pretrained(TINY_GPT2), AutoTokenizer.from_pretrained(TINY_LLAMA)
    positions = AutoConfig.from_pretrained(TINY_GPT2).n_positions
    assert make_tldr.MAX_PROMPT_TOKENS + make_tldr.MAX_COMPLETION_TOKENS + 1 <= positions  # + EOS
    for split in SPLITS:
        prompts, texts = zip(*completions(data, split))
        prompt_lengths = [len(ids) for ids in gpt2(sorted(set(prompts))).input_ids]
        completion_lengths = [len(ids) for ids in gpt2(list(texts)).input_ids]
        assert max(prompt_lengths) <= make_tldr.MAX_PROMPT_TOKENS, max(prompt_lengths)
        assert max(completion_lengths) <= make_tldr.MAX_COMPLETION_TOKENS, max(completion_lengths)
        chats = [llama.apply_chat_template(r[key], tokenize=False) for r in data["preference_chat"][split]
                 for key in ("chosen", "rejected")]
        chat_lengths = [len(ids) for ids in llama(chats, add_special_tokens=False).input_ids]
        assert max(chat_lengths) <= AutoConfig.from_pretrained(TINY_LLAMA).max_position_embeddings
