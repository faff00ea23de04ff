"""Write the offline miniature of the TL;DR summarization data: synthetic Reddit posts, reference summaries,
pairwise comparisons and K-wise rankings, in `data/tldr/{sft,preference,preference_chat,ranked}/`.

It is NOT real TL;DR. It imitates, at a size CPU tests read in seconds, the data of Stiennon et al. 2020 ("Learning to
summarize from human feedback": Reddit posts of the TL;DR corpus, the posters' own summaries as references, people's
comparisons of two summaries), in the formats TRL publishes them in: `trl-lib/tldr` (`prompt`
"SUBREDDIT: r/...\nTITLE: ...\nPOST: ...\nTL;DR:", `completion` starting with a space; trl-lib separates the
fields by a blank line, saved here for length) and `trl-lib/tldr-preference` (`prompt`, `chosen`, `rejected`; the
conversational form as `preference_chat`). Every post comes from a small seeded grammar (the files are reproducible
byte for byte): four KEY FACTS, each drawn from a list below,

    who       "i (24f)"          the poster's age and sex
    other     "roommate"         the person the post is about (it also picks the subreddit)
    problem   "never cleans up"  what that person does
    question  "what now?"        what the poster asks

wrapped in filler sentences ("hi all.", "it is a mess."), e.g. "hello. i (24f) need help. it is a mess. my roommate
never cleans up. so what now?". The reference summary states the four facts in one sentence:
" i (24f) have a roommate who never cleans up, what now?".

So that the quality of a summary is checkable and a tiny reward model can learn it, `quality(prompt, summary)` is an
explicit rule: the number of the post's key facts the summary states, minus the number of facts it states wrongly
(a value of the fact's list other than the post's), minus 1 if it is cut off (does not end with ".", "?" or "!").
Each post gets five kinds of summary whose qualities that rule fixes:

    reference   all four facts                                  quality 4
    dropped     one fact left out                               quality 3
    wrong       one fact replaced by another value of its list  quality 2
    truncated   the reference cut off inside the problem        quality 1 (who and other stated, cut off)
    filler      the post's first (filler) sentence copied       quality 0

`preference` pairs two kinds of one post (chosen the better by `quality`, never identical); `ranked` orders four of
the five kinds best first (K = 4, all distinct, qualities strictly decreasing).

Length: data/tiny-gpt2's tokenizer (1,024 BPE tokens learnt on the lower-case SST-2 stand-in) spends about three
tokens per word here (five on a capitalised word), and its model has 128 positions. So the posters write in lower
case, as many Reddit posters do, and posts are short (11 to 23 words): every prompt has at most MAX_PROMPT_TOKENS and
every completion at most MAX_COMPLETION_TOKENS of that tokenizer, so a prompt, any of its completions and an EOS fit
in 128 positions (tests/test_tldr_data.py checks the shipped files).

Splits: every post belongs to one split, and no combination of key facts occurs in both (so the validation split's
reference summaries were never trained on). The subsets of one split share its posts and their ids (`train-0000`,
...): `sft`, `preference` and `preference_chat` (the same pairs as conversations) have a row for every post of the
split, `ranked` for its first `num_ranked_*` posts.

Columns (files `train.jsonl` and `validation.jsonl` in each folder, so a folder is a `--dataset` of the scripts):
  sft:             id, prompt, completion, messages ([user: "Summarize this post in one sentence.\n\n" and the post
                   (the prompt without "\nTL;DR:"), assistant: the reference without its leading space])
  preference:      id, prompt, chosen, rejected (text completions, starting with a space)
  preference_chat: id, prompt ([the user message]), chosen and rejected ([the user message, the assistant's answer])
  ranked:          id, prompt, ranked (four text completions, best first)

    python data/make_tldr.py                      # writes data/tldr/ (replacing it whole)
"""

import json
import os
import random
import re
import shutil
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    output_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tldr")
    """folder that receives sft/, preference/, preference_chat/ and ranked/ (written to a temporary folder first,
    then renamed into place)"""
    num_train: int = 1200
    """posts in the train split (rows of train.jsonl in sft/, preference/ and preference_chat/)"""
    num_validation: int = 200
    """posts in the validation split"""
    num_ranked_train: int = 400
    """train posts that also get a K-wise ranking (ranked/train.jsonl)"""
    num_ranked_validation: int = 100
    """validation posts that also get a K-wise ranking (ranked/validation.jsonl)"""
    seed: int = 1
    """seed of the grammar's and the comparisons' random choices"""


MAX_PROMPT_TOKENS = 96
"""most tokens of data/tiny-gpt2's tokenizer in a prompt"""
MAX_COMPLETION_TOKENS = 31
"""most tokens of data/tiny-gpt2's tokenizer in a completion (reference, chosen, rejected or ranked)"""
K = 4
"""completions per ranking"""
INSTRUCTION = "Summarize this post in one sentence."
POST_FORMAT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}"
"""a post as the prompt shows it (the prompt adds "\nTL;DR:"; the chat form puts INSTRUCTION before it)"""

# The key facts. No value matches inside another value, a filler sentence or a template (the tests check it), so
# `quality` can find them in any text by whole-word matching.
AGES = list(range(18, 36))
SEXES = ["f", "m"]
OTHERS = {  # the other person -> the subreddit a post about them goes to (none starts with a vowel: "a {other}")
    "bf": "dating", "gf": "dating", "partner": "dating", "wife": "marriage", "husband": "marriage",
    "boss": "jobs", "coworker": "jobs", "mom": "family", "dad": "family", "sister": "family", "brother": "family",
    "cousin": "family", "roommate": "roommates", "landlord": "roommates", "neighbor": "roommates",
}
PROBLEMS = [  # each at least two words, so that a summary can be cut off inside one
    "is always late", "never listens", "is never home", "never calls", "lies to me", "never helps", "never cleans up",
    "is always angry", "is too loud", "is so lazy", "is always busy", "never shares", "is too strict",
    "never pays rent", "never texts",
]
QUESTIONS = ["what now?", "is it me?", "is this ok?", "is it over?", "who is right?", "is it fine?"]
OPENERS = ["hi all.", "hello.", "first post.", "quick one.", "throwaway.", "on mobile."]
TITLES = ["my {other}", "about my {other}"]
WHO_SENTENCES = ["{who} here.", "{who} need help."]
MIDDLE = ["", "", "it is a mess.", "it is the worst."]
PROBLEM_SENTENCES = ["my {other} {problem}.", "but my {other} {problem}."]
ASKS = ["{question}", "so {question}"]

SLOTS = ("who", "other", "problem", "question")
WHO = re.compile(r"\bi \((\d+)([fm])\)", re.IGNORECASE)


def word_pattern(*values):
    """Finds any of `values` as whole words, in any case."""
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, values)) + r")(?!\w)", re.IGNORECASE)


PATTERNS = {"other": word_pattern(*OTHERS), "problem": word_pattern(*PROBLEMS), "question": word_pattern(*QUESTIONS)}


def stated(text):
    """The key-fact values a text states, per slot: {slot: set of values}."""
    found = {slot: {value.lower() for value in pattern.findall(text)} for slot, pattern in PATTERNS.items()}
    found["who"] = {f"i ({age}{sex.lower()})" for age, sex in WHO.findall(text)}
    return found


def post_facts(prompt):
    """The key facts {slot: value} of a prompt's post (the text after "POST:"), each stated exactly once."""
    post = prompt.split("\nPOST: ", 1)[-1]
    facts = {}
    for slot, values in stated(post).items():
        if len(values) != 1:
            raise ValueError(f"the post states {sorted(values)} for {slot}, expected exactly one value: {post!r}")
        facts[slot] = values.pop()
    return facts


def quality(prompt, summary):
    """The rule that orders summaries: key facts of the post stated, minus key facts stated wrongly (a value that is
    not the post's), minus 1 if the summary is cut off (does not end with ".", "?" or "!")."""
    facts, found = post_facts(prompt), stated(summary)
    correct = sum(facts[slot] in found[slot] for slot in SLOTS)
    wrong = sum(len(found[slot] - {facts[slot]}) for slot in SLOTS)
    return correct - wrong - (not summary.rstrip().endswith((".", "?", "!")))


def gold(prompts, responses, **columns):
    """`quality` as a reward function in the form score.py's `--reward_fn` takes (the true reward of the miniature,
    for scoring policies trained against a learned reward model): `--reward_fn data/make_tldr.py:gold`."""
    return [float(quality(p, r)) for p, r in zip(prompts, responses)]


def draw_facts(rng):
    return {"who": f"i ({rng.choice(AGES)}{rng.choice(SEXES)})", "other": rng.choice(list(OTHERS)),
            "problem": rng.choice(PROBLEMS), "question": rng.choice(QUESTIONS)}


def write_post(facts, rng):
    """(post in POST_FORMAT, its first sentence) of one post stating `facts`, with filler drawn from rng."""
    sentences = [
        rng.choice(OPENERS),
        rng.choice(WHO_SENTENCES).format(who=facts["who"]),
        rng.choice(MIDDLE),
        rng.choice(PROBLEM_SENTENCES).format(other=facts["other"], problem=facts["problem"]),
        rng.choice(ASKS).format(question=facts["question"]),
    ]
    post = " ".join(s for s in sentences if s)
    title = rng.choice(TITLES).format(other=facts["other"])
    return POST_FORMAT.format(subreddit=OTHERS[facts["other"]], title=title, post=post), sentences[0]


def reference(facts):
    return f" {facts['who']} have a {facts['other']} who {facts['problem']}, {facts['question']}"


def dropped(facts, slot):
    """The reference with one key fact left out."""
    if slot == "who":
        return f" i have a {facts['other']} who {facts['problem']}, {facts['question']}"
    if slot == "other":
        return f" {facts['who']} have someone who {facts['problem']}, {facts['question']}"
    if slot == "problem":
        return f" {facts['who']} have a {facts['other']}, {facts['question']}"
    return f" {facts['who']} have a {facts['other']} who {facts['problem']}."


def wrong(facts, slot, rng):
    """The reference with one key fact replaced by a value of that fact's list other than the post's."""
    value = facts[slot]
    while value == facts[slot]:
        value = draw_facts(rng)[slot]
    return reference({**facts, slot: value})


def truncated(facts, rng):
    """The reference cut off inside the problem, after at least one of its words."""
    words = facts["problem"].split()
    return f" {facts['who']} have a {facts['other']} who {' '.join(words[:rng.randint(1, len(words) - 1)])}"


def candidates(facts, first_sentence, rng):
    """The five kinds of summary of one post, best first (qualities 4, 3, 2, 1, 0)."""
    return [reference(facts), dropped(facts, rng.choice(SLOTS)), wrong(facts, rng.choice(SLOTS), rng),
            truncated(facts, rng), " " + first_sentence]


def make_posts(args, rng):
    """{split: [(facts, post, first sentence)]}: posts with distinct prompts, no fact combination in both splits."""
    seen, posts = set(), {"train": [], "validation": []}
    for split, count in (("validation", args.num_validation), ("train", args.num_train)):
        while len(posts[split]) < count:
            facts = draw_facts(rng)
            key = tuple(facts[slot] for slot in SLOTS)
            if key in seen:
                continue
            seen.add(key)
            posts[split].append((facts, *write_post(facts, rng)))
    return posts


def make_dataset(args):
    """{subset: {split: rows}}."""
    rng = random.Random(args.seed)
    posts = make_posts(args, rng)
    data = {subset: {} for subset in ("sft", "preference", "preference_chat", "ranked")}
    for split, rows in posts.items():
        num_ranked = {"train": args.num_ranked_train, "validation": args.num_ranked_validation}[split]
        data["sft"][split], data["preference"][split], data["preference_chat"][split], data["ranked"][split] = \
            [], [], [], []
        for i, (facts, post, first_sentence) in enumerate(rows):
            row_id, prompt = f"{split}-{i:04d}", post + "\nTL;DR:"
            summaries = candidates(facts, first_sentence, rng)
            user = {"role": "user", "content": f"{INSTRUCTION}\n\n{post}"}
            data["sft"][split].append({"id": row_id, "prompt": prompt, "completion": summaries[0], "messages": [
                user, {"role": "assistant", "content": summaries[0].strip()}]})
            better, worse = sorted(rng.sample(range(len(summaries)), 2))
            chosen, rejected = summaries[better], summaries[worse]
            data["preference"][split].append({"id": row_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
            data["preference_chat"][split].append({
                "id": row_id, "prompt": [user], "chosen": [user, {"role": "assistant", "content": chosen.strip()}],
                "rejected": [user, {"role": "assistant", "content": rejected.strip()}]})
            if i < num_ranked:
                kept = sorted(rng.sample(range(len(summaries)), K))
                data["ranked"][split].append({"id": row_id, "prompt": prompt, "ranked": [summaries[k] for k in kept]})
    return data


def main(args: Args):
    if args.num_ranked_train > args.num_train or args.num_ranked_validation > args.num_validation:
        raise ValueError(f"--num_ranked_train/--num_ranked_validation ({args.num_ranked_train}/"
                         f"{args.num_ranked_validation}) exceed --num_train/--num_validation ({args.num_train}/"
                         f"{args.num_validation})")
    data = make_dataset(args)
    output_dir = os.path.abspath(args.output_dir)
    temporary, old = output_dir + ".tmp", output_dir + ".old"
    shutil.rmtree(temporary, ignore_errors=True)
    for subset, splits in data.items():
        os.makedirs(os.path.join(temporary, subset))
        for split, rows in splits.items():
            with open(os.path.join(temporary, subset, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    if os.path.exists(output_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output_dir, old)
    os.replace(temporary, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    for subset, splits in data.items():
        print(f"wrote {os.path.join(output_dir, subset)}: " + ", ".join(f"{split} {len(rows)} rows"
                                                                        for split, rows in splits.items()))


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
