"""Reward model for the GPT-2 / SST-2 example: an LM backbone plus a scalar head, trained to prefer positive sentences.

The model is `AutoModelForSequenceClassification` with `num_labels=1`, so the saved folder loads and scores text with
no extra code. Its reward is read at the last real token: inputs are the sentence's tokens (no EOS appended), right-
padded with the tokenizer's pad id, and the model's own pooling takes the rightmost non-pad token, which is the last
real one (for GPT-2 the pad id is EOS and sentences never contain it).

Training pairs a positive with a negative sentence (a fresh random pairing every epoch) and minimises, by default,
the Bradley-Terry loss  -log sigmoid(r(x_w) - r(x_l))  plus `center_coef * (r(x_w) + r(x_l))**2`, which pins the
free offset of the rewards near 0 so that sign(r) means something (TRL's center_rewards_coefficient). `--loss bce`
instead fits sigmoid(r) to the 0/1 labels of both sentences. Reported on validation: pairwise accuracy
(r(positive) > r(negative) over fixed pairs) and the accuracy of sign(r) against the label.

    python reward_sst2.py                                                   # gpt2 on stanfordnlp/sst2
    torchrun --nproc_per_node 8 reward_sst2.py --model_name_or_path runs/sft_sst2
    python reward_sst2.py --model_name_or_path data/tiny-gpt2 --from_scratch --dataset data/sst2   # offline, CPU
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
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
    """bf16 autocast on GPU (weights and optimizer stay fp32); ignored on CPU, which runs fp32"""

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
    rank, world_size, device = init_distributed()
    derive_batch_sizes(args, world_size)
    resume = check_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
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
    create_output_dir(args, rank)

    # 2. model
    torch.manual_seed(args.seed)  # the same init on every rank
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1)
        config = without_dropout(config) if args.disable_dropout else config
        if args.from_scratch:
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attn_implementation)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                args.model_name_or_path, config=config, attn_implementation=args.attn_implementation)
    except OSError as e:
        raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: cannot load a model ({e})") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # the pooling reads the last token that is not this id
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model.to(device).train()
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    unwrapped = model.module if isinstance(model, DDP) else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")

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

    # 5. save
    save_model_atomically(unwrapped, tokenizer, args, rank)
    if rank == 0:
        print(f"saved the reward model and tokenizer to {args.output_dir}")
    end_run(logger, rank)


# ----------------------------------------------------------------------------------------------------------------
# infrastructure shared, as identical copies, by the training scripts: TRY NOT TO MODIFY in one script alone
# (tests/test_shared_helpers.py checks that the copies agree: change every copy, or none)


def init_distributed():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; a plain `python script.py` is one process. gloo on CPU, nccl on GPU."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # dcp in one process
    return rank, world_size, device


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


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


def check_output_dir(args):
    """Refuse to clobber a finished run or to restart an unfinished one silently; return the checkpoint to resume.
    Writes nothing: the folder is made by create_output_dir once the inputs have been checked."""
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other")
    if args.overwrite:
        return None
    if os.path.exists(os.path.join(args.output_dir, "config.json")):
        raise FileExistsError(f"--output_dir {args.output_dir} already holds a finished run (config.json); "
                              "pass another --output_dir or --overwrite")
    latest = latest_checkpoint(args.output_dir)
    if latest and args.resume is None:
        raise FileExistsError(f"--output_dir {args.output_dir} holds checkpoints of an unfinished run; "
                              "pass --resume auto to continue it or --overwrite to start over")
    resume = latest if args.resume == "auto" else args.resume
    if resume and not os.path.exists(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json)")
    return resume


def create_output_dir(args, rank):
    barrier()
    if rank == 0:
        if args.overwrite:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    barrier()


def latest_checkpoint(output_dir):
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    names = sorted(n for n in os.listdir(root) if n.startswith("update_") and "." not in n)
    return os.path.join(root, names[-1]) if names else None


def save_checkpoint(args, model, optimizer, state, rank, generators=None):
    """Write a resumable checkpoint atomically (a temporary folder renamed when complete): model and optimizer through
    torch.distributed.checkpoint (FSDP2 shards are written by their owners), `state` (counters, wandb run id) and
    each rank's RNG states. Keeps the newest `keep_checkpoints`."""
    root = os.path.join(args.output_dir, "checkpoints")
    path = os.path.join(root, f"update_{state['update']:07d}")
    tmp = path + ".tmp"
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
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        old = sorted(n for n in os.listdir(root) if n.startswith("update_") and "." not in n)
        for name in old[:max(0, len(old) - args.keep_checkpoints)]:
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


class Logger:
    """Every logged scalar goes to the console and `<output_dir>/metrics.jsonl`, and to wandb with --track (a resumed
    run continues the same wandb run). Only rank 0 writes."""

    def __init__(self, args, rank, run_id, resumed_update):
        self.rank, self.wandb = rank, None
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        if rank != 0:
            return
        kept = []  # a fresh start begins a new file; a resumed run drops what was logged after its checkpoint
        if resumed_update is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["update"] <= resumed_update]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                                    name=f"{args.exp_name}__{args.seed}__{run_id}", id=run_id, resume="allow")

    def log(self, metrics, update):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"update": update, **metrics}) + "\n")
        print(f"update {update}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        if self.wandb is not None:
            self.wandb.log(metrics, step=update)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def save_model_atomically(model, tokenizer, args, rank, state_dict=None):
    """`save_pretrained` (safetensors) plus the tokenizer into output_dir; config.json, the file that marks a finished
    run, is moved in last, so an interrupted save never looks finished. `state_dict`: full weights gathered from a
    sharded (FSDP2) model."""
    tmp = os.path.join(args.output_dir, "final.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
        os.rmdir(tmp)
    barrier()


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
