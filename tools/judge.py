"""Win rate of responses A over responses B to the same prompts, as a judge LLM sees it: the TL;DR metric of the DPO
and REBEL papers (a policy's summaries against the dataset's reference summaries), or any two policies head to head.

For every prompt the judge is asked twice, once with A's response shown first and once with B's shown first, so a
judge that favours a position cannot move the result: a prompt's outcome is the average of A's scores in the two
orders (1 when the judge picks A, 0 when it picks B, 0.5 when it answers "tie"), so it is 1, 0.75, 0.5, 0.25 or 0, and
a judge that always picks the first response scores exactly 0.5. The win rate is the mean outcome over the prompts,
with its standard error (the sample standard deviation of the outcomes over sqrt(n)). An answer whose last line
names neither response is unparseable: it is counted, and its prompt is left out of the win rate (both orders or
none, so the position bias stays removed) and counted too.

Inputs: two datasets (files, folders, `save_to_disk` folders or hub ids: generate.py's output, a dataset's reference
column, ppo.py's eval_samples.jsonl ...), each with a response column and a prompt-id column, joined by prompt id:
every prompt of A must be in B (B may hold more, e.g. the whole reference split), ids may not repeat. The prompt shown
to the judge comes from A's (or, with --prompt_from b, B's) prompt column; where both hold the prompt, they must agree.
--a_where / --b_where COLUMN=VALUE keep only the rows with that value: e.g. two evaluations of one eval_samples.jsonl
(update=N against update=0, joined on `index`), a policy's final answers against the SFT policy's.

Judges: a local chat model through transformers (greedy) or vLLM (greedy), or an OpenAI-compatible HTTP endpoint
(`--judge_url`: POST .../v1/chat/completions, temperature 0; the key is read from the environment variable named by
--judge_api_key_env and written nowhere). Everything that can fail cheaply is checked before the judge runs: the data,
the output folder, the judge's tokenizer and context length, and the endpoint (one probe request).

Outputs in --output_dir, each written atomically: `judgments.jsonl` (per prompt: both responses, both answers, what
each named, the outcome) and `summary.json` (win rate, standard error, counts of ties, unparseable answers, excluded
prompts and position consistency).

    python generate.py --model_name_or_path runs/sft_tldr --dataset data/tldr/sft --split validation \\
        --prompt_id_column id --prompt_format text --num_responses 1 --temperature 0 --output_dir runs/tldr_answers
    python tools/judge.py --a runs/tldr_answers --b data/tldr/sft --b_split validation \\
        --judge_model gpt-4o --judge_url https://api.openai.com/v1 --limit 500 --output_dir runs/judge_sft

Documentation: docs/judge.md
"""

import concurrent.futures
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402  (loading data and tokenizers, and the stop tokens, as the pipeline does)


@dataclass
class Args:
    a: str
    """responses A, whose win rate is reported: a .jsonl/.json/.csv/.parquet file, a folder or a hub dataset"""
    b: str
    """responses B, the baseline (e.g. the dataset with the reference responses)"""
    judge_model: str
    """the judge: a hub id or folder of a chat model (transformers, vLLM), or the model name the endpoint serves"""
    a_column: str = "response_0"
    """column of A holding the responses (generate.py's first response)"""
    b_column: str = "completion"
    """column of B holding the responses (the TL;DR datasets' reference summary)"""
    a_id_column: str | None = "prompt_id"
    """column of A holding the prompt ids; None: the row index"""
    b_id_column: str | None = "id"
    """column of B holding the prompt ids; None: the row index"""
    a_split: str = "train"
    """split of A (a single file or a `save_to_disk` dataset holds only "train")"""
    b_split: str = "train"
    """split of B"""
    a_where: str | None = None
    """keep only A's rows whose column equals a value, COLUMN=VALUE compared as text (e.g. update=50: one evaluation
    of ppo.py's eval_samples.jsonl, which holds every evaluation's answers); None: every row"""
    b_where: str | None = None
    """keep only B's rows whose column equals a value (COLUMN=VALUE, e.g. update=0: the SFT policy's answers)"""
    prompt_column: str = "prompt"
    """column holding the prompt shown to the judge: text, or chat messages"""
    prompt_from: Literal["a", "b"] = "a"
    """the dataset whose prompt column is shown to the judge (where both have it, they must agree)"""
    check_prompts: bool = True
    """refuse to judge when A and B both hold the prompt and it differs for an id (--no_check_prompts: skip)"""
    limit: int | None = None
    """judge only the first this many prompts of A; None: all"""
    template: Literal["tldr", "chat", "sentiment"] = "tldr"
    """the question put to the judge: tldr (which summary of a forum post is better), chat (which reply is more
    helpful) or sentiment (which continuation of a review's opening words is more positive: the SST-2 toy)"""
    max_new_tokens: int = 128
    """most tokens of each answer (a one-sentence comparison, then the verdict on its own line)"""
    output_dir: str = "runs/judge"
    """folder that receives summary.json and judgments.jsonl"""
    overwrite: bool = False
    """replace a finished judgment in output_dir"""

    # backends
    backend: Literal["auto", "hf", "vllm", "http"] = "auto"
    """auto: http when --judge_url is given, else vLLM when it is installed and a GPU is present, else transformers"""
    judge_url: str | None = None
    """an OpenAI-compatible endpoint: its base (https://api.openai.com/v1, http://localhost:8000) or the full
    .../v1/chat/completions address"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the endpoint's key (sent as `Authorization: Bearer`; unset: no header)"""
    timeout: float = 60.0
    """http: seconds to wait for one answer"""
    retries: int = 5
    """http: tries after the first for a request that fails (no answer, timeout, 429, 5xx); other errors stop at once"""
    backoff: float = 1.0
    """http: seconds before the first retry, doubled before each next one (a Retry-After header is honoured, to 60 s)"""
    num_workers: int = 8
    """http: requests in flight at once"""
    batch_size: int = 8
    """transformers: judge prompts per generate call"""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per model replica"""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory it may take"""
    dtype: str = "auto"
    """vLLM dtype; transformers runs bf16 on GPU and fp32 on CPU"""


# ----------------------------------------------------------------------------------------------------------------
# the question, and reading the answer

# Modelled on the GPT-4 prompt of the DPO paper (Rafailov et al. 2023, appendix), which the REBEL paper used for its
# TL;DR win rates: the same task and answer format, in words of this project's own.
TEMPLATES = {
    "tldr": """Here is a forum post and two candidate summaries of it. Which summary conveys the post's most important \
points better, while leaving out details that are minor or beside the point?

Post:
{prompt}

Summary A:
{first}

Summary B:
{second}

FIRST, in one sentence, compare the two summaries and say which you prefer and why. SECOND, on a new line, state only \
"A" or "B" to give your choice. Use this format:
Comparison: <one sentence comparing the summaries and explaining your choice>
Preferred: <"A" or "B">""",
    "chat": """Here is a conversation with an AI assistant and two candidate replies for the assistant's next turn. \
Which reply helps the user more: accurate, on point and clear, without needless padding?

Conversation:
{prompt}

Reply A:
{first}

Reply B:
{second}

FIRST, in one sentence, compare the two replies and say which you prefer and why. SECOND, on a new line, state only \
"A" or "B" to give your choice. Use this format:
Comparison: <one sentence comparing the replies and explaining your choice>
More helpful: <"A" or "B">""",
    # the SST-2 toy's task, which its reward model and VADER score: continue a review's opening words positively
    "sentiment": """Here are the opening words of a review and two candidate continuations of them. Read the opening \
words followed by each continuation: which one makes the review express a more positive opinion?

Opening words:
{prompt}

Continuation A:
{first}

Continuation B:
{second}

FIRST, in one sentence, compare the two continuations and say which is more positive and why. SECOND, on a new line, \
state only "A" or "B" to give your choice. Use this format:
Comparison: <one sentence comparing the continuations and explaining your choice>
More positive: <"A" or "B">""",
}
TIE_WORDS = {"tie", "equal", "equally", "same"}


def prompt_text(prompt, template):
    """The prompt as the judge reads it: text as is (the TL;DR template drops the trailing "TL;DR:" cue), chat
    messages as one user turn's content or, for several turns, `role: content` lines."""
    if isinstance(prompt, list):
        if len(prompt) == 1:
            return str(prompt[0].get("content") or "").strip()
        return "\n\n".join(f"{m.get('role')}: {str(m.get('content') or '').strip()}" for m in prompt)
    text = str(prompt if prompt is not None else "").strip()
    if template == "tldr" and text.endswith("TL;DR:"):
        text = text[:-len("TL;DR:")].rstrip()
    return text


def response_text(response):
    """A response as text: a string, or a conversation (the content of its last message)."""
    if isinstance(response, list):
        return str(response[-1].get("content") or "").strip() if response else ""
    return str(response if response is not None else "").strip()


def render(template, prompt, first, second):
    return TEMPLATES[template].format(prompt=prompt, first=first, second=second)


CUT_OFF = "[cut off at --max_new_tokens: not read]"  # appended to an answer that did not end, so it is unparseable
VERDICT_LINE = re.compile(r"(?:preferred|more helpful|more positive)\s*:\s*(.*)", re.IGNORECASE)


def parse_verdict(text):
    """What an answer names: "A", "B", "tie", or None (unparseable). Only the answer's last non-blank line is read,
    and only when it is the template's label line ("Preferred: A", "More helpful: B", "More positive: A"; markdown
    bold and quotes allowed): after the label, exactly the letter A or B (a lower-case a or b alone counts too), or a
    tie word (tie, equal, equally, same) and no letter. Anything else is unparseable: a missing label line, both
    letters, an answer that loops or rambles, and one cut off at --max_new_tokens (the backends append CUT_OFF)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    found = VERDICT_LINE.fullmatch(lines[-1].replace("*", "").strip()) if lines else None
    if found is None:
        return None
    words = re.findall(r"[A-Za-z]+", found.group(1))
    if len(words) == 1 and words[0] in ("A", "B", "a", "b"):
        return words[0].upper()
    if words and all(w.lower() in TIE_WORDS for w in words):
        return "tie"
    return None


# ----------------------------------------------------------------------------------------------------------------
# the win rate

SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def winner(choice, a_first):
    """The side ("a", "b", "tie" or None) an answer's choice of position names, given which side was shown first."""
    if choice in (None, "tie"):
        return choice
    return ("a" if choice == "A" else "b") if a_first else ("b" if choice == "A" else "a")


def judge_pairs(pairs, template, complete):
    """Judge every pair in both orders. `pairs`: dicts with id, prompt (as the judge reads it), a and b (responses);
    `complete`: a function from a list of judge prompts to the list of the judge's answers. Returns one record per
    pair with both answers, what each named, and the pair's outcome for A (None when an answer was unparseable)."""
    questions = []
    for p in pairs:
        questions += [render(template, p["prompt"], p["a"], p["b"]), render(template, p["prompt"], p["b"], p["a"])]
    answers = complete(questions)
    if len(answers) != len(questions):
        raise RuntimeError(f"the judge returned {len(answers)} answers to {len(questions)} questions")
    records = []
    for i, p in enumerate(pairs):
        record = dict(p)
        for order, a_first in (("a_first", True), ("b_first", False)):
            text = answers[2 * i + (0 if a_first else 1)]
            choice = parse_verdict(text)
            record[f"{order}_answer"], record[f"{order}_choice"] = text, choice
            record[f"{order}_winner"] = winner(choice, a_first)
        both = (record["a_first_winner"], record["b_first_winner"])
        record["outcome"] = None if None in both else (SCORE[both[0]] + SCORE[both[1]]) / 2
        records.append(record)
    return records


def summarize(records):
    """Win rate of A (mean outcome over the prompts with two parseable answers), its standard error (sample standard
    deviation over sqrt(n); None below 2 prompts), and the counts behind it."""
    outcomes = [r["outcome"] for r in records if r["outcome"] is not None]
    n = len(outcomes)
    mean = sum(outcomes) / n if n else None
    stderr = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1) / n) if n >= 2 else None
    choices = [r[f"{o}_choice"] for r in records for o in ("a_first", "b_first")]
    named = [c for c in choices if c in ("A", "B")]
    scored = [r for r in records if r["outcome"] is not None]
    return {
        "win_rate": mean,
        "stderr": stderr,
        "n": n,
        "prompts": len(records),
        "answers": len(choices),
        "ties": choices.count("tie"),
        "unparseable": choices.count(None),
        "excluded_prompts": len(records) - n,
        "a_wins_both_orders": sum(r["a_first_winner"] == r["b_first_winner"] == "a" for r in scored),
        "b_wins_both_orders": sum(r["a_first_winner"] == r["b_first_winner"] == "b" for r in scored),
        "position_consistent": sum(r["a_first_winner"] == r["b_first_winner"] for r in scored),
        "first_position_rate": named.count("A") / len(named) if named else None,
        "outcomes": {f"{v:g}": outcomes.count(v) for v in (1.0, 0.75, 0.5, 0.25, 0.0)},
    }


def describe(summary):
    s = summary
    if s["win_rate"] is None:
        head = f"win rate of A over B: none (no prompt of {s['prompts']} had two parseable answers)"
    else:
        se = f" ± {s['stderr']:.3f} (standard error)" if s["stderr"] is not None else ""
        head = f"win rate of A over B: {s['win_rate']:.3f}{se} over {s['n']} prompts"
    first = "n/a" if s["first_position_rate"] is None else f"{s['first_position_rate']:.2f}"
    return (f"{head}\n  answers {s['answers']}: ties {s['ties']}, unparseable {s['unparseable']} (prompts left out: "
            f"{s['excluded_prompts']})\n  same winner in both orders: {s['position_consistent']} of {s['n']} prompts "
            f"(A both times {s['a_wins_both_orders']}, B both times {s['b_wins_both_orders']}); the first position "
            f"was chosen in {first} of the answers naming one")


# ----------------------------------------------------------------------------------------------------------------
# the data


def parse_where(where, arg):
    """(column, value) of a COLUMN=VALUE row filter, or None."""
    if where is None:
        return None
    column, eq, value = where.partition("=")
    if not eq or not column.strip():
        raise ValueError(f"{arg} {where!r}: expected COLUMN=VALUE, e.g. update=0")
    return column.strip(), value.strip()


def load_side(path, split, column, id_column, side, args):
    """One side's rows, {id: (response, prompt or None)} in the dataset's order (only the rows --{side}_where keeps);
    columns and unique ids checked."""
    what = f"--{side} {path} (split {split})"
    data = generate.load_split(path, split, f"--{side}")
    wants_prompt = args.prompt_from == side
    where = parse_where(getattr(args, f"{side}_where"), f"--{side}_where")
    generate.require_columns(data, [column, *([id_column] if id_column else []),
                                    *([args.prompt_column] if wants_prompt else []), *(where[:1] if where else [])],
                             what)
    if where:
        values = [str(v) for v in data[where[0]]]
        keep = [i for i, v in enumerate(values) if v == where[1]]
        if not keep:
            raise ValueError(f"{what}: no row has {where[0]} = {where[1]!r} (--{side}_where); its values include "
                             f"{list(dict.fromkeys(values))[:10]}")
        data = data.select(keep)
        what += f" where {where[0]} = {where[1]}"
    ids = [str(i) for i in data[id_column]] if id_column else [str(i) for i in range(len(data))]
    seen, repeated = set(), []
    for i in ids:
        if i in seen:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise ValueError(f"{what}: column {id_column or '(row index)'} repeats prompt ids, e.g. {repeated[:5]}; "
                         "a prompt must have one response per side (pick another --*_id_column or --*_column)")
    prompts = data[args.prompt_column] if args.prompt_column in data.column_names else [None] * len(ids)
    return dict(zip(ids, zip(data[column], prompts))), what


def join(args):
    """The pairs to judge, in A's order (the first --limit), with the counts the summary reports."""
    a, a_what = load_side(args.a, args.a_split, args.a_column, args.a_id_column, "a", args)
    b, b_what = load_side(args.b, args.b_split, args.b_column, args.b_id_column, "b", args)
    missing = [i for i in a if i not in b]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(a)} prompt ids of {a_what} are not in {b_what}, e.g. "
                         f"{missing[:5]}; B's ids look like {list(b)[:3]}. Join columns: --a_id_column "
                         f"{args.a_id_column} --b_id_column {args.b_id_column} (None: the row index)")
    ids = list(a)[:args.limit] if args.limit is not None else list(a)
    pairs = []
    for i in ids:
        (a_response, a_prompt), (b_response, b_prompt) = a[i], b[i]
        if args.check_prompts and a_prompt is not None and b_prompt is not None and \
                prompt_text(a_prompt, args.template) != prompt_text(b_prompt, args.template):
            raise ValueError(f"prompt id {i}: column {args.prompt_column} differs between {a_what} "
                             f"({prompt_text(a_prompt, args.template)[:60]!r}) and {b_what} "
                             f"({prompt_text(b_prompt, args.template)[:60]!r}): the join pairs different prompts "
                             "(--no_check_prompts judges anyway, showing --prompt_from's)")
        prompt = prompt_text(a_prompt if args.prompt_from == "a" else b_prompt, args.template)
        pairs.append({"id": i, "prompt": prompt, "a": response_text(a_response), "b": response_text(b_response)})
    return pairs, {"a_prompts": len(a), "b_prompts": len(b), "b_not_in_a": len(set(b) - set(a))}


# ----------------------------------------------------------------------------------------------------------------
# the judges: each is a function from a list of judge prompts to the list of answers


def select_backend(args):
    import importlib.util

    import torch

    if args.backend == "http" and not args.judge_url:
        raise SystemExit("--backend http needs --judge_url (the endpoint's base address)")
    if args.judge_url and args.backend in ("hf", "vllm"):
        raise SystemExit(f"--judge_url is given but --backend {args.backend}: pass one or the other")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if args.backend == "vllm" and not has_vllm:
        raise SystemExit("--backend vllm: vLLM is not installed (pip install -r requirements-vllm.txt on a GPU "
                         "machine); --backend hf runs the judge through transformers")
    if args.backend != "auto":
        return args.backend, "asked for"
    if args.judge_url:
        return "http", "--judge_url given"
    has_gpu = torch.cuda.is_available()
    backend = "vllm" if has_vllm and has_gpu else "hf"
    return backend, f"vLLM {'installed' if has_vllm else 'not installed'}, GPU {'present' if has_gpu else 'absent'}"


def encode_questions(tokenizer, questions):
    """Token ids of each question as one user turn of the judge's chat template, ready for its answer."""
    rendered = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in questions],
                                             add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def local_judge(args, backend, questions_for_check):
    """A transformers or vLLM judge (greedy). Its tokenizer is checked before the weights load: a chat template, and
    room in the model's context for the longest question and --max_new_tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = generate.load_tokenizer(args.judge_model, "--judge_model", needs_eos=False)
    if not tokenizer.chat_template:
        raise SystemExit(f"--judge_model {args.judge_model}: its tokenizer has no chat template; the judge must be a "
                         "chat model")
    longest = max(len(ids) for ids in encode_questions(tokenizer, questions_for_check))
    context = getattr(AutoConfig.from_pretrained(args.judge_model), "max_position_embeddings", None)
    if context is not None and longest + args.max_new_tokens > context:
        raise SystemExit(f"--judge_model {args.judge_model}: the longest question is {longest} tokens; with "
                         f"--max_new_tokens {args.max_new_tokens} it exceeds the model's context of {context}")
    stop_ids = generate.stop_token_ids(tokenizer, args.judge_model)
    if backend == "vllm":
        if not torch.cuda.is_available() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # vLLM's CPU default fails
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
            print("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE is not set, using 4 (GiB of KV cache); set it to change")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=args.judge_model, tensor_parallel_size=args.tensor_parallel_size, seed=0,
                  gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
        params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, stop_token_ids=stop_ids,
                                skip_special_tokens=True)

        def complete(questions):
            encoded = encode_questions(tokenizer, questions)
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params, use_tqdm=False)
            return [out.outputs[0].text + ("\n" + CUT_OFF if out.outputs[0].finish_reason == "length" else "")
                    for out in outputs]
        return complete

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.judge_model, dtype=dtype).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def complete(questions):
        encoded = encode_questions(tokenizer, questions)
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))  # similar lengths batched together
        answers = [None] * len(encoded)
        for start in range(0, len(order), args.batch_size):
            batch = [encoded[i] for i in order[start:start + args.batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, top_p=None, top_k=None,
                                     temperature=None, max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids,
                                     pad_token_id=pad_id)
            for i, row in zip(order[start:start + args.batch_size], out[:, width:].tolist()):
                ended = any(t in stop_ids for t in row)
                answers[i] = tokenizer.decode(generate.cut_at_stop(row, stop_ids), skip_special_tokens=True) + (
                    "" if ended else "\n" + CUT_OFF)
            print(f"judged {min(start + args.batch_size, len(order))}/{len(order)} answers", flush=True)
        return answers
    return complete


def chat_url(url):
    """The chat-completions address of an endpoint given by its base or in full."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint, through urllib. The key lives in this object only: it is never
    printed, and any error text the endpoint sends back has it masked."""

    def __init__(self, args):
        self.url, self.args = chat_url(args.judge_url), args
        self.key = os.environ.get(args.judge_api_key_env) or None
        if self.key is None:
            print(f"http: ${args.judge_api_key_env} is not set: requests go without an Authorization header")

    def redact(self, text):
        return text.replace(self.key, "***") if self.key else text

    def request(self, content, max_tokens):
        body = json.dumps({"model": self.args.judge_model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = None
        for attempt in range(self.args.retries + 1):
            if attempt:
                time.sleep(last[1])
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data=body, headers=headers),
                                            timeout=self.args.timeout) as response:
                    return self.answer(response.read())
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read().decode(errors="replace")[:300])
                if e.code != 429 and e.code < 500:
                    raise SystemExit(f"--judge_url {self.url}: HTTP {e.code} {e.reason}: {detail}") from None
                wait = self.args.backoff * 2 ** attempt
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                if retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, min(float(retry_after), 60.0))
                last = (f"HTTP {e.code} {e.reason}: {detail}", wait)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = (f"{type(e).__name__}: {self.redact(str(reason))}", self.args.backoff * 2 ** attempt)
        raise SystemExit(f"--judge_url {self.url}: no answer after {self.args.retries + 1} tries (last: {last[0]}); "
                         f"check the address, the server and --judge_model {self.args.judge_model}")

    def answer(self, raw):
        try:
            choice = json.loads(raw)["choices"][0]
            content, cut = choice["message"]["content"], choice.get("finish_reason") == "length"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise SystemExit(f"--judge_url {self.url}: not a chat-completions answer (no choices[0].message.content): "
                             f"{self.redact(raw[:300].decode(errors='replace'))}") from None
        return (content or "") + ("\n" + CUT_OFF if cut else "")  # no text (a refusal), or cut off: unparseable

    def probe(self):
        """One small request, before any judging: an endpoint that is down, refuses the key or the model fails here."""
        self.request("Reply with the single letter A.", 8)

    def __call__(self, questions):
        answers = [None] * len(questions)
        pool = concurrent.futures.ThreadPoolExecutor(self.args.num_workers)
        futures = {pool.submit(self.request, q, self.args.max_new_tokens): i for i, q in enumerate(questions)}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                answers[futures[future]] = future.result()
                if done % max(1, len(questions) // 10) == 0 or done == len(questions):
                    print(f"judged {done}/{len(questions)} answers", flush=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the requests not yet sent
        return answers


# ----------------------------------------------------------------------------------------------------------------


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(args: Args, complete=None):
    """Judge A against B. `complete` replaces the judge (tests pass a scripted one)."""
    generate.check_numbers(args, positive=("max_new_tokens", "timeout", "num_workers", "batch_size"),
                           non_negative=("retries", "backoff"))
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    for side in ("a", "b"):
        parse_where(getattr(args, f"{side}_where"), f"--{side}_where")
    summary_path = os.path.join(args.output_dir, "summary.json")
    if os.path.exists(summary_path) and not args.overwrite:
        raise SystemExit(f"--output_dir {args.output_dir} holds a finished judgment ({summary_path}); pass "
                         "--overwrite to replace it, or another --output_dir")
    pairs, counts = join(args)
    backend = "given"
    if complete is None:
        backend, reason = select_backend(args)
        print(f"backend: {backend} ({reason})")
        if backend == "http":
            complete = HttpJudge(args)
            complete.probe()
            print(f"http: {complete.url} answers")
        else:
            sample = [render(args.template, p["prompt"], p["a"], p["b"]) for p in pairs]
            complete = local_judge(args, backend, sample)
    print(f"judging {len(pairs)} prompts of {args.a} against {args.b}, both orders: {2 * len(pairs)} answers")
    records = judge_pairs(pairs, args.template, complete)
    summary = {**summarize(records), **counts, "backend": backend, "args": asdict(args)}
    os.makedirs(args.output_dir, exist_ok=True)
    write_atomically(os.path.join(args.output_dir, "judgments.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomically(summary_path, json.dumps(summary, indent=2) + "\n")  # last: its presence means finished
    print(describe(summary))
    print(f"wrote {summary_path} and judgments.jsonl")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
