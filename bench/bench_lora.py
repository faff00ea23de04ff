"""LoRA (--lora_r) against full fine-tuning in the online scripts' update, one command, same model and batch: peak
memory and update time, and the ratios.

full:  the policy trained whole (fp32 weights, gradients, AdamW's two moments) and a second copy of the initial
       policy as the reference, as ppo.py / rloo.py / grpo.py / rebel_online.py hold them at --lora_r 0.
lora:  the same policy with LoRA adapters (sft.add_lora: --lora_r, --lora_alpha, --lora_target_modules), only the
       adapters trained (their gradients and AdamW state), the reference = the policy with its adapters off
       (AdaptersOff: no second copy), as the scripts hold them with --lora_r > 0.

One update, as the scripts make it: reference logprobs of the batch (no gradient), then forward and backward of the
policy's logprobs (rloo.py's CausalLogprobs, chunked log-softmax) over micro-batches, gradient clipping, an AdamW step.
Each variant runs in its own process: on CPU its peak resident memory (ru_maxrss) over what the process held before
loading any model (the weights, a memory map of the checkpoint, are read once after loading so that they are resident),
on GPU torch's peak allocated memory; the first update warms up (and allocates AdamW's state), the next ones are
timed. Also reported: the memory after loading (weights: one copy or two) and the trainable parameters.

    python bench/bench_lora.py                              # SmolLM2-135M (data/smollm2-135m-instruct)
    python bench/bench_lora.py --model EleutherAI/pythia-1b-deduped --lora_r 1024 --lora_alpha 2048 \\
        --lora_target_modules query_key_value               # the REBEL authors' TL;DR adapter shape
"""

import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    model: str = os.path.join(ROOT, "data", "smollm2-135m-instruct")
    """the policy (hub id or local folder; python data/make_smollm2.py writes the default)"""
    lora_r: int = 16
    """LoRA rank of the lora variant"""
    lora_alpha: float = 32.0
    """LoRA alpha of the lora variant"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """layers with adapters (as --lora_target_modules)"""
    batch_size: int = 8
    """sequences per update"""
    local_micro_batch_size: int = 4
    """sequences per forward/backward pass"""
    prompt_length: int = 64
    """prompt tokens per sequence"""
    response_length: int = 64
    """response tokens per sequence (all in the loss)"""
    updates: int = 3
    """timed updates per variant (after one warm-up update)"""
    threads: int = 2
    """torch CPU threads"""
    output: str = os.path.join(ROOT, "bench", "results", "bench_lora.json")
    """where the numbers are written"""


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(name, args, queue):
    from transformers import AutoModelForCausalLM

    import rloo
    import sft

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = peak_mib(device)

    def load():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        with torch.no_grad():  # on CPU the weights are a memory map of the file: read them all, so that they count
            sum(p.sum() for p in model.parameters())
        return rloo.CausalLogprobs(model, 1.0, 1024).to(device)

    policy = load()
    lora = name == "lora"
    if lora:
        peft = sft.add_lora(policy.model, sft.Args(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                                   lora_target_modules=args.lora_target_modules))
        policy.to(device)  # the adapters were created on the CPU
        reference = sft.AdaptersOff(policy, peft)
    else:
        reference = load().requires_grad_(False)
    loaded = peak_mib(device)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    queries = torch.randint(10, vocab, (args.batch_size, args.prompt_length), generator=g).to(device)
    responses = torch.randint(10, vocab, (args.batch_size, args.response_length), generator=g).to(device)
    query_mask = torch.ones_like(queries)
    advantages = torch.randn(args.batch_size, generator=g).to(device)
    timings = []
    for _ in range(args.updates + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            ref = torch.cat([rloo.forward_response(reference, queries[i:i + args.local_micro_batch_size],
                                                   query_mask[i:i + args.local_micro_batch_size],
                                                   responses[i:i + args.local_micro_batch_size])[0]
                             for i in range(0, args.batch_size, args.local_micro_batch_size)])
        for i in range(0, args.batch_size, args.local_micro_batch_size):
            part = slice(i, i + args.local_micro_batch_size)
            logprobs = rloo.forward_response(policy, queries[part], query_mask[part], responses[part])[0]
            loss = (-(advantages[part, None] * logprobs) + 0.05 * (logprobs - ref[part]) ** 2).sum()
            (loss / args.batch_size).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - began)
    queue.put({"name": name, "device": str(device), "loaded_mib": loaded - start, "peak_mib": peak_mib(device) - start,
               "update_s": sum(timings[1:]) / args.updates, "warmup_s": timings[0],
               "params": sum(p.numel() for n, p in policy.named_parameters() if ".lora_" not in n),
               "trainable_params": sum(p.numel() for p in trained), "ref_first": ref[0, :4].tolist()})


def main(args: Args):
    if not os.path.exists(args.model) and args.model.startswith(("/", ".")):
        raise SystemExit(f"--model {args.model}: no such folder (python data/make_smollm2.py writes the default)")
    context = mp.get_context("spawn")
    results = {}
    for name in ("full", "lora"):
        queue = context.Queue()
        process = context.Process(target=run_variant, args=(name, args, queue))
        process.start()
        results[name] = queue.get()
        process.join()
    full, lora = results["full"], results["lora"]
    assert torch.allclose(torch.tensor(full["ref_first"]), torch.tensor(lora["ref_first"]), atol=1e-5), \
        "the adapters-off reference disagrees with the reference copy"
    report = {"args": asdict(args), **results, "peak_memory_ratio": lora["peak_mib"] / full["peak_mib"],
              "loaded_memory_ratio": lora["loaded_mib"] / full["loaded_mib"],
              "update_time_ratio": lora["update_s"] / full["update_s"]}
    tokens = args.batch_size * (args.prompt_length + args.response_length)
    print(f"{args.model}: {full['trainable_params'] / 1e6:.1f} M parameters; LoRA r {args.lora_r}, alpha "
          f"{args.lora_alpha:g}, {' '.join(args.lora_target_modules)}: {lora['trainable_params'] / 1e6:.2f} M trained; "
          f"{args.batch_size} x ({args.prompt_length} + {args.response_length}) tokens ({tokens}) per update, "
          f"micro-batch {args.local_micro_batch_size}; {full['device']}, {args.threads} threads")
    print(f"{'':<6}{'after loading MiB':>19}{'peak MiB':>10}{'update s':>10}")
    for name, r in results.items():
        print(f"{name:<6}{r['loaded_mib']:>19.0f}{r['peak_mib']:>10.0f}{r['update_s']:>10.2f}")
    print(f"lora / full: peak memory {report['peak_memory_ratio']:.2f}x, after loading "
          f"{report['loaded_memory_ratio']:.2f}x, update time {report['update_time_ratio']:.2f}x")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
