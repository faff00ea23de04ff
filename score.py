"""Score every response of generate.py's output with a reward model: adds `response_{i}_reward` columns.

Any reward model that loads with `AutoModelForSequenceClassification` works: ArmoRM (`--trust_remote_code`; its
output carries `.score`), ordinary ones (the reward is `logits[:, 0]`), and the model from reward_sst2.py. Chat reward
models read `[user prompt, assistant response]` through their own chat template (BOS written by the template, not
added a second time); `--prompt_format text` scores prompt + response as plain text (the SST-2 example), with
`--reward_with_eos` followed by the reward tokenizer's EOS (the REBEL paper's TL;DR reward models read rewards there).

`--reward_fn path/to/file.py:function` replaces the reward model with a Python function (verifiable answers, rules, a
remote judge): `function(prompts, responses, **columns) -> list[float]`, called once per shard on every (prompt,
response_i) pair of its rows, flattened row by row, with each of the data's other columns (e.g. `answer`, repeated for
the row's responses) as a keyword argument. It gets the same checks as a reward model: one finite number per response.

Sequences are sorted by length and scored in batches, right-padded with the reward model's pad id (bf16 on GPU). A
start-up check compares a few batched rewards with one-at-a-time rewards, so a model whose pooling mishandles padding
fails loudly instead of scoring wrongly. Under torchrun, shards of rows go round-robin to the ranks. A non-finite
reward, and an empty prompt, are errors naming the row. Shards are written to `<output_dir>.partial/` as they
finish: the same command run again after a crash skips them and produces the same output as an uninterrupted run; if
the input dataset or the reward model's weights changed in the meantime, it stops instead of mixing old and new work.

    python score.py --reward_model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust_remote_code --dataset runs/generate
    torchrun --nproc_per_node 8 score.py --reward_model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust_remote_code ...
    python score.py --reward_model runs/reward_sst2 --prompt_format text --dataset runs/generate_sst2
    python score.py --reward_fn data/arith/reward.py:exact_answer --dataset runs/generate_arith   # a function

Documentation: docs/generate-score-filter.md
"""

import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import torch
import torch.distributed as dist
import tyro
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    reward_model: str = "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    """the reward model (hub id or local folder), with its tokenizer; not used when --reward_fn is given"""
    reward_fn: str | None = None
    """a reward function instead of a reward model: `path/to/file.py:function`, called as
    function(prompts, responses, **columns) -> list[float] (columns: the data's other columns, e.g. answer)"""
    trust_remote_code: bool = False
    """allow the reward model's own code (ArmoRM needs it)"""
    dataset: str = "runs/generate"
    """generate.py's output (or any dataset with prompt and response_i columns)"""
    split: str = "train"
    """split to score"""
    prompt_column: str = "prompt"
    """column holding the prompt (a string or chat messages)"""
    prompt_format: Literal["chat", "text"] = "chat"
    """chat: [user prompt, assistant response] through the reward model's chat template; text: prompt + response"""
    reward_with_eos: bool = False
    """text: the reward model reads prompt + response + its tokenizer's EOS, so the reward is read at that EOS, as
    summarize_from_feedback_details' and REBEL's TL;DR reward models were trained and are read (docs/tldr.md); off:
    prompt + response text (generate.py's response_i columns hold the text without the stop token). The text does
    not say whether a response ended, so every response gets the EOS; filter.py never uses the reward of one that
    did not end. Refused with --prompt_format chat, with --reward_fn, and with a reward model whose pad token (its
    config.pad_token_id, else its tokenizer's) is that EOS (its classifier would skip the EOS)"""
    output_dir: str = "runs/score"
    """the output dataset folder (written atomically; `<output_dir>.partial` holds the shards meanwhile)"""
    overwrite: bool = False
    """replace an existing output folder and discard partial work"""
    push_to_hub: str | None = None
    """also push the dataset to this hub repo id"""
    local_micro_batch_size: int = 8
    """sequences per forward pass on one rank"""
    shard_size: int = 1000
    """rows per shard, the unit of work that is written to disk and skipped when resuming"""
    attn_implementation: str = "sdpa"
    """attention kernel (eager for custom models that lack sdpa)"""
    progress: bool = True
    """show progress on rank 0 (shard k of N of rank 0's shards, rate, time left): a bar on a terminal, a line every
    minute in a log file; --no_progress turns it off"""


# ----------------------------------------------------------------------------------------------------------------
# scoring


def response_columns(dataset, what):
    """The response_i text columns, checked to be response_0 ... response_{n-1}."""
    indices = sorted(int(m.group(1)) for c in dataset.column_names if (m := re.fullmatch(r"response_(\d+)", c)))
    if not indices:
        raise ValueError(f"{what}: no response_0 ... columns; it has {dataset.column_names}")
    if indices != list(range(len(indices))):
        raise ValueError(f"{what}: response columns are not numbered 0 ... {len(indices) - 1}: {indices}")
    return [f"response_{i}" for i in indices]


def load_reward_fn(spec, arg="--reward_fn"):
    """The function named by `path/to/file.py:function`, imported from that file (errors name the argument)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"{arg} {spec}: expected path/to/file.py:function")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg} {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_fn_{os.path.splitext(os.path.basename(path))[0]}",
                                                         path)
    if module_spec is None:
        raise ValueError(f"{arg} {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{arg} {spec}: importing {path} failed ({type(e).__name__}: {e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{arg} {spec}: {path} has no function {name!r}; it defines {defined}")
    return fn


def call_reward_fn(fn, prompts, responses, columns, arg):
    """fn(prompts, responses, **columns) as a list of floats, one per response (the count and types checked)."""
    rewards = fn(list(prompts), list(responses), **columns)
    try:
        rewards = [float(r) for r in rewards]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: must return a list of numbers, one per response; got {str(rewards)[:200]} "
                         f"({type(e).__name__}: {e})") from None
    if len(rewards) != len(responses):
        raise ValueError(f"{arg}: returned {len(rewards)} rewards for {len(responses)} responses")
    return rewards


def function_rewards(fn, dataset, shard, columns, args):
    """The rows of one shard and the reward function's value for every (prompt, response_i) of them, row by row."""
    rows = range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(dataset)))
    part = dataset.select(rows)
    n = len(columns)
    prompts = [p for p in part[args.prompt_column] for _ in columns]
    responses = [row[c] for row in part.select_columns(columns) for c in columns]
    skip = {args.prompt_column, *columns, *(f"{c}_token_ids" for c in columns)}
    extra = {name: [v for v in part[name] for _ in range(n)] for name in part.column_names if name not in skip}
    return rows, call_reward_fn(fn, prompts, responses, extra, f"--reward_fn {args.reward_fn}")


def encode_pairs(prompts, responses, tokenizer, args):
    """Token ids of every (prompt, response) as the reward model reads it. A chat template writes BOS itself, so its
    output is tokenized without special tokens (no second BOS)."""
    if args.prompt_format == "text":
        encoded = tokenizer([str(p) + str(r) for p, r in zip(prompts, responses)]).input_ids
        if not args.reward_with_eos:
            return encoded
        eos = tokenizer.eos_token_id  # appended unless the tokenizer already ends its encodings with it
        return [ids if ids[-1:] == [eos] else ids + [eos] for ids in encoded]
    if not tokenizer.chat_template:
        raise ValueError(f"--reward_model {args.reward_model}: its tokenizer has no chat template; pass "
                         "--prompt_format text to score plain prompt + response text")
    conversations = [([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
                     + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def shard_sequences(dataset, shard, columns, tokenizer, args):
    """The rows of one shard and the token ids of their (prompt, response_i) pairs, row by row."""
    rows = range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(dataset)))
    part = dataset.select(rows)
    prompts = [p for p in part[args.prompt_column] for _ in columns]
    responses = [row[c] for row in part.select_columns(columns) for c in columns]
    return rows, encode_pairs(prompts, responses, tokenizer, args)


@torch.no_grad()
def reward_batch(model, sequences, pad_id, device):
    """Rewards of token lists, right-padded: `.score` (ArmoRM-style) or `logits[:, 0]`, in fp32."""
    width = max(len(x) for x in sequences)
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in sequences], device=device)
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in sequences], device=device)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return (out.score if hasattr(out, "score") else out.logits[:, 0]).float().reshape(-1).tolist()


def score_sequences(model, sequences, pad_id, batch_size, device):
    """Rewards of sequences scored in batches of similar length (longest first), returned in input order."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    rewards = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, r in zip(chunk, reward_batch(model, [sequences[i] for i in chunk], pad_id, device)):
            rewards[i] = r
    return rewards


def check_reward_with_eos_setting(args, reward_fn, tokenizer=None, config=None, pad_id=None):
    """--reward_with_eos, checked before the model is loaded: text prompts, a reward model (not --reward_fn), and, once
    its tokenizer and config are read, an EOS that is not the pad token the model's pooling skips (its
    config.pad_token_id, else the tokenizer's pad, `pad_id`): transformers' sequence classifiers read the last token
    that is not the pad token, so a final EOS equal to it would be skipped silently and the reward read one token
    early."""
    if not args.reward_with_eos:
        return
    if args.prompt_format == "chat":
        raise SystemExit("--reward_with_eos is for --prompt_format text: a chat template already ends the assistant's "
                         "turn with its end-of-turn token; leave it off")
    if reward_fn is not None:
        raise SystemExit(f"--reward_with_eos gives a reward model the response's EOS; --reward_fn {args.reward_fn} "
                         "gets the response as text: leave it off")
    if tokenizer is None:
        return
    what = f"--reward_with_eos: --reward_model {args.reward_model}"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SystemExit(f"{what}: its tokenizer has no EOS token to end the response with")
    configured = getattr(config, "pad_token_id", None)
    if (configured if configured is not None else pad_id) == eos:
        where = f"its config.pad_token_id is {configured}" if configured is not None else \
            "its tokenizer has no pad token of its own (it pads with EOS)"
        raise SystemExit(f"{what}: {where}, the EOS {tokenizer.eos_token!r} (id {eos}), so the model, which reads the "
                         "last token that is not the pad token, would skip the EOS. Give it a pad token of its own "
                         "inside the model's embeddings, in the tokenizer and config.pad_token_id "
                         "(tools/convert_sfd_reward.py adds [PAD]), or leave the flag off")


def check_padding(model, sequences, pad_id, device):
    """Batched rewards must equal one-at-a-time rewards, or the model's pooling reads the wrong token: checked on the
    two shortest and two longest of the first 64 sequences, scored together."""
    sample = sorted(sequences[:64], key=len)
    sample = sample[:2] + sample[-2:]
    if len({len(x) for x in sample}) < 2:
        return
    batched = reward_batch(model, sample, pad_id, device)
    single = [reward_batch(model, [x], pad_id, device)[0] for x in sample]
    tolerance = 0.05 if next(model.parameters()).dtype == torch.bfloat16 else 1e-3
    if any(abs(a - b) > tolerance * max(1.0, abs(b)) for a, b in zip(batched, single)):
        raise SystemExit(f"--reward_model {model.name_or_path}: rewards change with right padding (pad id {pad_id}): "
                         f"batched {batched} vs one at a time {single}; its pooling does not find the last real "
                         "token. Pass --local_micro_batch_size 1")


def main(args: Args):
    check_numbers(args, positive=["local_micro_batch_size", "shard_size"])
    rank, world_size, device = init_distributed()
    check_data_output_dir(args)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    check_reward_with_eos_setting(args, reward_fn)
    tokenizer = None if reward_fn else load_tokenizer(args.reward_model, "--reward_model", needs_eos=False)
    if rank == 0:
        print(f"rewards from {f'the function --reward_fn {args.reward_fn}' if reward_fn else args.reward_model}")

    # 1. inputs, tokenized and checked before the model is loaded
    dataset = load_split(args.dataset, args.split, "--dataset")
    require_columns(dataset, [args.prompt_column], f"--dataset {args.dataset} split {args.split}")
    columns = response_columns(dataset, f"--dataset {args.dataset}")
    empty = [i for i, p in enumerate(dataset[args.prompt_column]) if is_empty_prompt(p)]
    if empty:
        prompt_id = dataset[empty[0]].get("prompt_id", empty[0])
        raise ValueError(f"--dataset {args.dataset} split {args.split}: row {empty[0]} (prompt_id {prompt_id}) has an "
                         f"empty prompt ({len(empty)} such rows); generate.py drops empty prompts: regenerate, or "
                         "remove those rows")
    n, num_shards = len(columns), (len(dataset) + args.shard_size - 1) // args.shard_size
    pad_id = None
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not reward_fn:
        config = AutoConfig.from_pretrained(args.reward_model, trust_remote_code=args.trust_remote_code)
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        check_reward_with_eos_setting(args, reward_fn, tokenizer, config, pad_id)
    for shard in range(0 if reward_fn else num_shards):  # lengths only: the ids are made again when scoring
        rows, sequences = shard_sequences(dataset, shard, columns, tokenizer, args)
        too_long = [i for i, x in enumerate(sequences) if limit and len(x) > limit]
        if too_long:
            row, k = divmod(too_long[0], n)
            raise ValueError(f"--dataset {args.dataset}: row {rows[0] + row} response_{k} is "
                             f"{len(sequences[too_long[0]])} tokens with the prompt, more than the reward model's "
                             f"{limit} ({len(too_long)} such sequences in rows {rows[0]}-{rows[-1]})")
    lock = lock_output_dir(args.output_dir, rank)  # noqa: F841 (held until the run ends)
    check_data_output_dir(args)  # again: a run on the same folder may have finished meanwhile
    if reward_fn:  # the function's source file identifies it
        with open(args.reward_fn.rsplit(":", 1)[0], "rb") as f:
            scorer = {f"--reward_fn {args.reward_fn}": hashlib.sha256(f.read()).hexdigest()}
    else:
        scorer = {f"--reward_model {args.reward_model}": weights_identity(args.reward_model)}
    partial = open_partial(args, rank, {f"--dataset {args.dataset}": dataset._fingerprint, **scorer})

    # 2. shards of rows, round-robin over ranks; finished ones are skipped
    todo = [s for s in range(rank, num_shards, world_size) if not os.path.exists(shard_file(partial, s))]
    if rank == 0:
        done = sum(os.path.exists(shard_file(partial, s)) for s in range(num_shards))
        print(f"{len(dataset)} rows x {n} responses in {num_shards} shards; {done} done by an earlier run")
    if todo and not reward_fn:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                args.reward_model, dtype=dtype, trust_remote_code=args.trust_remote_code,
                attn_implementation=args.attn_implementation)
        except OSError as e:
            raise SystemExit(f"--reward_model {args.reward_model}: cannot load it ({e})") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id
        model.to(device).eval()
        if args.local_micro_batch_size > 1:
            check_padding(model, shard_sequences(dataset, todo[0], columns, tokenizer, args)[1], pad_id, device)
    progress = Progress(len(todo), 0, "shard", rank == 0 and args.progress)
    for done, shard in enumerate(todo, 1):
        if reward_fn:
            rows, rewards = function_rewards(reward_fn, dataset, shard, columns, args)
        else:
            rows, sequences = shard_sequences(dataset, shard, columns, tokenizer, args)
            rewards = score_sequences(model, sequences, pad_id, args.local_micro_batch_size, device)
        for j, reward in enumerate(rewards):
            if not math.isfinite(reward):
                row, k = divmod(rows[0] * n + j, n)
                prompt_id = dataset[row].get("prompt_id", row)
                raise ValueError(f"non-finite reward {reward} for row {row} (prompt_id {prompt_id}) response_{k} "
                                 f"{dataset[row][columns[k]][:80]!r}")
        write_shard(shard_file(partial, shard), [{"row": r, "rewards": rewards[(r - rows[0]) * n:(r - rows[0] + 1) * n]}
                                                 for r in rows])
        progress.write(f"[rank {rank}] shard {shard + 1}/{num_shards} written")
        progress.update(done)
    progress.close()

    # 3. gather in row order, save atomically
    barrier()
    if rank == 0:
        rewards = read_shards(partial, num_shards, "row")["rewards"]
        for k, column in enumerate(columns):
            dataset = dataset.add_column(f"{column}_reward", [r[k] for r in rewards])
        save_dataset_atomically(dataset, args)
        shutil.rmtree(partial)
        print(f"wrote {len(dataset)} rows with {n} reward columns to {args.output_dir}")
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# infrastructure shared, as identical copies, by the data stages: TRY NOT TO MODIFY in one script alone
# (tests/test_shared_helpers.py checks that the copies agree: change every copy, or none)


def init_distributed():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE and gets a process group, even with one process (FSDP2 needs one); a
    plain `python script.py` is one process without one. gloo on CPU, nccl on GPU. The CPU is used where there is no
    GPU; a machine with an NVIDIA GPU that torch cannot use (a driver older than the CUDA of torch's build, a CPU-only
    torch) stops here, naming the problem, instead of training on the CPU: CUDA_VISIBLE_DEVICES="" runs it on the CPU
    on purpose."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if device.type == "cpu" and os.path.exists("/dev/nvidiactl") and not hidden:
        try:
            torch.cuda.init()
            reason = "no CUDA device visible"
        except Exception as e:  # torch's own words: no driver, driver too old, not compiled with CUDA
            reason = str(e).strip().splitlines()[0]
        raise SystemExit(f"this machine has an NVIDIA GPU (/dev/nvidiactl) but torch {torch.__version__} (CUDA "
                         f"{torch.version.cuda or 'none: a CPU-only build'}) cannot use it: {reason}. Install a torch "
                         "build whose CUDA the driver supports (nvidia-smi shows the driver's highest CUDA version) or "
                         "update the driver; to run on the CPU on purpose, set CUDA_VISIBLE_DEVICES=''")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # dcp in one process
    return rank, world_size, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def load_split(path, split, arg):
    """One split of a hub dataset, a `save_to_disk` folder, a folder of data files (split from file names), or a
    single .jsonl/.json/.csv/.parquet file (which holds only the split "train"). `arg` names the argument in errors,
    with the file and line of a local text file that is not UTF-8 or not JSON (datasets would show a traceback)."""
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in builders):
        raise FileNotFoundError(f"{arg} {path}: no such file or folder")
    if os.path.isfile(path) and os.path.splitext(path)[1] not in builders:
        raise ValueError(f"{arg} {path}: expected a .jsonl, .json, .csv or .parquet file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{arg} {path}: the file is empty")
    saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    files = [path] if os.path.isfile(path) else [] if saved or not os.path.isdir(path) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    text_files = [f for f in files if os.path.splitext(f)[1] in (".jsonl", ".json", ".csv")]
    for file in text_files:
        check_text_file(file, arg)
    try:
        if os.path.isfile(path):
            builder = builders[os.path.splitext(path)[1]]
            splits = {"train": datasets.load_dataset(builder, data_files=path, split="train")}
        elif saved:
            loaded = datasets.load_from_disk(path)
            splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            splits = datasets.load_dataset(path)
    except (IndexError, StopIteration) as e:  # how datasets fails on a saved dataset without rows
        raise ValueError(f"{arg} {path}: no rows (datasets cannot read it: {type(e).__name__})") from None
    except datasets.exceptions.DatasetGenerationError as e:
        for file in text_files:
            check_text_file(file, arg, parse_json=True)
        cause = e.__cause__ or e
        raise ValueError(f"{arg} {path}: datasets cannot read it ({type(cause).__name__}: {cause})") from None
    if split not in splits:
        raise ValueError(f"{arg} {path}: no split {split!r}; it has {sorted(splits)}")
    return splits[split]


def check_text_file(path, arg, parse_json=False):
    """A .jsonl/.json/.csv data file must be UTF-8 and, with parse_json (after datasets failed on it), a .jsonl or
    .json file valid JSON Lines or one JSON document: the first offence is an error naming the file and line."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{arg} {path} line {number}: not UTF-8 text (byte {line[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
    if not parse_json or path.endswith(".csv"):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    try:  # JSON Lines when the first line is a JSON value of its own, else one document (e.g. a list of rows)
        json.loads(next((line for line in lines if line.strip()), ""))
    except json.JSONDecodeError:
        lines = [text]
    for number, line in enumerate(lines, start=1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{arg} {path} line {e.lineno if len(lines) == 1 else number}: not valid JSON ({e.msg} "
                             f"at column {e.colno})") from None


def require_columns(dataset, columns, what):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{what}: no rows")


def is_empty_prompt(prompt):
    """A prompt with no text: None, a blank string, or chat messages whose contents are all blank."""
    if isinstance(prompt, list):
        return all(isinstance(m, dict) and not str(m.get("content") or "").strip() for m in prompt)
    return prompt is None or (isinstance(prompt, str) and not prompt.strip())


def load_tokenizer(path, arg="--model_name_or_path", needs_eos=True):
    """The tokenizer at `path`, checked before any model is loaded: it must have an EOS token where the script ends
    sequences with it (needs_eos), else at least a pad or EOS token to pad batches with."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{arg} {path}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None
    if needs_eos and tokenizer.eos_token_id is None:
        raise SystemExit(f"{arg} {path}: its tokenizer has no EOS token (eos_token is None), which ends every sequence "
                         "here; set one (tokenizer.eos_token = ...; tokenizer.save_pretrained(...))")
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise SystemExit(f"{arg} {path}: its tokenizer has neither a pad nor an EOS token to pad batches with; set "
                         "one (tokenizer.pad_token = ...; tokenizer.save_pretrained(...))")
    return tokenizer


def check_numbers(args, positive=(), non_negative=(), fraction=()):
    """Numeric arguments in their valid range, checked before anything is written: `positive` > 0, `non_negative` >= 0,
    `fraction` in [0, 1]. Names may be dotted (task.maxlen); a field left at None (computed later) is not checked."""
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")]
    for names, ok, expected in rules:
        for name in names:
            value = args
            for part in name.split("."):
                value = getattr(value, part)
            if value is not None and not (ok(value) and not math.isnan(value)):
                raise ValueError(f"--{name} must be {expected}, got {value}")


def lock_output_dir(output_dir, rank):
    """One run per output folder: rank 0 holds an exclusive lock on `.<name>.lock` beside the folder for the life of the
    process (the OS releases it however the process ends, SIGKILL included). A second run on the same folder is
    refused, naming the holder. Returns the open lock file, to be kept referenced until the run ends."""
    output_dir = os.path.normpath(output_dir)
    path = os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.lock")
    handle, holder = None, None
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                         f"{' '.join(sys.argv)}\n")
            handle.flush()
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its name yet"
            handle.close()
    if dist.is_initialized():
        box = [holder]
        dist.broadcast_object_list(box, src=0)
        holder = box[0]
    if holder is not None:
        raise SystemExit(f"--output_dir {output_dir} is in use by another run ({holder}; lock file {path}). Wait for "
                         "it to end or stop it, or pass another --output_dir")
    return handle


def check_data_output_dir(args):
    """A finished output is never overwritten without --overwrite (it is written last, atomically)."""
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise FileExistsError(f"--output_dir {args.output_dir} already holds a finished dataset; pass another "
                              "--output_dir or --overwrite")


def open_partial(args, rank, inputs):
    """`<output_dir>.partial/`, where shards accumulate. Work left there by the same command on the same inputs is
    reused; work left by other arguments, or made from an input that changed since (`inputs`: "--argument value" ->
    identity, a dataset's fingerprint or a model's `weights_identity`), is an error rather than a silent mix."""
    partial = args.output_dir.rstrip("/") + ".partial"
    recorded = os.path.join(partial, "args.json")
    settings = {k: v for k, v in asdict(args).items() if k not in ("overwrite", "push_to_hub", "progress")}
    settings["output_dir"] = os.path.normpath(args.output_dir)  # runs/x/ is runs/x
    barrier()
    if rank == 0:
        if args.overwrite:
            shutil.rmtree(partial, ignore_errors=True)
        if os.path.exists(recorded):
            with open(recorded) as f:
                before = json.load(f)
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            if changed:
                raise ValueError(f"{partial} holds partial work made with other arguments ({', '.join(changed)}); "
                                 "rerun the same command, or pass --overwrite to discard it")
            for name, identity in inputs.items():
                if before.get("inputs", {}).get(name) != identity:
                    raise ValueError(f"the input {name} changed since the partial work in {partial} was made "
                                     f"(identity {before.get('inputs', {}).get(name)} -> {identity}): its finished "
                                     "shards belong to the old input. Restore that input, or pass --overwrite to "
                                     "discard the partial work and redo it")
        os.makedirs(partial, exist_ok=True)
        with open(recorded, "w") as f:
            json.dump({**settings, "inputs": inputs}, f, indent=2)
    barrier()
    return partial


def weights_identity(path):
    """A cheap identity of a model: for a local folder, a sha256 over each top-level file's name, size, first and last
    MiB (config, tokenizer and other small files whole; multi-GB weights are not read whole, but weights replaced in
    place differ in size or in those bytes); for a hub id, the commit of its cached snapshot (None if not cached)."""
    if not os.path.isdir(path):
        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a hub id either
            return None
        return f"commit {os.path.basename(os.path.dirname(cached))}" if isinstance(cached, str) else None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(file):
            continue
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(1 << 20)
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f"{name}\0{size}\0".encode() + head + f.read())
    return f"sha256 {digest.hexdigest()[:16]}"


class Progress:
    """k of N (updates, or shards), the rate and the time left, on the ranks it is enabled on (rank 0): a tqdm bar
    when stderr is a terminal, otherwise (a log file, CI, a cluster's output) a plain line on stderr at most every
    `every` seconds and at the end; nothing when disabled (--no_progress). Lines printed through `write` keep the
    bar intact."""

    every = 60.0

    def __init__(self, total, done, unit, enabled, stream=None):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start, self.start_done, self.last, self.bar = time.time(), done, time.time(), None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, file=self.stream, dynamic_ncols=True)

    @staticmethod
    def clock(seconds):
        if not math.isfinite(seconds):
            return "?"
        minutes, seconds = divmod(int(seconds), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"

    def line(self, done, now):
        elapsed = now - self.start
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        speed = f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}" if rate else "-"
        left = (self.total - done) / rate if rate else math.inf
        return (f"{self.unit} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), {speed}, "
                f"elapsed {self.clock(elapsed)}, left {self.clock(left)}")

    def update(self, done):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.time()
        if done >= self.total or now - self.last >= self.every:
            self.last = now
            print(f"progress: {self.line(done, now)}", file=self.stream, flush=True)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def shard_file(partial, shard):
    return os.path.join(partial, f"shard_{shard:06d}")


def write_shard(path, rows):
    """A finished shard: a `save_to_disk` folder, renamed into place once complete."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    datasets.Dataset.from_list(rows).save_to_disk(path + ".tmp")
    os.replace(path + ".tmp", path)


def read_shards(partial, num_shards, key):
    """Every shard as one memory-mapped dataset, in the order of column `key` (which is then dropped)."""
    shards = datasets.concatenate_datasets([datasets.load_from_disk(shard_file(partial, s)) for s in range(num_shards)])
    keys = shards[key][:]
    return shards.select(sorted(range(len(keys)), key=keys.__getitem__)).remove_columns(key)


def save_dataset_atomically(dataset, args, extra_files=None):
    """save_to_disk into a temporary folder, add args.json (and extra json files), then rename it into place."""
    tmp = args.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(tmp)
    for name, content in {"args.json": asdict(args), **(extra_files or {})}.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    if args.overwrite:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    os.replace(tmp, args.output_dir)
    if args.push_to_hub:
        dataset.push_to_hub(args.push_to_hub)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
