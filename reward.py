"""Reward model from human comparisons: an LM backbone plus a scalar head, trained with a Bradley-Terry loss.

A person compared responses to a prompt; the model learns a scalar r(x, y) such that sigmoid(r(x, y_w) - r(x, y_l)) is
the probability that y_w is preferred (Christiano et al. 2017). Two kinds of data (`--task.dataset_format`):
- pairs: a `chosen` and a `rejected` response (text, or chat messages), with an optional `prompt` column;
- ranked: a `prompt` and a `ranked` list of K >= 2 responses, best first (InstructGPT). Every one of the K(K-1)/2
  pairs is a term of the loss, and the K responses are scored once: one batch element per prompt, not per pair.
Loss of one prompt: the mean over its pairs of  -log sigmoid(r_w - r_l) + center_coef * (r_w + r_l)^2  (the second
term, off by default, pins the free offset of the rewards near 0: TRL's center_rewards_coefficient). Each prompt
weighs the same whatever its K (InstructGPT divides a prompt's loss by its number of pairs); the update's loss is the
mean over the prompts of the global batch. Pairs data is the case K = 2.

Text responses are scored as prompt + response (one string, tokenized as score.py does, no EOS appended); chat
messages through the tokenizer's chat template, the whole conversation ending with the assistant's answer (as score.py
and the online scripts give it to the reward model). The reward is read at the last real token: batches are right-
padded and the model's own pooling takes the rightmost token that is not the pad id (config.pad_token_id is saved).
The output folder is an ordinary `AutoModelForSequenceClassification` (num_labels 1) with its tokenizer, which
score.py, ppo.py, rebel_online.py, rloo.py and grpo.py load unchanged. `--lora_r` trains LoRA adapters (peft) on the
backbone and the scalar head whole, and saves them merged into that folder, plus the adapter alone in
<output_dir>/adapter.

`--normalize_dataset` (e.g. generate.py's samples of the SFT policy) shifts the trained model's rewards so that the
responses of that dataset score 0 on average, by folding minus their mean reward into a bias of the saved model (the
head's, or where the head has none the final LayerNorm's, along the head's weight); summarize_from_feedback_details
subtracts the same mean (of its SFT data's reference summaries) through its ScalarModel's `config.bias`.

    python reward.py --model_name_or_path runs/sft_tldr --task.dataset trl-lib/tldr-preference
    torchrun --nproc_per_node 8 reward.py --model_name_or_path runs/sft_tldr --fsdp ...
    python reward.py --model_name_or_path data/tiny-gpt2 --from_scratch --task.dataset pairs.jsonl   # offline, CPU

Documentation: docs/sft-and-reward.md
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class TaskArgs:
    dataset: str = "trl-lib/tldr-preference"
    """the comparisons: hub id, `save_to_disk` folder, folder of data files, or a .jsonl/.json/.csv/.parquet file"""
    dataset_format: Literal["pairs", "ranked"] = "pairs"
    """pairs: a chosen and a rejected response per row; ranked: a list of K >= 2 responses per row, best first"""
    train_split: str = "train"
    """split to train on"""
    eval_dataset: str | None = None
    """where the held-out comparisons live; None: the same place as --task.dataset"""
    eval_split: str | None = "validation"
    """split of held-out comparisons for val/*; None disables evaluation"""
    eval_size: int | None = 2048
    """held-out rows evaluated (a fixed sample drawn with --seed); None: all of them"""
    prompt_column: str | None = "prompt"
    """column holding the prompt (text, prepended to text responses; or chat messages, which must agree with the
    leading messages of conversations in the response columns); None: the data has none (the responses hold the
    whole text or conversation, as in Anthropic/hh-rlhf)"""
    chosen_column: str = "chosen"
    """pairs: column of the preferred response (text, or chat messages ending with the assistant's answer)"""
    rejected_column: str = "rejected"
    """pairs: column of the other response"""
    ranked_column: str = "ranked"
    """ranked: column of the K responses, best first (each text or chat messages)"""
    prompt_format: Literal["auto", "text", "chat"] = "auto"
    """auto: chat when the prompt or the responses are chat messages, else text; chat: text prompts and responses
    become a user and an assistant turn, rendered with the chat template (as score.py's default); text: prompt +
    response as plain text (chat messages are then an error)"""
    maxlen: int = 1024
    """most tokens in one scored sequence (prompt and response); rows with a longer one are dropped and counted"""


@dataclass
class Args:
    # experiment
    exp_name: str = "reward"
    """name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of head init, data order and the eval sample (shared by all ranks)"""
    track: bool = False
    """log to Weights & Biases"""
    progress: bool = True
    """show progress on rank 0 (update or shard k of N, rate, time left): a bar on a terminal, a line every minute in
    a log file; --no_progress turns it off"""
    wandb_project_name: str = "rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team); None uses your default"""
    output_dir: str = "runs/reward"
    """run folder: args.json, metrics.jsonl, checkpoints/ and, at the end, the model and tokenizer"""
    overwrite: bool = False
    """delete whatever output_dir holds and start over"""
    resume: str | None = None
    """a checkpoint folder to continue from, or "auto" for the latest in output_dir (a fresh start if none)"""
    save_freq: int = 200
    """write a resumable checkpoint every this many updates (0: only on preemption or a stop)"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    max_bad_updates: int = 5
    """stop after this many updates in a row with a non-finite loss or gradient norm (each one is skipped)"""

    # model
    model_name_or_path: str = "EleutherAI/pythia-1b-deduped"
    """hub id or local folder of the backbone (a base LM or, usually, the SFT policy) and its tokenizer"""
    from_scratch: bool = False
    """random weights from the model's config instead of its pretrained weights"""
    disable_dropout: bool = True
    """set every dropout probability to 0 (as lm-human-preferences and sfd train reward models)"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, or flash_attention_2 (GPU)"""
    bf16: bool = True
    """bf16 compute on GPU (fp32 weights and optimizer; autocast with DDP, a mixed-precision policy with FSDP2);
    ignored on CPU, which runs fp32, unless RLHF_BF16_ON_CPU=1 (for tests)"""
    fsdp: bool = False
    """shard parameters, gradients and optimizer state with FSDP2 (fully_shard each decoder layer, then the root)
    instead of replicating the model with DDP"""
    gradient_checkpointing: bool = False
    """recompute decoder-layer activations in the backward pass"""
    lora_r: int = 0
    """LoRA rank: train low-rank adapters (peft) on the layers --lora_target_modules names, every other weight frozen;
    0: full fine-tuning. The final save is the merged model (a plain model) plus the adapter alone in
    <output_dir>/adapter"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (lora_alpha / lora_r) * B @ A to its layer's weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in train mode (0: none, as every other dropout here)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the linear layers that get adapters: all-linear (every linear layer of the transformer body, not the output
    or classifier head), or names: each layer whose name is or ends with one of them (e.g. q_proj v_proj)"""

    # objective and optimisation
    center_coef: float = 0.0
    """weight of (r_w + r_l)^2 in each pair's loss, which keeps rewards centred on 0 (TRL's
    center_rewards_coefficient; 0.01 is common); 0 turns it off"""
    lr: float = 3e-6
    """peak learning rate (summarize_from_feedback_details' TL;DR reward models: 3e-6)"""
    warmup_ratio: float = 0.0
    """fraction of the updates with linear warmup; then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (inf disables clipping)"""
    batch_size: int = 64
    """rows (prompts with their pair or ranking) per update, over all ranks (the global batch; it does not change
    with the number of ranks)"""
    local_micro_batch_size: int = 8
    """rows per forward/backward pass on one rank (each row scores its K responses: 2 for pairs)"""
    total_episodes: int | None = None
    """rows to train on; None: num_train_epochs passes over the train split"""
    num_train_epochs: int = 1
    """passes over the train split when total_episodes is None"""
    eval_freq: int = 100
    """evaluate every this many updates (and before the first and after the last)"""

    # normalisation
    normalize_dataset: str | None = None
    """after training, shift the rewards so that this dataset's responses (e.g. generate.py's samples of the SFT
    policy) score 0 on average: minus their mean is folded into a bias of the saved model; None: no shift"""
    normalize_split: str = "train"
    """split of --normalize_dataset"""
    normalize_prompt_column: str | None = "prompt"
    """its prompt column (rendered with the responses as the training data are); None: it has none"""
    normalize_response_column: str | None = None
    """its response column (e.g. completion); None: generate.py's response_0, response_1, ... columns, all scored"""

    task: TaskArgs = field(default_factory=TaskArgs)
    """the comparison data: where, which format and columns, how long"""

    # computed at run time
    world_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: number of processes"""
    local_batch_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: batch_size // world_size, rows per update on one rank"""
    gradient_accumulation_steps: tyro.conf.Suppress[int | None] = None
    """computed at run time: local_batch_size // local_micro_batch_size"""
    num_updates: tyro.conf.Suppress[int | None] = None
    """computed at run time: total_episodes // batch_size"""


# ----------------------------------------------------------------------------------------------------------------
# comparisons: rendering, checking and storing the data


class Comparisons:
    """Tokenized comparisons, compact (one flat int32 array): row i holds K_i >= 2 sequences, best first."""

    def __init__(self, rows):
        sequences = [s for row in rows for s in row]
        self.sizes = np.array([len(row) for row in rows], dtype=np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(self.offsets[-1]))

    def __len__(self):
        return len(self.sizes)

    def sequence(self, j):
        return self.tokens[self.offsets[j]:self.offsets[j + 1]].tolist()

    def row(self, i):
        return [self.sequence(j) for j in range(self.row_offsets[i], self.row_offsets[i + 1])]


def is_messages(value):
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def messages(value):
    """Chat messages reduced to role and content (datasets fills keys of other rows' messages with None)."""
    return [{"role": m["role"], "content": m["content"]} for m in value]


def expected(args):
    if args.task.dataset_format == "pairs":
        return (f"pairs need columns {args.task.chosen_column!r} and {args.task.rejected_column!r} (text, or chat "
                "messages [{'role': ..., 'content': ...}, ...] ending with the assistant's answer)"
                + (f" and {args.task.prompt_column!r}" if args.task.prompt_column else ""))
    return (f"rankings need a column {args.task.ranked_column!r} holding K >= 2 responses, best first (each text or "
            "chat messages)" + (f", and {args.task.prompt_column!r}" if args.task.prompt_column else ""))


def holds_messages(value, ranked):
    return any(is_messages(v) for v in value) if ranked and isinstance(value, list) else is_messages(value)


def detect_chat(row, prompt_column, response_columns, ranked, args):
    """Whether the data is chat (rendered with the chat template) or text, from --task.prompt_format and one row."""
    if args.task.prompt_format != "auto":
        return args.task.prompt_format == "chat"
    return (prompt_column is not None and is_messages(row[prompt_column])) or any(
        holds_messages(row[c], ranked) for c in response_columns)


def render(prompt, responses, chat, where, names):
    """The texts of one row's responses as the reward model reads them. Text: prompt + response. Chat: each response's
    whole conversation; a response given as messages is the conversation itself (checked to begin with the prompt's
    messages) or, when it starts with the assistant's turn, its continuation; a text response is the assistant's turn
    after the prompt. All of a row's conversations must continue the same one. Returns texts (text) or
    conversations (chat)."""
    if not chat:
        if names[0] is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}, column {names[0]}: expected text, got {str(prompt)[:120]!r} (chat messages "
                             "need --task.prompt_format auto or chat)")
        out = []
        for value, name in zip(responses, names[1:]):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}, column {name}: expected a non-empty text response, got "
                                 f"{str(value)[:120]!r}")
            out.append((prompt or "") + value)
        return out
    if names[0] is not None:
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        elif is_messages(prompt):
            prompt = messages(prompt)
        else:
            raise ValueError(f"{where}, column {names[0]}: expected non-empty text or chat messages, got "
                             f"{str(prompt)[:120]!r}")
    conversations = []
    for value, name in zip(responses, names[1:]):
        if isinstance(value, str) and value.strip():
            if prompt is None:
                raise ValueError(f"{where}, column {name}: a text response in chat format needs a prompt column "
                                 "(--task.prompt_column), or give the response as the whole conversation")
            conversation = prompt + [{"role": "assistant", "content": value}]
        elif is_messages(value):
            conversation = messages(value)
            if prompt is not None and conversation[0]["role"] == "assistant":
                conversation = prompt + conversation
            elif prompt is not None and conversation[:len(prompt)] != prompt:
                raise ValueError(f"{where}: column {names[0]} disagrees with the leading messages of column {name}: "
                                 f"the prompt is {str(prompt)[:160]!r}, the conversation begins "
                                 f"{str(conversation[:len(prompt)])[:160]!r}")
        else:
            raise ValueError(f"{where}, column {name}: expected text or chat messages ending with an assistant turn, "
                             f"got {str(value)[:120]!r}")
        if conversation[-1]["role"] != "assistant" or len(conversation) < 2:
            raise ValueError(f"{where}, column {name}: the conversation must hold a prompt and end with the "
                             f"assistant's answer; it is {str(conversation)[:160]!r}")
        if conversations and conversation[:-1] != conversations[0][:-1]:
            raise ValueError(f"{where}: columns {names[1]} and {name} continue different conversations (the turns "
                             "before their last assistant turn differ)")
        conversations.append(conversation)
    return conversations


def tokenize(rendered, chat, tokenizer):
    """Token ids of texts (as score.py's text format: the tokenizer's own special tokens) or of conversations through
    the chat template (which writes BOS itself: no special tokens added)."""
    if not chat:
        return tokenizer(rendered).input_ids
    texts = tokenizer.apply_chat_template(rendered, tokenize=False)
    return tokenizer(texts, add_special_tokens=False).input_ids


def check_chat_template(tokenizer, args, what):
    if not tokenizer.chat_template:
        raise ValueError(f"{what}: the data is chat messages (or --task.prompt_format chat), but the tokenizer of "
                         f"--model_name_or_path {args.model_name_or_path} has no chat template; pass "
                         "--task.prompt_format text for text data")


def load_comparisons(path, split, args, tokenizer, arg, limit=None, chat=None):
    """A split of comparisons, rendered, tokenized and checked before any model is loaded: the rows' K responses,
    best first. Errors name the argument, the path, the row and the column. Pairs whose chosen and rejected are the
    same sequence carry no preference: they are skipped and counted. Rows with a sequence over --task.maxlen are
    dropped and counted. Returns (Comparisons, chat, report)."""
    what = f"{arg} {path} split {split}"
    data = load_split(path, split, arg)
    task = args.task
    ranked = task.dataset_format == "ranked"
    response_columns = [task.ranked_column] if ranked else [task.chosen_column, task.rejected_column]
    prompt_column = task.prompt_column
    if prompt_column not in data.column_names and not set(response_columns) - set(data.column_names) and len(data) \
            and all(holds_messages(data[0][c], ranked) for c in response_columns):
        prompt_column = None  # whole conversations carry their prompt: the prompt column is optional
    columns = ([prompt_column] if prompt_column else []) + response_columns
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        hint = " (pass --task.prompt_column None if the responses hold the whole text)" if (
            prompt_column in missing) else ""
        raise ValueError(f"{what}: missing column(s) {missing}{hint}; {expected(args)}; it has {data.column_names}")
    if len(data) == 0:
        raise ValueError(f"{what}: no rows")
    index = list(range(len(data)))  # row numbers in the split, also for a sample of it
    if limit is not None and len(data) > limit:
        index = sorted(random.Random(args.seed).sample(index, limit))
        data = data.select(index)
    data = data.select_columns(columns)
    is_chat = detect_chat(data[0], prompt_column, response_columns, ranked, args)
    if chat is not None and is_chat != chat:
        raise ValueError(f"{what}: holds {'chat' if is_chat else 'text'} data, but the training data is "
                         f"{'chat' if chat else 'text'}: a reward model reads one format")
    if is_chat:
        check_chat_template(tokenizer, args, what)
    rows, report = [], {"rows": len(data), "identical": [], "too_long": 0}
    for start, batch in zip(range(0, len(data), 512), data.iter(batch_size=512)):
        rendered, sizes = [], []
        for i in range(len(batch[columns[-1]])):
            where = f"{what}: row {index[start + i]}"
            prompt = batch[prompt_column][i] if prompt_column else None
            if ranked:
                value = batch[task.ranked_column][i]
                if not isinstance(value, list) or len(value) < 2:
                    raise ValueError(f"{where}, column {task.ranked_column}: a ranking needs at least 2 responses, "
                                     f"got {str(value)[:120]!r}")
                responses, names = value, [f"{task.ranked_column}[{k}]" for k in range(len(value))]
            else:
                responses, names = [batch[c][i] for c in response_columns], response_columns
            texts = render(prompt, responses, is_chat, where, [prompt_column, *names])
            rendered += texts
            sizes.append(len(texts))
        ids = tokenize(rendered, is_chat, tokenizer)
        for i, k in enumerate(sizes):
            row, ids = ids[:k], ids[k:]
            if ranked:
                seen = {}
                for position, x in enumerate(row):
                    if tuple(x) in seen:
                        raise ValueError(f"{what}: row {index[start + i]}, column {task.ranked_column}: responses "
                                         f"{seen[tuple(x)]} and {position} are the same; a ranking orders distinct "
                                         "responses")
                    seen[tuple(x)] = position
            elif row[0] == row[1]:
                report["identical"].append(index[start + i])
                continue
            if max(map(len, row)) > task.maxlen:
                report["too_long"] += 1
                continue
            rows.append(row)
    if not rows:
        raise ValueError(f"{what}: no comparisons left of {len(data)} rows ({len(report['identical'])} with chosen "
                         f"equal to rejected, {report['too_long']} with a sequence over --task.maxlen {task.maxlen})")
    return Comparisons(rows), is_chat, report


def describe(name, data, report, args):
    """One line on what was kept and skipped, for the console."""
    k = np.bincount(data.sizes)
    sizes = ", ".join(f"K={K}: {n}" for K, n in enumerate(k) if n)
    identical = report["identical"]
    line = (f"{name}: {len(data)} of {report['rows']} rows ({sizes}); dropped {report['too_long']} with a sequence "
            f"over --task.maxlen {args.task.maxlen}")
    if identical:
        line += (f"; skipped {len(identical)} whose {args.task.chosen_column} equals {args.task.rejected_column} "
                 f"(rows {identical[:5]}{' ...' if len(identical) > 5 else ''})")
    return line


def load_normalize_data(args, tokenizer, chat):
    """--normalize_dataset's (prompt, response) sequences, rendered as the training data are (Comparisons with one
    sequence per row). Over-long ones are dropped and counted."""
    arg = "--normalize_dataset"
    data = load_split(args.normalize_dataset, args.normalize_split, arg)
    what = f"{arg} {args.normalize_dataset} split {args.normalize_split}"
    if args.normalize_response_column is None:
        responses = sorted((c for c in data.column_names if c.startswith("response_") and c[9:].isdigit()),
                           key=lambda c: int(c[9:]))
        if not responses:
            raise ValueError(f"{what}: no response_0, response_1, ... columns (generate.py's output); name the "
                             f"response column with --normalize_response_column; it has {data.column_names}")
    else:
        responses = [args.normalize_response_column]
    prompt_column = args.normalize_prompt_column
    require_columns(data, ([prompt_column] if prompt_column else []) + responses, what)
    is_chat = detect_chat(data[0], prompt_column, responses, False, args)
    if is_chat != chat:
        raise ValueError(f"{what}: holds {'chat' if is_chat else 'text'} data, but the training data is "
                         f"{'chat' if chat else 'text'}: the rewards to normalise must be read as training reads them")
    sequences, too_long = [], 0
    for start, batch in zip(range(0, len(data), 512), data.iter(batch_size=512)):
        rendered = []
        for i in range(len(batch[responses[0]])):
            prompt = batch[prompt_column][i] if prompt_column else None
            for column in responses:
                rendered += render(prompt, [batch[column][i]], chat, f"{what}: row {start + i}", [prompt_column,
                                                                                                   column])
        for x in tokenize(rendered, chat, tokenizer):
            if len(x) > args.task.maxlen:
                too_long += 1
            else:
                sequences.append([x])
    if not sequences:
        raise ValueError(f"{what}: no responses left ({too_long} over --task.maxlen {args.task.maxlen})")
    return Comparisons(sequences), too_long


# ----------------------------------------------------------------------------------------------------------------
# reward model and loss


class ScalarReward(torch.nn.Module):
    """The sequence classifier's reward, logits[:, 0] in fp32, read by its own pooling at the last non-pad token. The
    root module of DDP and FSDP2, so that the classifier inside keeps its own class for save_pretrained."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def collate(sequences, pad_id, device):
    """Right-pad to the longest sequence. The mask comes from lengths, so a pad id inside a sequence still counts."""
    width = max(len(x) for x in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, x in enumerate(sequences):
        input_ids[i, :len(x)] = torch.tensor(x)
        attention_mask[i, :len(x)] = 1
    return input_ids.to(device), attention_mask.to(device)


def rewards(model, sequences, pad_id, device):
    """Rewards of token lists scored in one right-padded batch."""
    return model(*collate(sequences, pad_id, device))


def pair_index(sizes, device):
    """(better, worse, row) indices of every pair i < j of every row's responses, into the rows' responses laid end
    to end (row by row, best first)."""
    better, worse, rows, start = [], [], [], 0
    for row, k in enumerate(sizes):
        for i in range(k):
            for j in range(i + 1, k):
                better.append(start + i)
                worse.append(start + j)
                rows.append(row)
        start += k
    return (torch.tensor(better, device=device), torch.tensor(worse, device=device),
            torch.tensor(rows, device=device))


def comparison_losses(r, sizes, center_coef):
    """Per-row loss: the mean over the row's K(K-1)/2 pairs (better w, worse l) of -log sigmoid(r_w - r_l) +
    center_coef * (r_w + r_l)^2, so that each row (prompt) weighs the same whatever its K. Also returns every pair's
    margin r_w - r_l. `r`: the rewards of the rows' responses laid end to end, best first; `sizes`: each row's K."""
    better, worse, rows = pair_index(sizes, r.device)
    margin = r[better] - r[worse]
    pair = -F.logsigmoid(margin) + center_coef * (r[better] + r[worse]) ** 2
    pairs = torch.tensor([k * (k - 1) / 2 for k in sizes], device=r.device, dtype=pair.dtype)
    return torch.zeros(len(sizes), device=r.device, dtype=pair.dtype).index_add(0, rows, pair) / pairs, margin


def micro_batch(data, rows):
    """The sequences of `rows` laid end to end, and each row's K."""
    return [x for i in rows for x in data.row(i)], [int(data.sizes[i]) for i in rows]


def sharded_rows(n, args, rank, world_size):
    """Every rank's share of n rows in passes of local_micro_batch_size, the same number of passes on every rank (as
    FSDP2 needs): a rank with nothing left gets an empty list (it runs a dummy pass)."""
    step = args.local_micro_batch_size * world_size
    for start in range(0, n, step):
        yield list(range(start + rank * args.local_micro_batch_size,
                         min(start + (rank + 1) * args.local_micro_batch_size, n)))


@torch.no_grad()
def evaluate(model, data, pad_id, args, rank, world_size, device, autocast):
    """val/accuracy (held-out pairs ordered right, every pair of a ranking counted once), val/loss (the training loss,
    each row weighing the same), val/reward_mean and val/reward_std (over every scored response), val/margin."""
    model.eval()
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # loss, rows, correct, pairs, margin, r, r^2
    for rows in sharded_rows(len(data), args, rank, world_size):
        sequences, sizes = micro_batch(data, rows or [0])
        with autocast:
            r = rewards(model, sequences, pad_id, device)
        if rows:
            losses, margin = comparison_losses(r, sizes, args.center_coef)
            sums += torch.stack([losses.sum().double(), torch.tensor(len(rows), device=device), (margin > 0).sum(),
                                 torch.tensor(len(margin), device=device), margin.sum(), r.sum(),
                                 (r.double() ** 2).sum()]).double()
    loss, n_rows, correct, pairs, margin, total, squares = all_reduce(sums).tolist()
    n = float(data.sizes.sum())
    model.train()
    return {"val/accuracy": correct / pairs, "val/loss": loss / n_rows, "val/margin": margin / pairs,
            "val/reward_mean": total / n, "val/reward_std": math.sqrt(max(squares / n - (total / n) ** 2, 0.0))}


@torch.no_grad()
def mean_reward(model, data, pad_id, args, rank, world_size, device, autocast):
    """Mean and standard deviation of the rewards of one-sequence rows (the normalisation data), over all ranks."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for rows in sharded_rows(len(data), args, rank, world_size):
        with autocast:
            r = rewards(model, micro_batch(data, rows or [0])[0], pad_id, device).double()
        if rows:
            sums += torch.stack([r.sum(), (r ** 2).sum()])
    total, squares = all_reduce(sums).tolist()
    model.train()
    mean = total / len(data)
    return mean, math.sqrt(max(squares / len(data) - mean ** 2, 0.0))


def offset_target(model, pad_id):
    """Where a constant can be subtracted from every reward of `model` (a sequence classifier, unsharded) so that the
    saved folder, loaded as it is, gives the shifted reward: ("head", name) when the head has a bias; ("norm", name,
    head) when it has none but the module that feeds it (the final LayerNorm) has one: adding d * w / |w|^2 to that
    bias shifts every hidden state by it and the reward w . h by d; None when neither exists (RMSNorm models)."""
    outputs, order = {}, []

    def record(name):
        def hook(module, inputs, output):
            outputs[name] = (inputs, output)
            order.append(name)
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1 if pad_id == 0 else 0] * 3]).to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    heads = [n for n in order if isinstance(model.get_submodule(n), torch.nn.Linear)
             and model.get_submodule(n).out_features == model.config.num_labels]
    if not heads:
        return None
    head = heads[-1]
    if model.get_submodule(head).bias is not None:
        return ("head", head)
    head_input = outputs[head][0][0]
    for name in reversed(order[:order.index(head)]):
        out = outputs[name][1]
        if torch.is_tensor(out) and out.shape == head_input.shape and torch.equal(out, head_input):
            bias = getattr(model.get_submodule(name), "bias", None)
            if isinstance(bias, torch.nn.Parameter) and bias.shape == head_input.shape[-1:]:
                return ("norm", name, head)
            return None
    return None


def fold_offset(state_dict, target, offset):
    """Subtract `offset` from every reward of the model whose full weights are `state_dict` (see offset_target)."""
    if target[0] == "head":
        key = f"{target[1]}.bias"
        state_dict[key] = state_dict[key] - offset
    else:
        w = state_dict[f"{target[2]}.weight"][0].double()
        key = f"{target[1]}.bias"
        state_dict[key] = (state_dict[key].double() - offset * w / w.dot(w)).to(state_dict[key].dtype)
    return state_dict


def build_model(args, tokenizer, device, need_offset):
    """The sequence classifier (num_labels 1, pad id set, dropout off, fp32 master weights), the place an offset can
    be folded into (checked before training when --normalize_dataset is given), the trained module: FSDP2-sharded,
    DDP-wrapped or as is, and with --lora_r the PeftModel (LoRA adapters on the body, the scalar head trained in
    full), else None."""
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1)
        config = without_dropout(config) if args.disable_dropout else config
        config.pad_token_id = tokenizer.pad_token_id  # the pooling reads the last token that is not this id
        if args.from_scratch:
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn_implementation,
                                                                   dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                args.model_name_or_path, config=config, attn_implementation=args.attn_implementation,
                dtype=torch.float32)  # fp32 master weights, whatever dtype the checkpoint was saved in
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: cannot load a sequence classifier ({e})"
                         ) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    target = offset_target(model.eval(), tokenizer.pad_token_id) if need_offset else None
    if need_offset and target is None:
        raise SystemExit(f"--normalize_dataset: the head of {type(model).__name__} has no bias, nor has the module "
                         "that feeds it (an RMSNorm, not a LayerNorm), so no constant can be subtracted from its "
                         "rewards in a folder that loads as an ordinary sequence classifier; drop --normalize_dataset "
                         "(RLOO and GRPO baselines remove a constant offset anyway)")
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft = add_lora(model, args, train_heads=True)
    wrapped = ScalarReward(model)
    if args.fsdp:  # sharded while still on the CPU: fully_shard moves each unit to the device as it shards it
        bf16 = bf16_compute(args, device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        for module in model.modules():
            if type(module).__name__ in (model._no_split_modules or ()):
                fully_shard(module, mp_policy=policy or MixedPrecisionPolicy())
        fully_shard(wrapped, mp_policy=policy or MixedPrecisionPolicy())
        return model, target, wrapped, peft
    wrapped.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return model, target, DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None), peft
    return model, target, wrapped, peft


def without_dropout(config):
    """`config` with every dropout probability set to 0, for use before the model is built. Zeroing nn.Dropout
    modules is not enough: many models read a float from the config instead (Llama's `attention_dropout`, Falcon's
    `hidden_dropout`), some copy it into the layers at construction, and any of them left non-zero makes train mode
    stochastic (a PPO ratio that is not 1 before the first step)."""
    for sub in {id(c): c for c in (config, config.get_text_config())}.values():
        for key, value in list(vars(sub).items()):
            if (any(word in key for word in ("dropout", "pdrop", "layerdrop")) and isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                setattr(sub, key, 0.0)
    return config


def main(args: Args):
    check_numbers(args, positive=["batch_size", "local_micro_batch_size", "total_episodes", "num_train_epochs",
                                  "eval_freq", "keep_checkpoints", "max_bad_updates", "max_grad_norm", "task.maxlen",
                                  "task.eval_size"],
                  non_negative=["lr", "weight_decay", "center_coef", "save_freq"], fraction=["warmup_ratio"])
    check_lora(args, AutoModelForSequenceClassification, args.model_name_or_path, "--model_name_or_path")
    if args.lora_r and args.from_scratch:
        raise ValueError("--lora_r with --from_scratch: the adapters would train on frozen random weights, which no "
                         "folder keeps (the adapter could not be loaded again); drop one of them")
    rank, world_size, device = init_distributed()
    if args.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over a process group: launch with torchrun (--nproc_per_node 1 for one GPU)")
    derive_batch_sizes(args, world_size)
    resume = check_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path, needs_eos=False)
    # no pad token: pad with EOS. The reward is read at the last token that is not the pad, so a sequence that ends
    # with the EOS (a chat template whose end of turn is the EOS, e.g. Llama-3's <|eot_id|>) is read one token
    # earlier; training and scoring (score.py, the online scripts) read the same token, so they agree
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 1. data: rendered, tokenized and checked before any model is loaded
    train, chat, report = load_comparisons(args.task.dataset, args.task.train_split, args, tokenizer, "--task.dataset")
    if rank == 0:
        print(describe("train", train, report, args))
    valid = None
    if args.task.eval_split is not None:
        arg = "--task.eval_dataset" if args.task.eval_dataset else "--task.dataset"
        valid, _, report = load_comparisons(args.task.eval_dataset or args.task.dataset, args.task.eval_split, args,
                                            tokenizer, arg, limit=args.task.eval_size, chat=chat)
        if rank == 0:
            print(describe("eval", valid, report, args))
    normalize = None
    if args.normalize_dataset is not None:
        normalize, too_long = load_normalize_data(args, tokenizer, chat)
        if rank == 0:
            print(f"normalize: {len(normalize)} responses; dropped {too_long} over --task.maxlen {args.task.maxlen}")
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    longest = max(int(np.diff(d.offsets).max()) for d in (train, valid, normalize) if d is not None)
    if limit and longest > limit:
        raise ValueError(f"--task.maxlen {args.task.maxlen}: the data holds sequences of up to {longest} tokens, more "
                         f"than the {limit} positions of --model_name_or_path {args.model_name_or_path}; lower "
                         "--task.maxlen to drop them")
    if args.total_episodes is None:
        args.total_episodes = args.num_train_epochs * len(train)
    args.num_updates = args.total_episodes // args.batch_size
    if args.num_updates == 0 or len(train) < args.batch_size:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the comparisons ({len(train)} rows) or "
                         f"total_episodes ({args.total_episodes})")
    lock = create_output_dir(args, rank, resume)  # noqa: F841 (held until the run ends)

    # 2. model
    torch.manual_seed(args.seed)  # the same head init on every rank
    try:
        model, target, wrapped, peft = build_model(args, tokenizer, device, normalize is not None)
    except SystemExit:  # a model that cannot be loaded or normalised: a fresh run leaves no folder behind
        if rank == 0 and not resume and set(os.listdir(args.output_dir)) <= {"args.json"}:
            shutil.rmtree(args.output_dir)
        raise
    trained = [p for p in wrapped.parameters() if p.requires_grad]  # all of them, or LoRA's adapters and the head
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(args, device) and not args.fsdp)
    pad_id = tokenizer.pad_token_id

    # 3. resume
    state = {"update": 0, "world_size": world_size, "skipped_updates": 0, "bad_in_a_row": 0,
             "run_id": f"{int(time.time())}{random.Random().randrange(16**6):06x}"}
    if resume:
        state = load_checkpoint(resume, wrapped, optimizer, rank, world_size)
        if rank == 0:
            print(f"resumed from {resume} at update {state['update']}")
    logger = Logger(args, rank, state["run_id"], state["update"] if resume else None)
    preemption = Preemption()

    # 4. train (evaluating first, so curves start from the initial model)
    if valid is not None and not resume:
        logger.log({**evaluate(wrapped, valid, pad_id, args, rank, world_size, device, autocast), "episode": 0}, 0)
    start_time, start_update = time.time(), state["update"]
    while state["update"] < args.num_updates:
        update = state["update"]
        lr = lr_at(update, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_indices(len(train), args.batch_size, update, args.seed)
        local = batch[rank * args.local_batch_size:(rank + 1) * args.local_batch_size]
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss / batch_size, correct, pairs, margin, r, n
        for micro in range(args.gradient_accumulation_steps):
            rows = local[micro * args.local_micro_batch_size:(micro + 1) * args.local_micro_batch_size]
            sequences, sizes = micro_batch(train, rows)
            sync = micro == args.gradient_accumulation_steps - 1 or not isinstance(wrapped, DDP)
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
                r = rewards(wrapped, sequences, pad_id, device)
                losses, margin = comparison_losses(r, sizes, args.center_coef)
                loss = losses.sum() / args.batch_size
                (loss * world_size).backward()  # DDP and FSDP2 average gradients over ranks; undo it
            sums += torch.stack([loss.detach().double(), (margin > 0).sum(), torch.tensor(len(margin), device=device),
                                 margin.detach().sum(), r.detach().sum(), torch.tensor(len(r), device=device)]).double()
        stepped, grad_norm = step_if_finite(wrapped, optimizer, sums[0], args, device)
        count_update(state, stepped)
        loss, correct, pairs, margin, total, n = all_reduce(sums).tolist()
        metrics = {"loss/reward_avg": loss, "objective/accuracy": correct / pairs, "objective/reward_margin":
                   margin / pairs, "objective/reward_mean": total / n, "loss/grad_norm": grad_norm,
                   "loss/skipped_updates": state["skipped_updates"], "lr": lr,
                   "episode": state["update"] * args.batch_size,
                   "eps": (state["update"] - start_update) * args.batch_size / (time.time() - start_time)}
        if valid is not None and (state["update"] % args.eval_freq == 0 or state["update"] == args.num_updates):
            metrics.update(evaluate(wrapped, valid, pad_id, args, rank, world_size, device, autocast))
        logger.log(metrics, state["update"])
        checkpoint_or_stop(args, wrapped, optimizer, state, rank, device, preemption, logger)

    # 5. normalise (optional) and save the full model (gathered from the shards under FSDP2; LoRA: merged, plus the
    # adapter alone in <output_dir>/adapter, which does not hold the normalisation's shift)
    full = None
    if peft is not None:
        full = save_lora(model, peft, args, rank)
    elif args.fsdp:
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {name.removeprefix("model."): t for name, t in full.items()}
    if normalize is not None:
        mean, std = mean_reward(wrapped, normalize, pad_id, args, rank, world_size, device, autocast)
        if full is None:
            full = {name: t.detach().cpu() for name, t in model.state_dict().items()} if rank == 0 else {}
        if rank == 0:  # the only rank that holds (FSDP2: gathers) the full weights, and saves them
            full = fold_offset(full, target, mean)
        logger.log({"normalize/reward_mean": mean, "normalize/reward_std": std, "normalize/responses": len(normalize)},
                   state["update"])
        if rank == 0:
            print(f"normalized: subtracted {mean:.6g} (the mean reward of --normalize_dataset's {len(normalize)} "
                  f"responses; their std is {std:.4g}) through the {target[0]} bias {target[1]}.bias")
    if full is not None:
        tied = getattr(model, "all_tied_weights_keys", None) or {}  # saved once, as save_pretrained does
        full = {name: t for name, t in full.items() if name not in tied}
    save_model_atomically(model, tokenizer, args, rank, state_dict=full)
    if rank == 0:
        print(f"saved the reward model and tokenizer to {args.output_dir}")
    end_run(logger, rank)


# ----------------------------------------------------------------------------------------------------------------
# infrastructure shared, as identical copies, by the training scripts: TRY NOT TO MODIFY in one script alone
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


def bf16_compute(args, device):
    """--bf16 applies on GPU. On CPU the scripts run fp32 unless RLHF_BF16_ON_CPU=1, which is for tests: it makes CPU
    runs take the bf16 code paths (CPU autocast, FSDP2 bf16 mixed precision) that otherwise run on GPU only."""
    return args.bf16 and (device.type == "cuda" or os.environ.get("RLHF_BF16_ON_CPU") == "1")


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


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


def derive_batch_sizes(args, world_size):
    """Fill in the computed fields; the global batch is fixed, so 1 or N ranks make the same updates."""
    args.world_size = world_size
    if args.batch_size % world_size:
        raise ValueError(f"--batch_size {args.batch_size} does not divide across {world_size} ranks")
    args.local_batch_size = args.batch_size // world_size
    if args.local_batch_size % args.local_micro_batch_size:
        raise ValueError(f"--batch_size {args.batch_size} over {world_size} ranks is {args.local_batch_size} per rank, "
                         f"not a multiple of --local_micro_batch_size {args.local_micro_batch_size}")
    args.gradient_accumulation_steps = args.local_batch_size // args.local_micro_batch_size


def lr_at(update, args):
    """Linear warmup then cosine decay to 0, a function of the update number only (no dependence on ranks)."""
    warmup = int(args.warmup_ratio * args.num_updates)
    if update < warmup:
        return args.lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, args.num_updates - warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(num_examples, batch_size, update, seed):
    """Example indices of global batch `update`. Each epoch is a seeded permutation, so the order depends on the
    update number alone: the same for every world size, and restored exactly on resume."""
    epoch, step = divmod(update, num_examples // batch_size)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[step * batch_size:(step + 1) * batch_size].tolist()


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


def check_output_dir(args):
    """Refuse to clobber a finished run or to restart an unfinished one silently; return the checkpoint to resume
    (`--resume auto`: the newest one that passes verification). Writes nothing: the folder is made by
    create_output_dir once the inputs have been checked."""
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other")
    if args.overwrite:
        return None
    if os.path.exists(os.path.join(args.output_dir, "config.json")):
        raise FileExistsError(f"--output_dir {args.output_dir} already holds a finished run (config.json); "
                              "pass another --output_dir or --overwrite")
    if checkpoint_names(args.output_dir) and args.resume is None:
        raise FileExistsError(f"--output_dir {args.output_dir} holds checkpoints of an unfinished run; "
                              "pass --resume auto to continue it or --overwrite to start over")
    if args.resume == "auto":
        return latest_checkpoint(args.output_dir)
    if args.resume:
        if not os.path.exists(os.path.join(args.resume, "state.json")):
            raise FileNotFoundError(f"--resume {args.resume}: not a checkpoint folder (no state.json)")
        problem = verify_checkpoint(args.resume)
        if problem:
            raise ValueError(f"--resume {args.resume}: the checkpoint fails verification: {problem}")
    return args.resume


def changed_settings(args, recorded):
    """`--name old -> new` for every argument that differs from those a run was started with, except the ones that
    cannot change its results (where it writes, how often it checkpoints, how it logs)."""
    neutral = {"output_dir", "overwrite", "resume", "save_freq", "keep_checkpoints", "max_bad_updates", "track",
               "wandb_project_name", "wandb_entity", "exp_name", "progress"}

    def flat(d, prefix=""):
        return {k: v for key, value in d.items() for k, v in (flat(value, f"{prefix}{key}.").items()
                                                            if isinstance(value, dict) else [(prefix + key, value)])}

    now, then = flat(json.loads(json.dumps(asdict(args)))), flat(recorded)
    return [f"--{name} {then.get(name, '(absent)')} -> {now.get(name, '(absent)')}"
            for name in sorted(set(now) | set(then)) if name not in neutral and now.get(name) != then.get(name)]


def create_output_dir(args, rank, resume):
    """Take the folder's lock, then: a fresh start (re)creates it and writes args.json; a resume first checks that
    every argument that changes results equals the checkpoint's and never rewrites args.json. Returns the lock."""
    if resume:
        recorded = os.path.join(resume, "args.json")
        if not os.path.exists(recorded):  # checkpoints of older versions: the run's own args.json
            recorded = os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(resume))), "args.json")
        if not os.path.exists(recorded):
            raise FileNotFoundError(f"--resume {resume}: neither the checkpoint nor its run folder holds the args.json "
                                    "the run was started with, so the settings cannot be checked")
        with open(recorded) as f:
            changed = changed_settings(args, json.load(f))
        if changed:
            raise ValueError(f"--resume {resume}: the run was started with other settings, and a resumed run must "
                             f"train as the original would: {'; '.join(changed)}. Resume with the original arguments "
                             f"({recorded}), or start a new run in another --output_dir")
    lock = lock_output_dir(args.output_dir, rank)
    barrier()
    if rank == 0:
        if args.overwrite:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "args.json")
        if not (resume and os.path.exists(path)):
            with open(path + ".tmp", "w") as f:
                json.dump(asdict(args), f, indent=2)
            os.replace(path + ".tmp", path)
    barrier()
    return lock


def checkpoint_names(output_dir):
    """Names of the finished checkpoints in output_dir, oldest first (temporary folders have a dot in their name)."""
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(n for n in names if n.startswith("update_") and "." not in n)


def latest_checkpoint(output_dir):
    """The newest checkpoint in output_dir that passes verification; newer ones that fail are reported and skipped."""
    for name in reversed(checkpoint_names(output_dir)):
        path = os.path.join(output_dir, "checkpoints", name)
        problem = verify_checkpoint(path)
        if not problem:
            return path
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"skipping checkpoint {path}: it fails verification ({problem})", file=sys.stderr, flush=True)
    return None


def file_checksums(folder, names):
    """{name: [size, crc32]} of files in `folder`, each rank reading its share (checkpoints can be hundreds of GB)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for name in names[rank::world_size]:
        crc = 0
        with open(os.path.join(folder, name), "rb") as f:
            while block := f.read(1 << 24):
                crc = zlib.crc32(block, crc)
        mine[name] = [os.path.getsize(os.path.join(folder, name)), crc]
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    return {name: value for part in parts for name, value in part.items()}


def verify_checkpoint(path):
    """None if every file listed in the checkpoint's manifest.json (written last) is there with its size and
    checksum; otherwise what is wrong, naming the file."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest):
        return f"no {manifest} (written last: the checkpoint is incomplete or from an older version)"
    with open(manifest) as f:
        expected = json.load(f)
    missing = [name for name in expected if not os.path.isfile(os.path.join(path, name))]
    if missing:
        return f"missing file {os.path.join(path, missing[0])}"
    for name, (size, crc) in file_checksums(path, sorted(expected)).items():
        if [size, crc] != expected[name]:
            what = "size" if size != expected[name][0] else "checksum"
            return f"{os.path.join(path, name)} has another {what} than when it was written (corrupt)"
    return None


@contextlib.contextmanager
def disk_errors(path):
    """A write that fails for lack of space says so, with the path, instead of torch's C++ messages ("file write
    failed", "enforce fail"); what was half-written at `path` is removed."""
    try:
        yield
    except (OSError, RuntimeError, dcp.CheckpointException) as e:  # dcp wraps what its writers raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        shutil.rmtree(path, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or free < 64 * 2**20:
            raise SystemExit(f"no space left on device while writing {path} ({free / 2**20:.0f} MiB free there): free "
                             "some space or lower --keep_checkpoints, then continue with --resume auto") from e
        raise


def save_checkpoint(args, model, optimizer, state, rank, generators=None):
    """Write a resumable checkpoint atomically (a temporary folder renamed when complete): model and optimizer through
    torch.distributed.checkpoint (FSDP2 shards are written by their owners), `state` (counters, wandb run id), each
    rank's RNG states, the run's args.json, and last manifest.json (size and checksum of every file), which resume
    verifies. Keeps the newest `keep_checkpoints` (this one, verified, always among them)."""
    root = os.path.join(args.output_dir, "checkpoints")
    path = os.path.join(root, f"update_{state['update']:07d}")
    tmp = path + ".tmp"
    with disk_errors(tmp):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
               "generators": {name: g.get_state() for name, g in (generators or {}).items()}}
        torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
        barrier()
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
            shutil.copyfile(os.path.join(args.output_dir, "args.json"), os.path.join(tmp, "args.json"))
        barrier()
        names = sorted(os.path.relpath(os.path.join(d, n), tmp) for d, _, files in os.walk(tmp) for n in files)
        checksums = file_checksums(tmp, names)
        if rank == 0:
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(checksums, f)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        old = checkpoint_names(args.output_dir)
        for name in old[:max(0, len(old) - max(1, args.keep_checkpoints))]:
            if name != os.path.basename(path):
                shutil.rmtree(os.path.join(root, name))
    barrier()
    return path


def load_checkpoint(path, model, optimizer, rank, world_size, generators=None):
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if state["world_size"] != world_size:
        raise ValueError(f"--resume {path}: written by {state['world_size']} ranks, resumed with {world_size}; "
                         "exact resume needs the same number of ranks")
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    rng = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(rng["generators"][name])
    return state


def rewrite_log(path, resumed_update):
    """A fresh start (resumed_update None) begins `path` (a jsonl log with an "update" key) anew; a resumed run keeps
    the lines logged up to its checkpoint. An incomplete last line (a kill or a full disk mid-write) is dropped with a
    warning; a malformed line elsewhere is an error naming the file and line. Rewritten atomically (temporary file,
    rename), so a kill here loses nothing."""
    kept = []
    if resumed_update is not None and os.path.exists(path):
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    print(f"warning: dropping the incomplete last line of {path}: {line[:80]!r}", file=sys.stderr)
                    break
                raise ValueError(f"{path} line {i + 1} is not valid JSON: {line[:80]!r}") from None
            if row["update"] <= resumed_update:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Preemption:
    """SIGTERM, what cluster schedulers send before killing a job, only raises a flag: the training loop finishes the
    update, all ranks agree to stop, a checkpoint is written and the run exits 143. (torchrun forwards SIGTERM to its
    workers and kills them --shutdown-timeout seconds later, 30 by default: an update plus a checkpoint must fit.)"""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self.handler)

    def handler(self, signum, frame):
        self.flag = True

    def requested(self, device):
        return bool(all_reduce(torch.tensor(float(self.flag), device=device), op=dist.ReduceOp.MAX).item())


def step_if_finite(model, optimizer, loss, args, device):
    """Clip gradients and step, unless the loss or the gradient norm is non-finite on any rank: then the gradients
    are dropped and the weights are not touched. Returns (stepped, grad_norm)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    bad = torch.logical_not(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)).float().to(device)
    finite = all_reduce(bad, op=dist.ReduceOp.MAX).item() == 0
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm.item()


def count_update(state, stepped):
    state["update"] += 1
    state["bad_in_a_row"] = 0 if stepped else state["bad_in_a_row"] + 1
    state["skipped_updates"] += 0 if stepped else 1


def checkpoint_or_stop(args, model, optimizer, state, rank, device, preemption, logger, generators=None):
    """After an update: stop with a checkpoint after max_bad_updates skipped updates in a row or on SIGTERM;
    otherwise write the periodic checkpoint."""
    if state["bad_in_a_row"] >= args.max_bad_updates:  # the weights are the last good ones: none of these stepped
        path = save_checkpoint(args, model, optimizer, {**state, "bad_in_a_row": 0}, rank, generators)
        end_run(logger, rank, 1, f"stopping: {state['bad_in_a_row']} updates in a row had a non-finite loss or "
                                 f"gradient norm and were skipped; the last good weights are in {path}. Lower --lr or "
                                 f"check the data, then continue with --resume {path}")
    if preemption.requested(device):
        path = save_checkpoint(args, model, optimizer, state, rank, generators)
        end_run(logger, rank, 143, f"preempted: checkpoint written to {path}; continue with the same command plus "
                                   "--resume auto")
    if args.save_freq and state["update"] % args.save_freq == 0 and state["update"] < args.num_updates:
        save_checkpoint(args, model, optimizer, state, rank, generators)


def end_run(logger, rank, code=0, message=None):
    """Close the logger (wandb), print the message and leave with `code`. Under torchrun the process ends with
    os._exit, skipping Python's own teardown, where gloo's worker threads and the DDP reducer can deadlock over the
    GIL (pytorch#56297); every file has been written and closed by then."""
    logger.close()
    if message and rank == 0:
        print(message, file=sys.stderr if code == 1 else sys.stdout, flush=True)
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)


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


class Logger:
    """Every logged scalar goes to the console and `<output_dir>/metrics.jsonl`, and to wandb with --track (a resumed
    run continues the same wandb run), plus `elapsed`: seconds since logging began (after the models loaded), which a
    resumed run continues from its checkpoint's line. Only rank 0 writes, and shows update k of num_updates, the rate
    and the time left (Progress) unless --no_progress."""

    def __init__(self, args, rank, run_id, resumed_update):
        self.rank, self.wandb, self.start, self.before = rank, None, time.time(), 0.0
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        self.progress = Progress(args.num_updates, resumed_update or 0, "update", rank == 0 and args.progress)
        if rank != 0:
            return
        rewrite_log(self.path, resumed_update)  # a resumed run drops what was logged after its checkpoint
        if resumed_update is not None and os.path.exists(self.path):
            with open(self.path) as f:
                last = f.read().splitlines()[-1:]
            self.before = json.loads(last[0]).get("elapsed", 0.0) if last else 0.0
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                                    name=f"{args.exp_name}__{args.seed}__{run_id}", id=run_id, resume="allow")

    def log(self, metrics, update):
        if self.rank != 0:
            return
        metrics = {**metrics, "elapsed": self.before + time.time() - self.start}
        with open(self.path, "a") as f:
            f.write(json.dumps({"update": update, **metrics}) + "\n")
        self.progress.write(f"update {update}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self.wandb is not None:
            self.wandb.log(metrics, step=update)
        self.progress.update(update)

    def close(self):
        self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_model_atomically(model, tokenizer, args, rank, state_dict=None):
    """`save_pretrained` (safetensors) plus the tokenizer into output_dir; config.json, the file that marks a finished
    run, is moved in last, so an interrupted save never looks finished. `state_dict`: full weights gathered from a
    sharded (FSDP2) model."""
    tmp = os.path.join(args.output_dir, "final.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with disk_errors(tmp):
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
        os.rmdir(tmp)
    barrier()


def check_lora(args, cls, path, arg, **kwargs):
    """The --lora_* arguments, checked first thing (before anything is read or written): lora_r >= 0, lora_alpha > 0,
    lora_dropout in [0, 1); with lora_r > 0 every --lora_target_modules name must match a linear layer of the model at
    `path` (`arg` names it in errors), built from its config on the meta device (no weights read, no memory used).
    `cls`: the model class the script loads it as; `kwargs` go to its config (trust_remote_code)."""
    if args.lora_r < 0:
        raise ValueError(f"--lora_r must be >= 0 (0: full fine-tuning), got {args.lora_r}")
    if not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not args.lora_r:
        return
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{arg} {path}: cannot load its config ({e})") from None
    with torch.device("meta"):
        model = cls.from_config(config, **kwargs)
    lora_targets(model, args.lora_target_modules, f"{arg} {path}")


def lora_targets(model, targets, what):
    """Full names of the linear layers (nn.Linear, GPT-2's Conv1D) that get LoRA adapters: "all-linear": every one
    inside the transformer body (model.base_model), none of the heads (output layer, classifier or value head);
    names: every linear layer whose name is or ends with `.name`. A name that matches none, or the output layer when
    it shares its weights with the input embeddings (the merged weights could not be one tensor), is an error naming
    --lora_target_modules, `what` and the model's linear layers."""
    linear = [name for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    body = next((name for name, m in model.named_modules() if m is model.base_model and m is not model), None)
    chosen = set()
    for target in targets:
        if target == "all-linear":
            found = [name for name in linear if body is None or name.startswith(body + ".")]
        else:
            found = [name for name in linear if name == target or name.endswith("." + target)]
        if not found:
            raise ValueError(f"--lora_target_modules {target}: {what} has no linear layer named {target}; its linear "
                             f"layers: {sorted({name.rpartition('.')[2] for name in linear})} (or all-linear)")
        chosen.update(found)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    for name in chosen:
        if tied and head is not None and model.get_submodule(name) is head:
            raise ValueError(f"--lora_target_modules: {what}'s output layer {name} shares its weights with the input "
                             "embeddings; an adapter on it cannot be merged into one tensor: leave it out")
    return sorted(chosen)


def add_lora(model, args, train_heads=False):
    """With --lora_r > 0, LoRA adapters (peft) on the layers of `model` that lora_targets chooses, put in place: the
    script goes on calling `model`, its linear layers now carry the adapters, and every other weight is frozen
    (requires_grad False) except, with `train_heads`, the heads (every top-level module outside model.base_model: a
    reward or value model's score layer), trained whole as peft's modules_to_save. A is drawn from --seed (the RNG
    states of the CPU and of the current CUDA device, the one a rank uses, are left as they were; torch.manual_seed
    reseeds any other CUDA device), B is zero: the model starts as the base model exactly. Returns the PeftModel around
    it (for peft's disable_adapter and the adapter's save), or None with --lora_r 0 (nothing changes, peft is not
    imported)."""
    if not args.lora_r:
        return None
    from peft import LoraConfig, get_peft_model

    heads = [name for name, child in model.named_children() if child is not model.base_model] if train_heads else []
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_targets(model, args.lora_target_modules, "the model"),
                        modules_to_save=heads or None)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(args.seed)
        return get_peft_model(model, config)


class AdaptersOff:
    """The reference policy when it is the initial policy and the policy trains LoRA adapters: the policy's own module
    called with its adapters switched off (peft's disable_adapter), which is exactly the frozen base model: one copy of
    the weights instead of two. Called as the module would be (under FSDP2, on every rank)."""

    def __init__(self, module, peft):
        self.module, self.peft = module, peft

    def __call__(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.module(*args, **kwargs)


def merged_weights(model):
    """(name, tensor) for every entry of `model`'s state_dict under the plain model's names, one full tensor at a time
    (gathered from FSDP2 shards: every rank takes part, in the same order): a LoRA layer's weight merged,
    W + (lora_alpha / lora_r) * B @ A (transposed for GPT-2's Conv1D, which stores W as [in, out]); a head trained whole
    (add_lora's train_heads): its trained copy; the adapters' own tensors and the heads' original copies left out.
    What the vLLM engine receives and the final save writes; a model without adapters gives its state_dict as is."""
    modules, state = dict(model.named_modules()), model.state_dict()

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()

    for name, tensor in state.items():
        if ".lora_" in name or ".original_module." in name:
            continue
        head, copy, rest = name.partition(".modules_to_save.")
        if copy:
            yield f"{head}.{rest.partition('.')[2]}", full(tensor)
            continue
        layer, adapted, leaf = name.rpartition(".base_layer.")
        if not adapted:
            yield name, full(tensor)
            continue
        lora, merged = modules[layer], full(tensor)
        for adapter in lora.active_adapters if leaf == "weight" else ():
            delta = full(state[f"{layer}.lora_B.{adapter}.weight"]) @ full(state[f"{layer}.lora_A.{adapter}.weight"])
            merged = merged + (delta.T if lora.fan_in_fan_out else delta) * lora.scaling[adapter]
        yield f"{layer}.{leaf}", merged


def save_lora(model, peft, args, rank):
    """The final save of a LoRA run: the adapter alone in <output_dir>/adapter (adapter_config.json and
    adapter_model.safetensors, for peft's PeftModel.from_pretrained on the base model), written by rank 0 through a
    temporary folder renamed when complete; returns the merged weights (merged_weights, on the CPU, without the tied
    copies save_pretrained leaves out) for save_model_atomically, which writes them as a plain model: on rank 0, the
    only rank that writes; the other ranks get {} (a full copy per rank would cost world_size copies of the model in
    host memory). Every rank calls it and walks every weight (FSDP2 gathers are collective)."""
    adapter = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
               for name, t in peft.state_dict().items() if ".lora_" in name or ".modules_to_save." in name}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    merged = {}
    for name, t in merged_weights(model):  # every rank takes part in each gather; rank 0 alone keeps the result
        if rank == 0 and name not in tied:
            merged[name] = t.cpu()
    path = os.path.join(args.output_dir, "adapter")
    if rank == 0:
        with disk_errors(path + ".tmp"):
            peft.save_pretrained(path + ".tmp", state_dict=adapter)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
    barrier()
    return merged


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
