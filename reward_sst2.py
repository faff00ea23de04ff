"""Reward model for the GPT-2 / SST-2 example: an LM backbone plus a scalar head, trained to prefer positive sentences.

The model is `AutoModelForSequenceClassification` with `num_labels=1`, so the saved folder loads and scores text with
no extra code. Its reward is read at the last real token: inputs are the sentence's tokens (no EOS appended), right-
padded with the tokenizer's pad id, and the model's own pooling takes the rightmost non-pad token, which is the last
real one (for GPT-2 the pad id is EOS and sentences never contain it).

Training pairs a positive with a negative sentence (a fresh random pairing every epoch) and minimises, by default,
the Bradley-Terry loss  -log sigmoid(r(x_w) - r(x_l))  plus `center_coef * (r(x_w) + r(x_l))**2`, which pins the
free offset of the rewards near 0 so that sign(r) means something (TRL's center_rewards_coefficient). `--loss bce`
instead fits sigmoid(r) to the 0/1 labels of both sentences. Reported on validation: pairwise accuracy
(r(positive) > r(negative) over fixed pairs) and the accuracy of sign(r) against the label. `--lora_r` trains LoRA
adapters (peft) on the backbone and the scalar head whole; the save is the merged model plus the adapter alone.

    python reward_sst2.py                                                   # gpt2 on stanfordnlp/sst2
    torchrun --nproc_per_node 8 reward_sst2.py --model_name_or_path runs/sft_sst2
    python reward_sst2.py --model_name_or_path data/tiny-gpt2 --from_scratch --dataset data/sst2   # offline, CPU

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
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    # experiment
    exp_name: str = "reward_sst2"
    """name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of head init and data order (shared by all ranks)"""
    track: bool = False
    """log to Weights & Biases"""
    progress: bool = True
    """show progress on rank 0 (update or shard k of N, rate, time left): a bar on a terminal, a line every minute in
    a log file; --no_progress turns it off"""
    wandb_project_name: str = "rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team); None uses your default"""
    output_dir: str = "runs/reward_sst2"
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
    model_name_or_path: str = "gpt2"
    """hub id or local folder of the backbone (a base LM or the SFT model) and its tokenizer"""
    from_scratch: bool = False
    """random weights from the model's config instead of its pretrained weights"""
    disable_dropout: bool = True
    """set every dropout probability to 0 (as lm-human-preferences and sfd train reward models)"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, or flash_attention_2 (GPU)"""
    bf16: bool = True
    """bf16 autocast on GPU (weights and optimizer stay fp32); ignored on CPU, which runs fp32, unless
    RLHF_BF16_ON_CPU=1 (for tests)"""
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

    # data
    dataset: str = "stanfordnlp/sst2"
    """hub id, `save_to_disk` folder, folder of data files, or a .jsonl/.json/.csv/.parquet file"""
    train_split: str = "train"
    """split to train on"""
    eval_dataset: str | None = None
    """where the validation split lives; None: the same place as --dataset"""
    eval_split: str | None = "validation"
    """split to report accuracies on; None disables evaluation"""
    text_column: str = "sentence"
    """column holding the text"""
    label_column: str = "label"
    """column holding the sentiment: 1 positive (preferred), 0 negative"""
    maxlen: int = 64
    """most tokens per sentence; longer sentences are dropped (and counted)"""

    # objective and optimisation
    loss: Literal["bt", "bce"] = "bt"
    """bt: Bradley-Terry on (positive, negative) pairs; bce: sigmoid(r) against each sentence's label"""
    center_coef: float = 0.01
    """weight of (r_w + r_l)^2, which keeps rewards centred on 0 (bt only)"""
    lr: float = 3e-5
    """peak learning rate"""
    warmup_ratio: float = 0.05
    """fraction of the updates with linear warmup; then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (inf disables clipping)"""
    batch_size: int = 32
    """pairs per update, over all ranks (the global batch; it does not change with the number of ranks)"""
    local_micro_batch_size: int = 8
    """pairs per forward/backward pass on one rank"""
    total_episodes: int | None = None
    """pairs to train on; None: num_train_epochs passes (an epoch pairs each sentence of the rarer label once)"""
    num_train_epochs: int = 1
    """passes over the pairs when total_episodes is None"""
    eval_freq: int = 200
    """evaluate every this many updates (and at the end)"""

    # computed at run time
    world_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: number of processes"""
    local_batch_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: batch_size // world_size, pairs per update on one rank"""
    gradient_accumulation_steps: tyro.conf.Suppress[int | None] = None
    """computed at run time: local_batch_size // local_micro_batch_size"""
    num_updates: tyro.conf.Suppress[int | None] = None
    """computed at run time: total_episodes // batch_size"""


# ----------------------------------------------------------------------------------------------------------------
# reward model


def tokenize_by_label(dataset, tokenizer, args):
    """Token ids (no EOS) of positive and negative sentences; drops empty and over-long ones."""
    labels = dataset[args.label_column]
    bad = sorted({y for y in labels if y not in (0, 1)}, key=str)
    if bad:
        raise ValueError(f"--dataset {args.dataset}: column {args.label_column!r} must hold 0 or 1, found {bad[:5]}")
    texts = dataset[args.text_column]
    ids = tokenizer(list(texts)).input_ids
    keep = [i for i, (text, x) in enumerate(zip(texts, ids)) if text.strip() and len(x) <= args.maxlen]
    positives = [ids[i] for i in keep if labels[i] == 1]
    negatives = [ids[i] for i in keep if labels[i] == 0]
    if not positives or not negatives:
        raise ValueError(f"--dataset {args.dataset}: needs sentences of both labels, has {len(positives)} positive "
                         f"and {len(negatives)} negative (after dropping empty ones and those over --maxlen)")
    return positives, negatives, len(texts) - len(keep)


def pair_batch(positives, negatives, batch_size, update, seed):
    """Global batch `update` of (positive, negative) pairs. Each epoch pairs a seeded permutation of the positives
    with one of the negatives, so the pairs depend on the update number alone (any world size, exact resume)."""
    num_pairs = min(len(positives), len(negatives))
    epoch, step = divmod(update, num_pairs // batch_size)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    pos = torch.randperm(len(positives), generator=generator)[:num_pairs]
    neg = torch.randperm(len(negatives), generator=generator)[:num_pairs]
    chosen = slice(step * batch_size, (step + 1) * batch_size)
    return [(positives[i], negatives[j]) for i, j in zip(pos[chosen].tolist(), neg[chosen].tolist())]


def collate(examples, pad_id):
    """Right-pad to the longest example. The mask comes from lengths, so EOS counts even when pad_id == EOS."""
    width = max(len(x) for x in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, x in enumerate(examples):
        input_ids[i, :len(x)] = torch.tensor(x)
        attention_mask[i, :len(x)] = 1
    return input_ids, attention_mask


def rewards(model, examples, pad_id, device):
    """Scalar reward of each example, read by the model's own pooling at its last real token (fp32)."""
    input_ids, attention_mask = (t.to(device) for t in collate(examples, pad_id))
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def pair_losses(r_chosen, r_rejected, args):
    """Per-pair loss: Bradley-Terry plus the centring term, or BCE of both sentences against their labels."""
    if args.loss == "bt":
        return -F.logsigmoid(r_chosen - r_rejected) + args.center_coef * (r_chosen + r_rejected) ** 2
    return -F.logsigmoid(r_chosen) - F.logsigmoid(-r_rejected)


@torch.no_grad()
def evaluate(model, positives, negatives, pad_id, args, rank, world_size, device, autocast):
    """Pairwise accuracy and loss over fixed validation pairs, sign accuracy over every validation sentence.
    `model` is unwrapped: no DDP collectives while ranks run different numbers of batches."""
    model.eval()
    pairs = pair_batch(positives, negatives, min(len(positives), len(negatives)), 0, args.seed)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # correct pairs, loss, pairs, sign correct, sentences, r+
    mine = pairs[rank::world_size]
    for start in range(0, len(mine), args.local_micro_batch_size):
        chunk = mine[start:start + args.local_micro_batch_size]
        with autocast:
            r = rewards(model, [c for c, _ in chunk] + [r for _, r in chunk], pad_id, device)
        r_chosen, r_rejected = r[:len(chunk)], r[len(chunk):]
        sums[:3] += torch.stack([(r_chosen > r_rejected).sum(), pair_losses(r_chosen, r_rejected, args).sum(),
                                 torch.tensor(len(chunk), device=device)]).double()
    sentences = [(x, 1) for x in positives] + [(x, 0) for x in negatives]
    mine = sentences[rank::world_size]
    for start in range(0, len(mine), args.local_micro_batch_size):
        chunk = mine[start:start + args.local_micro_batch_size]
        with autocast:
            r = rewards(model, [x for x, _ in chunk], pad_id, device)
        labels = torch.tensor([y for _, y in chunk], device=device)
        sums[3:] += torch.stack([((r > 0).long() == labels).sum(), torch.tensor(len(chunk), device=device),
                                 r[labels == 1].sum()]).double()
    all_reduce(sums)
    model.train()
    mean_positive = sums[5] / len(positives)
    return {"val/accuracy": (sums[0] / sums[2]).item(), "val/loss": (sums[1] / sums[2]).item(),
            "val/sign_accuracy": (sums[3] / sums[4]).item(), "val/reward_positive": mean_positive.item()}


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
    check_numbers(args, positive=["maxlen", "batch_size", "local_micro_batch_size", "total_episodes",
                                  "num_train_epochs", "eval_freq", "keep_checkpoints", "max_bad_updates",
                                  "max_grad_norm"],
                  non_negative=["lr", "weight_decay", "center_coef", "save_freq"], fraction=["warmup_ratio"])
    check_lora(args, AutoModelForSequenceClassification, args.model_name_or_path, "--model_name_or_path")
    if args.lora_r and args.from_scratch:
        raise ValueError("--lora_r with --from_scratch: the adapters would train on frozen random weights, which no "
                         "folder keeps (the adapter could not be loaded again); drop one of them")
    rank, world_size, device = init_distributed()
    derive_batch_sizes(args, world_size)
    resume = check_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path, needs_eos=False)
    if tokenizer.pad_token is None:  # GPT-2: pad with EOS; sentences never contain it, so pooling is unaffected
        tokenizer.pad_token = tokenizer.eos_token

    # 1. data: validated and tokenized before any model is loaded
    train = load_split(args.dataset, args.train_split, "--dataset")
    require_columns(train, [args.text_column, args.label_column], f"--dataset {args.dataset} split {args.train_split}")
    positives, negatives, dropped = tokenize_by_label(train, tokenizer, args)
    if rank == 0:
        print(f"train: {len(positives)} positive and {len(negatives)} negative sentences; dropped {dropped}")
    eval_positives = eval_negatives = None
    if args.eval_split is not None:
        valid = load_split(args.eval_dataset or args.dataset, args.eval_split, "--eval_dataset")
        require_columns(valid, [args.text_column, args.label_column],
                        f"--eval_dataset {args.eval_dataset or args.dataset} split {args.eval_split}")
        eval_positives, eval_negatives, _ = tokenize_by_label(valid, tokenizer, args)
    num_pairs = min(len(positives), len(negatives))
    if args.total_episodes is None:
        args.total_episodes = args.num_train_epochs * num_pairs
    args.num_updates = args.total_episodes // args.batch_size
    if args.num_updates == 0 or num_pairs < args.batch_size:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the pairs ({num_pairs}) or total_episodes "
                         f"({args.total_episodes})")
    lock = create_output_dir(args, rank, resume)  # noqa: F841 (held until the run ends)

    # 2. model
    torch.manual_seed(args.seed)  # the same init on every rank
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1)
        config = without_dropout(config) if args.disable_dropout else config
        if args.from_scratch:
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn_implementation,
                                                                   dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                args.model_name_or_path, config=config, attn_implementation=args.attn_implementation,
                dtype=torch.float32)  # fp32 master weights, whatever dtype the checkpoint was saved in
    except OSError as e:
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: cannot load a model ({e})") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # the pooling reads the last token that is not this id
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    peft = add_lora(model, args, train_heads=True)
    model.to(device).train()
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    unwrapped = model.module if isinstance(model, DDP) else model
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters (and head)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(args, device))

    # 3. resume
    state = {"update": 0, "world_size": world_size, "skipped_updates": 0, "bad_in_a_row": 0,
             "run_id": f"{int(time.time())}{random.Random().randrange(16**6):06x}"}
    if resume:
        state = load_checkpoint(resume, model, optimizer, rank, world_size)
        if rank == 0:
            print(f"resumed from {resume} at update {state['update']}")
    else:
        torch.manual_seed(args.seed + rank)
    logger = Logger(args, rank, state["run_id"], state["update"] if resume else None)
    preemption = Preemption()

    # 4. train (evaluating first, so curves start from the initial model)
    if eval_positives and not resume:
        logger.log(evaluate(unwrapped, eval_positives, eval_negatives, tokenizer.pad_token_id, args, rank, world_size,
                            device, autocast), 0)
    start_time, start_update = time.time(), state["update"]
    while state["update"] < args.num_updates:
        update = state["update"]
        lr = lr_at(update, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pairs = pair_batch(positives, negatives, args.batch_size, update, args.seed)
        local = pairs[rank * args.local_batch_size:(rank + 1) * args.local_batch_size]
        sums = torch.zeros(3, device=device)  # loss, correct pairs, margin; each summed over local pairs / batch_size
        for micro in range(args.gradient_accumulation_steps):
            chunk = local[micro * args.local_micro_batch_size:(micro + 1) * args.local_micro_batch_size]
            sync = micro == args.gradient_accumulation_steps - 1 or not isinstance(model, DDP)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                r = rewards(model, [c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id, device)
                r_chosen, r_rejected = r[:len(chunk)], r[len(chunk):]
                loss = pair_losses(r_chosen, r_rejected, args).sum() / args.batch_size
                (loss * world_size).backward()  # DDP averages gradients over ranks; undo it to get the global mean
            sums += torch.stack([loss.detach(), (r_chosen > r_rejected).float().sum() / args.batch_size,
                                 (r_chosen - r_rejected).detach().sum() / args.batch_size])
        stepped, grad_norm = step_if_finite(model, optimizer, sums[0], args, device)
        count_update(state, stepped)
        all_reduce(sums)
        metrics = {"loss/reward_avg": sums[0].item(), "objective/accuracy": sums[1].item(),
                   "objective/reward_margin": sums[2].item(), "loss/grad_norm": grad_norm,
                   "loss/skipped_updates": state["skipped_updates"], "lr": lr,
                   "episode": state["update"] * args.batch_size,
                   "eps": (state["update"] - start_update) * args.batch_size / (time.time() - start_time)}
        if eval_positives and (state["update"] % args.eval_freq == 0 or state["update"] == args.num_updates):
            metrics.update(evaluate(unwrapped, eval_positives, eval_negatives, tokenizer.pad_token_id, args, rank,
                                    world_size, device, autocast))
        logger.log(metrics, state["update"])
        checkpoint_or_stop(args, model, optimizer, state, rank, device, preemption, logger)

    # 5. save (LoRA: merged, plus the adapter alone in <output_dir>/adapter)
    full = save_lora(unwrapped, peft, args, rank) if peft is not None else None
    save_model_atomically(unwrapped, tokenizer, args, rank, state_dict=full)
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
