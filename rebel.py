"""REBEL: REgression to RElative REward Based RL (Gao et al. 2024), trained on filter.py's pairs.

For a prompt x with chosen response y and rejected response y' (the best and worst of n samples from the policy
pi_theta0 that starts this iteration), REBEL regresses the difference of log-ratios onto the reward difference:

    loss = mean over pairs of ([log pi(y|x) - log pi0(y|x)] - [log pi(y'|x) - log pi0(y'|x)] - eta (r(x,y) - r(x,y')))^2

with log pi summed over the real response tokens and logits divided by the sampling temperature. pi0's logprobs are
computed once, in batches, before training, and cached beside the run (keyed by the data's fingerprints, the model,
the temperature and the lengths), so a restart does not recompute them. AdamW (betas 0.9, 0.95), cosine schedule with
warmup counted in updates (independent of the number of ranks), gradient clipping.

Fast and memory-lean where the reference code is not: each micro-batch is trimmed to its longest real prompt and
response (prompts are left-padded and responses right-padded, so they meet in the middle); hidden states are kept
only at the real response positions, and the log-softmax over the vocabulary runs over chunks of them in fp32, each
chunk recomputed in the backward pass, so the [batch, length, vocab] fp32 logits never exist (checked against the
model's own forward on the first micro-batch: a model that scales its logits after the head is refused); optional
gradient checkpointing; bf16 and sdpa attention on GPU; DDP, or FSDP2 (`--fsdp`) for models that do not fit on one GPU.
`--lora_r` trains LoRA adapters (peft) instead of every weight: pi0 is then the policy with its adapters off (not a
second copy), and the final save is the merged policy plus the adapter alone in <output_dir>/adapter.

One iteration (t = 0) trains the base policy; iteration t + 1 runs generate -> score -> filter -> rebel again from
the policy of iteration t (docs/rebel.md).

    torchrun --nproc_per_node 8 rebel.py --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \\
        --task.dataset runs/filter --fsdp --gradient_checkpointing --output_dir runs/rebel_iter0

Documentation: docs/rebel.md
"""

import contextlib
import errno
import fcntl
import hashlib
import inspect
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

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PAIR_COLUMNS = ["prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask",
                "reject_input_ids", "reject_attention_mask", "chosen_reward", "reject_reward"]


@dataclass
class TaskArgs:
    dataset: str = "runs/filter"
    """filter.py's output (a `save_to_disk` folder or hub id) with the columns in PAIR_COLUMNS"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str | None = "test"
    """split for val/loss and val/sign_align; None disables evaluation"""
    maxlen_prompt: int = 1024
    """width the prompts were left-padded to by filter.py (checked against the data)"""
    maxlen: int = 2048
    """width the responses were right-padded to by filter.py (checked against the data)"""
    temperature: float = 0.8
    """the sampling temperature of generate.py: logits are divided by it before the log-softmax"""


@dataclass
class RebelArgs:
    eta: float = 1e6
    """the regression target is eta * (r(y) - r(y')); 1e6 with ArmoRM as in the paper"""


@dataclass
class Args:
    # experiment
    exp_name: str = "rebel"
    """name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of data order (shared by all ranks)"""
    track: bool = False
    """log to Weights & Biases"""
    progress: bool = True
    """show progress on rank 0 (update or shard k of N, rate, time left): a bar on a terminal, a line every minute in
    a log file; --no_progress turns it off"""
    wandb_project_name: str = "rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team); None uses your default"""
    output_dir: str = "runs/rebel"
    """run folder: args.json, metrics.jsonl, ref_logprobs/, checkpoints/ and, at the end, the policy"""
    overwrite: bool = False
    """delete whatever output_dir holds and start over"""
    resume: str | None = None
    """a checkpoint folder to continue from, or "auto" for the latest in output_dir (a fresh start if none)"""
    save_freq: int = 100
    """write a resumable checkpoint every this many updates (0: only on preemption or a stop)"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    max_bad_updates: int = 5
    """stop after this many updates in a row with a non-finite loss or gradient norm (each one is skipped)"""

    # model
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """the policy of this iteration (hub id or local folder), with its tokenizer"""
    ref_model_name_or_path: str | None = None
    """pi_theta0 of the loss; None: model_name_or_path (the policy that generated this iteration's data)"""
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
    """LoRA rank: train low-rank adapters (peft) on the policy's layers --lora_target_modules names, every other weight
    frozen, and use the policy with its adapters off as the reference (one copy of the weights; unless
    --ref_model_name_or_path names another model); 0: full fine-tuning. The final save is the merged policy (a plain
    model) plus the adapter alone in <output_dir>/adapter"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (lora_alpha / lora_r) * B @ A to its layer's weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in train mode (0: none, as every other dropout here)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the linear layers that get adapters: all-linear (every linear layer of the transformer body, not the output
    or classifier head), or names: each layer whose name is or ends with one of them (e.g. q_proj v_proj)"""
    logprob_chunk_size: int = 1024
    """response tokens per chunk of the fp32 vocabulary log-softmax"""

    # optimisation
    lr: float = 3e-7
    """peak learning rate"""
    warmup_ratio: float = 0.1
    """fraction of the updates with linear warmup; then cosine decay to 0"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (inf disables clipping)"""
    batch_size: int = 128
    """pairs per update, over all ranks (the global batch; it does not change with the number of ranks)"""
    local_micro_batch_size: int = 1
    """pairs per forward/backward pass on one rank (two sequences each: chosen and reject)"""
    total_episodes: int | None = None
    """pairs to train on; None: num_train_epochs passes over the train split"""
    num_train_epochs: int = 1
    """passes over the train split when total_episodes is None"""
    eval_freq: int = 50
    """evaluate on the eval split every this many updates (and before the first and after the last)"""

    task: TaskArgs = field(default_factory=TaskArgs)
    """the data: filter.py's pairs, their padded widths and sampling temperature"""
    rebel: RebelArgs = field(default_factory=RebelArgs)
    """REBEL's own hyperparameters"""

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
# REBEL


def load_pairs(split, args, vocab_size):
    """A split of filter.py's output as torch tensors, checked: columns, padded widths, ids inside the embedding table,
    finite rewards, a real token in every response."""
    data = load_split(args.task.dataset, split, "--task.dataset")
    what = f"--task.dataset {args.task.dataset} split {split}"
    require_columns(data, PAIR_COLUMNS, what)
    data = data.select_columns(PAIR_COLUMNS)
    widths = {"prompt": args.task.maxlen_prompt, "chosen": args.task.maxlen, "reject": args.task.maxlen}
    for start, rows in zip(range(0, len(data), 4096), data.with_format("numpy").iter(batch_size=4096)):
        for name, width in widths.items():
            ids, mask = np.stack(rows[f"{name}_input_ids"]), np.stack(rows[f"{name}_attention_mask"])
            if ids.shape[1] != width:
                raise ValueError(f"{what}: {name}_input_ids is padded to {ids.shape[1]} tokens, but --task."
                                 f"{'maxlen_prompt' if name == 'prompt' else 'maxlen'} is {width}")
            if ids.max() >= vocab_size or ids.min() < 0:
                raise ValueError(f"{what}: {name}_input_ids holds ids outside the model's embedding table "
                                 f"(size {vocab_size})")
            if (mask.sum(1) == 0).any():
                row = start + int(np.argmax(mask.sum(1) == 0))
                part = "prompt" if name == "prompt" else f"{name} response"
                raise ValueError(f"{what}: row {row} has an empty {part} (no real token)")
        rewards = np.stack([rows["chosen_reward"], rows["reject_reward"]], 1)
        if not np.isfinite(rewards).all():
            row = int(np.argmax(~np.isfinite(rewards).all(1)))
            raise ValueError(f"{what}: row {start + row} has a non-finite reward {rewards[row].tolist()}")
    return data.with_format("torch")


def trimmed_batch(data, indices, device):
    """Chosen and reject sequences of the pairs `indices` ([chosen..., reject...]), trimmed to the longest real prompt
    and the longest real response: [left-padded prompt | right-padded response], so they meet in the middle."""
    rows = data[indices]
    prompt_len = int(rows["prompt_attention_mask"].sum(1).max())
    response_len = int(torch.cat([rows["chosen_attention_mask"], rows["reject_attention_mask"]]).sum(1).max())
    prompt = rows["prompt_input_ids"][:, -prompt_len:].repeat(2, 1)
    prompt_mask = rows["prompt_attention_mask"][:, -prompt_len:].repeat(2, 1)
    response = torch.cat([rows["chosen_input_ids"], rows["reject_input_ids"]])[:, :response_len]
    response_mask = torch.cat([rows["chosen_attention_mask"], rows["reject_attention_mask"]])[:, :response_len]
    batch = {"input_ids": torch.cat([prompt, response], 1).long(), "attention_mask": torch.cat(
        [prompt_mask, response_mask], 1).long(), "response_mask": response_mask.bool(), "prompt_len": prompt_len}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def chunk_logprobs(hidden, targets, lm_head, temperature):
    logits = lm_head(hidden).float() / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


class SequenceLogprobs(torch.nn.Module):
    """log pi(response | prompt) summed over the real response tokens, from one forward pass on a trimmed batch.
    Hidden states are kept only at real response positions; the fp32 log-softmax runs over chunks of them, each
    recomputed in the backward pass (activation checkpointing), so the full fp32 logits never exist."""

    def __init__(self, model, temperature, chunk_size):
        super().__init__()
        self.model, self.temperature, self.chunk_size = model, temperature, chunk_size

    def forward(self, input_ids, attention_mask, response_mask, prompt_len, probe=False):
        if probe:  # check_logprob_path, through forward so that FSDP2 gathers the weights: both paths in one call
            keep = {"logits_to_keep": input_ids.shape[1] - prompt_len + 1}  # the positions that predict the response
            if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
                keep = {}
            return self.token_logprobs(input_ids, attention_mask, response_mask, prompt_len), self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0), **keep).logits
        logprobs = self.token_logprobs(input_ids, attention_mask, response_mask, prompt_len)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(response_mask)[response_mask]
        return torch.zeros(len(input_ids), device=input_ids.device).index_add(0, rows, logprobs)

    def token_logprobs(self, input_ids, attention_mask, response_mask, prompt_len):
        """Logprobs of the real response tokens, flattened in row order."""
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        hidden = hidden[:, prompt_len - 1:-1][response_mask]  # states that predict the real response tokens
        targets = input_ids[:, prompt_len:][response_mask]
        lm_head = self.model.get_output_embeddings()
        pieces = []
        for start in range(0, len(targets), self.chunk_size):
            args = (hidden[start:start + self.chunk_size], targets[start:start + self.chunk_size], lm_head,
                    self.temperature)
            pieces.append(checkpoint(chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else chunk_logprobs(*args))
        return torch.cat(pieces)


@contextlib.contextmanager
def probe_attention(model):
    """The logprob probe runs in fp32 (unless FSDP2 computes in bf16), which flash-attention kernels refuse
    (fp16/bf16 tensors only): for its length the model attends with sdpa (eager for a model without sdpa), then with
    its configured implementation again. The probe checks the output layer, not the attention kernel. Set on the
    configs directly: switching back through `set_attn_implementation` would re-check that the kernel's package is
    installed."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(
        m.config, "_attn_implementation_internal")}.values()
    before = [c._attn_implementation_internal for c in configs]
    use = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    for c, attn in zip(configs, before):
        if attn not in ("sdpa", "eager"):
            c._attn_implementation_internal = use
    try:
        yield
    finally:
        for c, attn in zip(configs, before):
            c._attn_implementation_internal = attn


def probe_tolerance(logits, temperature):
    """How far the fast path's logprobs may lie from the model's own forward's (`logits`: the forward's logits in the
    dtype it computed them in, before the division by `temperature`). In fp32 1e-3 (rounding is about 1e-5). In
    bf16/fp16 the two paths' logits may round to neighbouring values: up to one unit in the last place (eps * |logit|)
    apart, for the target's logit and for the log-sum-exp, so 2 * eps * max |logit| / temperature more. A logit
    transform after the output layer (a scale of 1/2 or less, soft-capping) moves logprobs by far more."""
    if logits.dtype == torch.float32:
        return 1e-3
    return 1e-3 + 2 * torch.finfo(logits.dtype).eps * logits.float().abs().max().item() / temperature


@torch.no_grad()
def check_logprob_path(wrapped, batch, what):
    """Prove on one micro-batch that SequenceLogprobs (the base model, then the output embedding at the response
    positions) gives the logprobs of the model's own forward, both computed as training computes them (fp32 weights
    without autocast, or FSDP2's bf16 mixed precision) and compared with the tolerance of that dtype
    (probe_tolerance), with sdpa attention (probe_attention). It does not for a model that transforms its logits after
    the output embedding (Granite's `logits_scaling`, Cohere's `logit_scale`, soft-capping): refused."""
    model, training = wrapped.model, wrapped.model.training
    model.eval()
    with probe_attention(model):
        fast, raw = wrapped(**batch, probe=True)
    input_ids, prompt_len = batch["input_ids"], batch["prompt_len"]
    raw = raw[:, -(input_ids.shape[1] - prompt_len + 1):-1]
    slow = (raw.float() / wrapped.temperature).log_softmax(-1).gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    slow = slow[batch["response_mask"]]
    model.train(training)
    gap, tolerance = (fast - slow).abs().max().item(), probe_tolerance(raw, wrapped.temperature)
    if not gap <= tolerance:  # a NaN gap is refused too
        found = {k: v for k, v in vars(model.config.get_text_config()).items()
                 if k in ("logits_scaling", "logit_scale", "final_logit_softcapping", "output_multiplier_scale")}
        raise SystemExit(f"{what}: the model's own forward gives other logprobs than the fast logprob path (base "
                         f"model, then the output embedding) on the first micro-batch: up to {gap:.3g} nats per "
                         f"token, more than {str(raw.dtype).removeprefix('torch.')} rounding explains "
                         f"({tolerance:.3g}; both paths ran in that dtype). It transforms its logits after the output "
                         f"embedding{f' ({found})' if found else ''}, which the chunked log-softmax does not "
                         "reproduce; this script cannot train this model as is")


def rebel_losses(logprobs, ref_logprobs, rewards, eta):
    """Per-pair REBEL loss and its parts; every argument is [pairs, 2] (chosen, reject)."""
    log_ratio = logprobs - ref_logprobs
    diff = log_ratio[:, 0] - log_ratio[:, 1]
    target = eta * (rewards[:, 0] - rewards[:, 1])
    return (diff - target) ** 2, diff, target, log_ratio


def sign_align(diff, target):
    """1 where the log-ratio difference has the sign of the reward difference, 0 where not, 1/2 at a tie (so the
    untrained policy, whose difference is exactly 0, scores chance level 0.5)."""
    return ((diff * target > 0).double() + 0.5 * ((diff == 0) & (target != 0)).double())


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


def build_model(path, arg, args, device, probe, trainable=True):
    """The policy (or the reference) wrapped to return sequence logprobs, checked against the model's own forward on
    the micro-batch `probe`; dropout off (config and modules); with --lora_r, LoRA adapters on the trained policy;
    FSDP2, or DDP when trainable. Returns (the module, the PeftModel or None)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=without_dropout(AutoConfig.from_pretrained(path)),
                                                     attn_implementation=args.attn_implementation, dtype=torch.float32)
    except OSError as e:
        raise SystemExit(f"{arg} {path}: cannot load a model ({e})") from None
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "final_logit_softcapping", None):
        raise SystemExit(f"{arg} {path}: logit soft-capping is not supported by the chunked log-softmax")
    peft = add_lora(model, args) if trainable else None
    wrapped = SequenceLogprobs(model, args.task.temperature, args.logprob_chunk_size)
    if args.fsdp:  # sharded while still on the CPU: fully_shard moves each unit to the device as it shards it
        bf16 = bf16_compute(args, device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        for module in model.modules():
            if type(module).__name__ in (model._no_split_modules or ()):
                fully_shard(module, mp_policy=policy or MixedPrecisionPolicy())
        fully_shard(wrapped, mp_policy=policy or MixedPrecisionPolicy())
    else:
        wrapped.to(device)
    check_logprob_path(wrapped, probe, f"{arg} {path}")
    if args.fsdp:  # the root stays gathered after its forward: register the shards again, for the optimizer to hold
        wrapped.reshard()
    elif dist.is_initialized() and trainable:
        return DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None), peft
    return wrapped, peft


def fingerprint(path):
    """What identifies a model for the reference cache: its name and, for a local folder, its weight files."""
    parts = [os.path.abspath(path) if os.path.isdir(path) else path]
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", "config.json")):
                stat = os.stat(os.path.join(path, name))
                parts.append(f"{name}:{stat.st_size}:{int(stat.st_mtime)}")
    return parts


def sharded_pass(model, data, indices, args, rank, world_size, device, autocast):
    """Sequence logprobs [pairs, 2] of the pairs `indices`, computed in micro-batches spread over the ranks (every
    rank runs the same number of passes, as FSDP2 needs) and summed back together. No gradients."""
    step = args.local_micro_batch_size * world_size
    out = torch.zeros(len(indices), 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(indices), step):
            mine = list(range(start + rank * args.local_micro_batch_size,
                              min(start + (rank + 1) * args.local_micro_batch_size, len(indices))))
            positions = mine or [0]  # a rank with nothing left runs a dummy pass and discards it
            batch = trimmed_batch(data, [indices[p] for p in positions], device)
            with autocast:
                logprobs = model(**batch).double().view(2, -1).T
            if mine:
                out[mine] = logprobs
    return all_reduce(out)


def reference_logprobs(splits, args, rank, world_size, device, autocast, probe, policy=None):
    """pi0's sequence logprobs of every pair of every split, from the cache beside the run or computed once: by a
    model loaded for it, or, `policy` (the module and its PeftModel) given, by the LoRA policy with its adapters off,
    which is the initial policy exactly (one copy of the weights)."""
    key = hashlib.sha256(json.dumps({
        "data": {name: data._fingerprint for name, data in splits.items()},
        "model": fingerprint(args.ref_model_name_or_path or args.model_name_or_path),
        "temperature": args.task.temperature, "maxlen_prompt": args.task.maxlen_prompt, "maxlen": args.task.maxlen,
        "attn": args.attn_implementation, "bf16": bf16_compute(args, device), "fsdp": args.fsdp,
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.output_dir, "ref_logprobs", f"{key}.pt")
    if os.path.exists(path):
        if rank == 0:
            print(f"reference logprobs: cached in {path}")
        cached = torch.load(path)
        return {name: cached[name].to(device) for name in splits}
    start = time.time()
    arg = "--ref_model_name_or_path" if args.ref_model_name_or_path else "--model_name_or_path"
    module = policy[0] if policy else build_model(args.ref_model_name_or_path or args.model_name_or_path, arg, args,
                                                  device, probe, trainable=False)[0]
    module.eval()
    model = AdaptersOff(*policy) if policy else module
    result = {name: sharded_pass(model, data, list(range(len(data))), args, rank, world_size, device, autocast)
              for name, data in splits.items()}
    module.train()
    if args.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward: shards again before the optimizer
        module.reshard()
    del model, module
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({name: t.cpu() for name, t in result.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"reference logprobs: computed in {time.time() - start:.0f} s, cached in {path}")
    barrier()
    return result


@torch.no_grad()
def evaluate(model, data, ref, rewards, args, rank, world_size, device, autocast):
    """val/loss and val/sign_align over the whole eval split."""
    model.eval()
    logprobs = sharded_pass(model, data, list(range(len(data))), args, rank, world_size, device, autocast)
    model.train()
    losses, diff, target, _ = rebel_losses(logprobs, ref, rewards, args.rebel.eta)
    return {"val/loss": losses.mean().item(), "val/sign_align": sign_align(diff, target).mean().item()}


def main(args: Args):
    check_numbers(args, positive=["logprob_chunk_size", "batch_size", "local_micro_batch_size", "total_episodes",
                                  "num_train_epochs", "eval_freq", "keep_checkpoints", "max_bad_updates",
                                  "max_grad_norm", "task.maxlen_prompt", "task.maxlen", "task.temperature",
                                  "rebel.eta"],
                  non_negative=["lr", "weight_decay", "save_freq"], fraction=["warmup_ratio"])
    check_lora(args, AutoModelForCausalLM, args.model_name_or_path, "--model_name_or_path")
    rank, world_size, device = init_distributed()
    derive_batch_sizes(args, world_size)
    resume = check_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over a process group: launch with torchrun (--nproc_per_node 1 for one GPU)")
    vocab_size = AutoConfig.from_pretrained(args.model_name_or_path).get_text_config().vocab_size

    # 1. data, checked before any model is loaded
    splits = {"train": load_pairs(args.task.train_split, args, vocab_size)}
    if args.task.eval_split is not None:
        splits["eval"] = load_pairs(args.task.eval_split, args, vocab_size)
    train = splits["train"]
    if args.total_episodes is None:
        args.total_episodes = args.num_train_epochs * len(train)
    args.num_updates = args.total_episodes // args.batch_size
    if args.num_updates == 0 or len(train) < args.batch_size:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the data ({len(train)} pairs) or "
                         f"total_episodes ({args.total_episodes})")
    rewards = {name: torch.stack([d["chosen_reward"][:], d["reject_reward"][:]], 1).double().to(device)
               for name, d in splits.items()}
    lock = create_output_dir(args, rank, resume)  # noqa: F841 (held until the run ends)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(args, device) and not args.fsdp)

    # 2. reference logprobs, once (cached), then the policy; each model's fast logprob path is first checked against
    # its own forward on one micro-batch (`probe`). A LoRA policy is its own reference: its adapters switched off
    probe = trimmed_batch(train, list(range(args.local_micro_batch_size)), device)
    adapters_off = args.lora_r > 0 and args.ref_model_name_or_path is None
    ref = None if adapters_off else reference_logprobs(splits, args, rank, world_size, device, autocast, probe)
    torch.manual_seed(args.seed)
    model, peft = build_model(args.model_name_or_path, "--model_name_or_path", args, device, probe)
    if adapters_off:
        ref = reference_logprobs(splits, args, rank, world_size, device, autocast, probe, policy=(model, peft))
    model.train()
    unwrapped = model.module if isinstance(model, DDP) else model
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    # 3. resume
    state = {"update": 0, "world_size": world_size, "skipped_updates": 0, "bad_in_a_row": 0,
             "run_id": f"{int(time.time())}{random.Random().randrange(16**6):06x}"}
    if resume:
        state = load_checkpoint(resume, model, optimizer, rank, world_size)
        if rank == 0:
            print(f"resumed from {resume} at update {state['update']}")
    logger = Logger(args, rank, state["run_id"], state["update"] if resume else None)
    preemption = Preemption()
    if "eval" in splits and not resume:
        logger.log({**evaluate(model, splits["eval"], ref["eval"], rewards["eval"], args, rank, world_size, device,
                               autocast), "episode": 0}, 0)

    # 4. train
    start_time, start_update = time.time(), state["update"]
    while state["update"] < args.num_updates:
        update = state["update"]
        lr = lr_at(update, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_indices(len(train), args.batch_size, update, args.seed)
        local = batch[rank * args.local_batch_size:(rank + 1) * args.local_batch_size]
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        ratios = []
        for micro in range(args.gradient_accumulation_steps):
            pairs = local[micro * args.local_micro_batch_size:(micro + 1) * args.local_micro_batch_size]
            sync = micro == args.gradient_accumulation_steps - 1 or not isinstance(model, DDP)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                logprobs = model(**trimmed_batch(train, pairs, device)).view(2, -1).T  # [pairs, (chosen, reject)]
                losses, diff, target, log_ratio = rebel_losses(logprobs.double(), ref["train"][pairs],
                                                               rewards["train"][pairs], args.rebel.eta)
                loss = losses.sum() / args.batch_size
                (loss * world_size).backward()  # DDP and FSDP2 average gradients over ranks; undo it
            with torch.no_grad():
                sums += torch.stack([losses.sum(), -log_ratio[:, 0].sum(), -log_ratio[:, 1].sum(), diff.abs().sum(),
                                     target.abs().sum(), sign_align(diff, target).sum(),
                                     torch.tensor(float(len(pairs)), device=device, dtype=torch.float64)])
                ratios.append(log_ratio.exp().flatten())
        stepped, grad_norm = step_if_finite(model, optimizer, sums[0] / args.batch_size, args, device)
        count_update(state, stepped)

        # metrics, reduced over ranks
        ratios = torch.cat(ratios)
        ratio_sums = all_reduce(torch.stack([ratios.sum(), (ratios ** 2).sum(), torch.tensor(
            float(len(ratios)), device=device, dtype=torch.float64)]).double())
        loss_sum, chosen_kl, reject_kl, abs_diff, abs_target, aligned, n = all_reduce(sums).tolist()
        ratio_mean = (ratio_sums[0] / ratio_sums[2]).item()
        metrics = {"loss/policy_avg": loss_sum / n, "objective/kl": (chosen_kl + reject_kl) / (2 * n),
                   "objective/chosen_kl": chosen_kl / n, "objective/reject_kl": reject_kl / n,
                   "objective/abs_logratio_diff": abs_diff / n, "objective/abs_eta_reward_diff": abs_target / n,
                   "objective/sign_align": aligned / n, "val/ratio": ratio_mean,
                   "val/ratio_var": (ratio_sums[1] / ratio_sums[2]).item() - ratio_mean ** 2,
                   "loss/grad_norm": grad_norm, "loss/skipped_updates": state["skipped_updates"], "lr": lr,
                   "episode": state["update"] * args.batch_size,
                   "eps": (state["update"] - start_update) * args.batch_size / (time.time() - start_time)}
        if "eval" in splits and (state["update"] % args.eval_freq == 0 or state["update"] == args.num_updates):
            metrics.update(evaluate(model, splits["eval"], ref["eval"], rewards["eval"], args, rank, world_size,
                                    device, autocast))
        logger.log(metrics, state["update"])
        checkpoint_or_stop(args, model, optimizer, state, rank, device, preemption, logger)

    # 5. save the full policy (gathered from the shards under FSDP2)
    full = None
    if peft is not None:  # merged, plus the adapter alone in <output_dir>/adapter
        full = save_lora(unwrapped.model, peft, args, rank)
    elif args.fsdp:
        tied = getattr(unwrapped.model, "all_tied_weights_keys", None) or {}  # saved once, as save_pretrained does
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {name: t for name, t in ((n.removeprefix("model."), t) for n, t in full.items()) if name not in tied}
    save_model_atomically(unwrapped.model, tokenizer, args, rank, state_dict=full)
    if rank == 0:
        print(f"saved the policy and tokenizer to {args.output_dir}")
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
