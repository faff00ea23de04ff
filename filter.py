"""Turn scored generations into REBEL's training pairs: the last data stage before rebel.py.

Rules, applied in this order and each counted: a prompt longer than `maxlen_prompt` tokens drops its row; a response
that never reached a stop token (it was cut at generate.py's maxlen) drops its row; a response longer than `maxlen`
tokens, its end-of-turn token included, drops its row (`--unfinished drop_response` instead leaves such responses out of
the choice below and keeps the row while two remain). Lengths count each response's own token ids (generate.py's
`response_{i}_token_ids`; or, for data without them, the tokenized text plus the end-of-turn token), never "the
templated text minus a fixed number of tokens". Of the rows left, the best response (argmax reward) becomes `chosen`
and the worst (argmin) `reject`; a row whose chosen and reject text are identical is dropped. Non-finite rewards are
an error naming the row.

Layout, so that the prompt and the response meet in the middle: `prompt_input_ids` left-padded to `maxlen_prompt`,
`chosen_input_ids` and `reject_input_ids` right-padded to `maxlen`, each response ending with the end-of-turn token
(the tokenizer's EOS: `<|eot_id|>` for Llama-3-Instruct; a response that stopped on another stop token, such as
`<|end_of_text|>`, gets it replaced, and the count is reported), with explicit attention masks and a pad id that
exists in the model's embedding table. Output: a `save_to_disk` DatasetDict with `train` and `test` splits,
`args.json`, and `filter_stats.json` (what each rule dropped).

    python filter.py --dataset runs/score --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct
"""

import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
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
    unfinished: Literal["drop_row", "drop_response"] = "drop_row"
    """a response without a stop token (or over maxlen): drop_row drops its row (the paper's code); drop_response
    leaves it out of the best/worst choice and keeps the row while two responses remain (for small models that often
    ramble past generate's maxlen)"""
    test_size: float = 1000
    """rows held out for rebel.py's evaluation: a count when >= 1, a fraction when < 1"""
    seed: int = 1
    """seed of the train/test split"""
    output_dir: str = "runs/filter"
    """the output dataset folder (written atomically)"""
    overwrite: bool = False
    """replace an existing output folder"""
    push_to_hub: str | None = None
    """also push the dataset to this hub repo id"""


# ----------------------------------------------------------------------------------------------------------------
# helpers shared, as identical copies, by the data stages (tests/test_shared_helpers.py checks they agree)


def load_split(path, split, arg):
    """One split of a hub dataset, a `save_to_disk` folder, a folder of data files (split from file names), or a
    single .jsonl/.json/.csv/.parquet file (which holds only the split "train"). `arg` names the argument in errors."""
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in builders):
        raise FileNotFoundError(f"{arg} {path}: no such file or folder")
    if os.path.isfile(path) and os.path.splitext(path)[1] not in builders:
        raise ValueError(f"{arg} {path}: expected a .jsonl, .json, .csv or .parquet file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{arg} {path}: the file is empty")
    try:
        if os.path.isfile(path):
            builder = builders[os.path.splitext(path)[1]]
            splits = {"train": datasets.load_dataset(builder, data_files=path, split="train")}
        elif any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(path)
            splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            splits = datasets.load_dataset(path)
    except (IndexError, StopIteration) as e:  # how datasets fails on a saved dataset without rows
        raise ValueError(f"{arg} {path}: no rows (datasets cannot read it: {type(e).__name__})") from None
    if split not in splits:
        raise ValueError(f"{arg} {path}: no split {split!r}; it has {sorted(splits)}")
    return splits[split]


def require_columns(dataset, columns, what):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{what}: no rows")


def load_tokenizer(path, arg="--model_name_or_path"):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{arg} {path}: cannot load a tokenizer from it ({type(e).__name__}: {e})") from None


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


def special_ids(tokenizer, args):
    """(end-of-turn id, every stop id, pad id), the pad id checked to lie inside the embedding table."""
    end_of_turn = tokenizer.eos_token_id
    stops = {end_of_turn}
    try:
        eos = GenerationConfig.from_pretrained(args.model_name_or_path).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos])
    except OSError:
        pass
    vocab = AutoConfig.from_pretrained(args.model_name_or_path).get_text_config().vocab_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    if not 0 <= pad < vocab:
        pad = end_of_turn  # e.g. a [PAD] added to the tokenizer but not to the embeddings
    if end_of_turn is None or not 0 <= end_of_turn < vocab:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path}: its EOS id {end_of_turn} is not in the "
                         f"embedding table (size {vocab})")
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
                                             "response_too_long": 0, "identical": 0, "stop_token_replaced": 0}
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
        responses, replaced = [], 0
        for c in columns:
            ids = list(row[f"{c}_token_ids"]) if f"{c}_token_ids" in row else tokenizer(
                row[c], add_special_tokens=False).input_ids + [end_of_turn]
            if ids and ids[-1] in stops and ids[-1] != end_of_turn:
                ids[-1] = end_of_turn
                replaced += 1
            responses.append(ids)
        finished = [i for i, ids in enumerate(responses) if ids and ids[-1] == end_of_turn]
        short = [i for i in finished if len(responses[i]) <= args.maxlen]
        usable = short if args.unfinished == "drop_response" else range(len(responses))
        if len(finished) < (2 if args.unfinished == "drop_response" else len(responses)):
            stats["no_eos"] += 1
            continue
        if len(short) < (2 if args.unfinished == "drop_response" else len(responses)):
            stats["response_too_long"] += 1
            continue
        if args.unfinished == "drop_response":
            stats["responses_left_out"] = stats.get("responses_left_out", 0) + len(responses) - len(usable)
        best, worst = pick_pair([rewards[i] for i in usable])
        chosen, reject = usable[best], usable[worst]
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
        stats["stop_token_replaced"] += replaced
    stats["kept"] = stats.get("kept", 0) + len(kept)
    return kept, stats


def to_dataset(rows):
    """Rows as a compact Arrow dataset: ids int32, masks int8."""
    data = datasets.Dataset.from_list(rows)
    token_features = {f"{s}_{k}": datasets.Sequence(datasets.Value("int32" if k == "input_ids" else "int8"))
                      for s in ("prompt", "chosen", "reject") for k in ("input_ids", "attention_mask")}
    return data.cast(datasets.Features({**data.features, **token_features})).select_columns(OUTPUT_COLUMNS)


def main(args: Args):
    check_data_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    dataset = load_split(args.dataset, args.split, "--dataset")
    what = f"--dataset {args.dataset} split {args.split}"
    require_columns(dataset, [args.prompt_column], what)
    columns = response_columns(dataset, what)
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
    if stats["stop_token_replaced"]:
        print(f"replaced {stats['stop_token_replaced']} final stop tokens by the end-of-turn token {end_of_turn}")
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


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
