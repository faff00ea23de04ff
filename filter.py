"""Turn scored generations into REBEL's training pairs: the last data stage before rebel.py.

Rules, applied in this order and each counted: a prompt longer than `maxlen_prompt` tokens drops its row; a response
that never reached a stop token (it was cut at generate.py's maxlen) drops its row; a response longer than `maxlen`
tokens, its end-of-turn token included, drops its row (`--unfinished drop_response` instead leaves such responses out of
the choice below and keeps the row while two remain). Lengths count each response's own token ids (generate.py's
`response_{i}_token_ids`; or, for data without them, the tokenized text plus the end-of-turn token), never "the
templated text minus a fixed number of tokens". Of the rows left, the best response (argmax reward) becomes `chosen`
and the worst (argmin) `reject`; a row whose chosen and reject text are identical is dropped. Non-finite rewards and
empty prompts (generate.py drops those) are errors naming the row.

Layout, so that the prompt and the response meet in the middle: `prompt_input_ids` left-padded to `maxlen_prompt`,
`chosen_input_ids` and `reject_input_ids` right-padded to `maxlen`, each response ending with the stop token that was
sampled (the end-of-turn token of the chat template, `<|eot_id|>` for Llama-3-Instruct, even where the tokenizer's
EOS is `<|end_of_text|>`; a response that stopped on another stop token keeps it, so rebel.py trains on what the
policy sampled, and the count is reported), with explicit attention masks and a pad id that exists in the model's
embedding table. Output: a `save_to_disk` DatasetDict with `train` and `test` splits,
`args.json`, and `filter_stats.json` (what each rule dropped).

    python filter.py --dataset runs/score --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct

Documentation: docs/generate-score-filter.md
"""

import fcntl
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import torch.distributed as dist
import tyro
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

OUTPUT_COLUMNS = ["prompt_id", "prompt", "chosen", "reject", "chosen_reward", "reject_reward", "prompt_input_ids",
                  "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "reject_input_ids",
                  "reject_attention_mask"]


@dataclass
class Args:
    dataset: str = "runs/score"
    """score.py's output: prompt, response_i, response_i_reward (and generate.py's token id columns)"""
    split: str = "train"
    """split to filter"""
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """the policy rebel.py will train: its tokenizer (end-of-turn and pad ids) and config (embedding size)"""
    prompt_column: str = "prompt"
    """column holding the prompt (only tokenized here when the data has no prompt_token_ids)"""
    prompt_format: Literal["chat", "text"] = "chat"
    """how to tokenize prompts when the data has no prompt_token_ids: chat template or raw text"""
    maxlen_prompt: int = 1024
    """longest prompt kept, in tokens; prompts are left-padded to it"""
    maxlen: int = 2048
    """longest response kept, in tokens with its end-of-turn token; responses are right-padded to it"""
    test_size: float = 1000
    """rows held out for rebel.py's evaluation: a count when >= 1, a fraction when < 1"""
    unfinished: Literal["drop_row", "drop_response"] = "drop_row"
    """a response without a stop token (or over maxlen): drop_row drops its row (the paper's code); drop_response
    leaves it out of the best/worst choice and keeps the row while two responses remain (for small models that often
    ramble past generate's maxlen)"""
    seed: int = 1
    """seed of the train/test split"""
    output_dir: str = "runs/filter"
    """the output dataset folder (written atomically)"""
    overwrite: bool = False
    """replace an existing output folder"""
    push_to_hub: str | None = None
    """also push the dataset to this hub repo id"""


# ----------------------------------------------------------------------------------------------------------------
# filtering


def response_columns(dataset, what):
    """The response_i text columns, checked to be response_0 ... response_{n-1}."""
    indices = sorted(int(m.group(1)) for c in dataset.column_names if (m := re.fullmatch(r"response_(\d+)", c)))
    if not indices:
        raise ValueError(f"{what}: no response_0 ... columns; it has {dataset.column_names}")
    if indices != list(range(len(indices))):
        raise ValueError(f"{what}: response columns are not numbered 0 ... {len(indices) - 1}: {indices}")
    return [f"response_{i}" for i in indices]


def end_of_turn_id(tokenizer):
    """The token that ends an assistant turn in the tokenizer's chat template (Llama-3's `<|eot_id|>`, ChatML's
    `<|im_end|>`), read from a rendered turn; the tokenizer's EOS when there is no template or nothing follows the
    turn. Not the EOS alone: older Llama-3-Instruct configs set it to `<|end_of_text|>` though turns end with
    `<|eot_id|>`."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    probe = "end-of-turn-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = tokenizer(text[text.rindex(probe) + len(probe):], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in after if i in special), tokenizer.eos_token_id)


def stop_token_ids(tokenizer, model_name_or_path):
    """The tokenizer's EOS, the chat template's end-of-turn token and the generation config's eos ids (Llama-3-Instruct
    stops on two; an older config of it names only `<|end_of_text|>`, though its turns end with `<|eot_id|>`). vLLM
    stops at the tokenizer's EOS and the generation config's eos ids whatever it is told (`generation_config` "auto" or
    "vllm" alike; without a generation_config.json, the model config's eos ids): this set holds all of them, so both
    backends end a response at the same token."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    try:
        config = GenerationConfig.from_pretrained(model_name_or_path)
    except OSError:  # no generation_config.json: the model config's eos ids, as vLLM reads them
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_name_or_path))
        except (OSError, ValueError):
            config = None
    eos = config.eos_token_id if config is not None else None
    ids |= set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def special_ids(tokenizer, args):
    """(end-of-turn id, every stop id, pad id), the pad id checked to lie inside the embedding table. The end-of-turn
    id comes from the chat template (for chat prompts); the stop ids are generate.py's (stop_token_ids: the
    tokenizer's EOS, the chat template's end of turn, the generation config's eos ids, else config.json's), so every
    response generate.py ended counts as finished."""
    end_of_turn = end_of_turn_id(tokenizer) if args.prompt_format == "chat" else tokenizer.eos_token_id
    stops = {end_of_turn, *stop_token_ids(tokenizer, args.model_name_or_path)}
    vocab = AutoConfig.from_pretrained(args.model_name_or_path).get_text_config().vocab_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    if not 0 <= pad < vocab:
        pad = end_of_turn  # e.g. a [PAD] added to the tokenizer but not to the embeddings
    if end_of_turn is None or not 0 <= end_of_turn < vocab:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path}: its end-of-turn id {end_of_turn} is not "
                         f"in the embedding table (size {vocab})")
    return end_of_turn, {s for s in stops if s is not None}, pad


def pick_pair(rewards):
    """(chosen, reject) indices: argmax and argmin of the rewards, the first one on ties."""
    indices = range(len(rewards))
    return max(indices, key=lambda i: (rewards[i], -i)), min(indices, key=lambda i: (rewards[i], i))


def pad_to(ids, width, pad, left):
    """ids and attention mask padded to `width` on the left (prompts) or on the right (responses)."""
    padding = [pad] * (width - len(ids))
    mask = [1] * len(ids)
    if left:
        return padding + ids, [0] * len(padding) + mask
    return ids + padding, mask + [0] * len(padding)


def filter_rows(rows, columns, tokenizer, end_of_turn, stops, pad, args, stats=None, first_index=0):
    """Apply the rules to rows (dicts; the first one is row `first_index` of the dataset), counting each drop in
    `stats`; returns the output rows kept and the counts."""
    stats = stats if stats is not None else {"input_rows": 0, "prompt_too_long": 0, "no_eos": 0,
                                             "response_too_long": 0, "identical": 0, "other_stop_token": 0}
    kept = []
    for index, row in enumerate(rows, start=first_index):
        stats["input_rows"] += 1
        rewards = [row[f"{c}_reward"] for c in columns]
        bad = [r for r in rewards if not isinstance(r, (int, float)) or not math.isfinite(r)]
        if bad:
            raise ValueError(f"--dataset {args.dataset}: row {index} (prompt_id {row.get('prompt_id')}) has a "
                             f"non-finite or missing reward {bad[0]}")
        prompt_ids = row["prompt_token_ids"]
        if len(prompt_ids) > args.maxlen_prompt:
            stats["prompt_too_long"] += 1
            continue
        responses = [list(row[f"{c}_token_ids"]) if f"{c}_token_ids" in row else tokenizer(
            row[c], add_special_tokens=False).input_ids + [end_of_turn] for c in columns]
        finished = [i for i, ids in enumerate(responses) if ids and ids[-1] in stops]
        short = [i for i in finished if len(responses[i]) <= args.maxlen]
        needed = 2 if args.unfinished == "drop_response" else len(responses)
        if len(finished) < needed:
            stats["no_eos"] += 1
            continue
        if len(short) < needed:
            stats["response_too_long"] += 1
            continue
        if args.unfinished == "drop_response":
            stats["responses_left_out"] = stats.get("responses_left_out", 0) + len(responses) - len(short)
        best, worst = pick_pair([rewards[i] for i in short])
        chosen, reject = short[best], short[worst]
        if row[columns[chosen]] == row[columns[reject]]:
            stats["identical"] += 1
            continue
        out = {"prompt_id": row.get("prompt_id", index), "prompt": row[args.prompt_column],
               "chosen": row[columns[chosen]], "reject": row[columns[reject]],
               "chosen_reward": float(rewards[chosen]), "reject_reward": float(rewards[reject])}
        out["prompt_input_ids"], out["prompt_attention_mask"] = pad_to(prompt_ids, args.maxlen_prompt, pad, left=True)
        for name, i in (("chosen", chosen), ("reject", reject)):
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = pad_to(responses[i], args.maxlen, pad, left=False)
        kept.append(out)
        stats["other_stop_token"] += sum(responses[i][-1] != end_of_turn for i in (chosen, reject))
    stats["kept"] = stats.get("kept", 0) + len(kept)
    return kept, stats


def to_dataset(rows):
    """Rows as a compact Arrow dataset: ids int32, masks int8."""
    data = datasets.Dataset.from_list(rows)
    token_features = {f"{s}_{k}": datasets.Sequence(datasets.Value("int32" if k == "input_ids" else "int8"))
                      for s in ("prompt", "chosen", "reject") for k in ("input_ids", "attention_mask")}
    return data.cast(datasets.Features({**data.features, **token_features})).select_columns(OUTPUT_COLUMNS)


def main(args: Args):
    check_numbers(args, positive=["maxlen_prompt", "maxlen", "test_size"])
    check_data_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    dataset = load_split(args.dataset, args.split, "--dataset")
    what = f"--dataset {args.dataset} split {args.split}"
    require_columns(dataset, [args.prompt_column], what)
    columns = response_columns(dataset, what)
    empty = [i for i, p in enumerate(dataset[args.prompt_column]) if is_empty_prompt(p)]
    if empty:
        prompt_id = dataset[empty[0]].get("prompt_id", empty[0])
        raise ValueError(f"{what}: row {empty[0]} (prompt_id {prompt_id}) has an empty prompt ({len(empty)} such "
                         "rows); generate.py drops empty prompts: regenerate, or remove those rows")
    rewards = [c for c in dataset.column_names if re.fullmatch(r"response_\d+_reward", c)]
    if sorted(rewards) != sorted(f"{c}_reward" for c in columns):
        raise ValueError(f"{what}: {len(columns)} response columns but reward columns {sorted(rewards)}; expected "
                         f"{[f'{c}_reward' for c in columns]} (run score.py on it)")
    end_of_turn, stops, pad = special_ids(tokenizer, args)
    if "prompt_token_ids" not in dataset.column_names:
        if args.prompt_format == "chat" and not tokenizer.chat_template:
            raise ValueError(f"--model_name_or_path {args.model_name_or_path}: its tokenizer has no chat template to "
                             "tokenize the prompts with; pass --prompt_format text")
        prompts = dataset[args.prompt_column]
        if args.prompt_format == "chat":
            rendered = tokenizer.apply_chat_template([[{"role": "user", "content": p}] if isinstance(p, str) else p
                                                      for p in prompts], add_generation_prompt=True, tokenize=False)
            encoded = tokenizer(rendered, add_special_tokens=False).input_ids
        else:
            encoded = tokenizer(list(prompts)).input_ids
        dataset = dataset.add_column("prompt_token_ids", encoded)

    lock = lock_output_dir(args.output_dir, 0)  # noqa: F841 (held until the run ends)
    check_data_output_dir(args)  # again: a run on the same folder may have finished meanwhile

    # a chunk of rows at a time, so the padded output is held as compact Arrow tables, not Python lists
    stats, parts, chunk = None, [], 1000
    for start in range(0, len(dataset), chunk):
        rows, stats = filter_rows(dataset.select(range(start, min(start + chunk, len(dataset)))), columns, tokenizer,
                                  end_of_turn, stops, pad, args, stats, first_index=start)
        if rows:
            parts.append(to_dataset(rows))
    for rule in ("prompt_too_long", "no_eos", "response_too_long", "identical"):
        print(f"dropped {stats[rule]:>6} rows: {rule}")
    if stats.get("responses_left_out"):
        print(f"left out {stats['responses_left_out']} unfinished or too long responses of rows kept (--unfinished "
              "drop_response)")
    if stats["other_stop_token"]:
        print(f"{stats['other_stop_token']} kept responses end on another stop token than the end-of-turn token "
              f"{end_of_turn} (kept as sampled)")
    if not parts:
        raise ValueError(f"{what}: no rows left after filtering ({stats}); prompt_too_long: raise --maxlen_prompt; "
                         "response_too_long: raise --maxlen; no_eos: raise generate.py's --maxlen")
    kept = datasets.concatenate_datasets(parts)
    test_size = int(args.test_size) if args.test_size >= 1 else round(args.test_size * len(kept))
    if not 0 < test_size < len(kept):
        raise ValueError(f"--test_size {args.test_size}: {test_size} test rows out of {len(kept)} kept; need at least "
                         "one row in each split")
    order = list(range(len(kept)))
    random.Random(args.seed).shuffle(order)
    splits = datasets.DatasetDict({"train": kept.select(sorted(order[test_size:])),
                                   "test": kept.select(sorted(order[:test_size]))})
    stats.update(train=len(splits["train"]), test=len(splits["test"]))
    print(f"kept {stats['kept']} of {stats['input_rows']} rows: {stats['train']} train, {stats['test']} test")
    save_dataset_atomically(splits, args, {"filter_stats.json": stats})
    print(f"wrote {args.output_dir}")


# ----------------------------------------------------------------------------------------------------------------
# infrastructure shared, as identical copies, by the data stages: TRY NOT TO MODIFY in one script alone
# (tests/test_shared_helpers.py checks that the copies agree: change every copy, or none)


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
