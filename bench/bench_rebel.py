"""rebel.py's logprob path against a baseline written like the REBEL reference code, in one run on the same model
and data: update throughput, reference-logprob throughput, peak memory, and throughput as a fraction of this
machine's measured matmul FLOP/s.

ours:      micro-batches trimmed to their longest real prompt and response, hidden states kept only at real response
           positions, fp32 log-softmax over chunks (recomputed in backward), reference logprobs in batches.
baseline:  every sequence padded to maxlen_prompt + maxlen, logits for every position, full-vocabulary fp32
           log-softmax, reference logprobs one sample at a time.

Each variant runs in its own process, so its peak resident memory is its own: it is read after the first update's
forward and backward passes (reference logprobs included, optimizer state not yet allocated), minus the memory after
setup. The
model is the tiny Llama-3-style config of data/tiny-llama3-chat, widened and given a 32k vocabulary so the logits
weigh as they do in real models; data are random pairs in filter.py's layout with chat-like length spreads.

    python bench/bench_rebel.py
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
    pairs: int = 64
    """pairs in the data set"""
    maxlen_prompt: int = 128
    """prompt width (left-padded)"""
    maxlen: int = 256
    """response width (right-padded)"""
    vocab_size: int = 65536
    """vocabulary size of the benchmark model"""
    hidden_size: int = 256
    """width of the benchmark model"""
    layers: int = 4
    """decoder layers of the benchmark model"""
    batch_size: int = 8
    """pairs per update"""
    local_micro_batch_size: int = 4
    """pairs per forward/backward pass"""
    updates: int = 3
    """timed updates per variant (after one warm-up update)"""
    threads: int = 2
    """torch CPU threads"""
    output: str = os.path.join(ROOT, "bench", "results", "bench_rebel.json")
    """where the numbers are written"""


def setup(args):
    """The model (fixed seed) and random pairs in filter.py's layout, as rebel.py reads them."""
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "data", "tiny-llama3-chat"), vocab_size=args.vocab_size,
                                        hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                                        num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(args.pairs):
        row = {}
        for name, width, low, left in (("prompt", args.maxlen_prompt, 16, True), ("chosen", args.maxlen, 8, False),
                                       ("reject", args.maxlen, 8, False)):
            n = int(torch.randint(low, width + 1, (1,), generator=g) if torch.rand(1, generator=g) < 0.1
                    else torch.randint(low, width // 2, (1,), generator=g))  # mostly short, a few near the limit
            ids = torch.randint(10, args.vocab_size, (n,), generator=g).tolist()
            pad = [1] * (width - n)
            row[f"{name}_input_ids"] = pad + ids if left else ids + pad
            row[f"{name}_attention_mask"] = [0] * len(pad) + [1] * n if left else [1] * n + [0] * len(pad)
        row["chosen_reward"], row["reject_reward"] = torch.rand(2, generator=g).tolist()
        rows.append(row)
    return model, datasets.Dataset.from_list(rows).with_format("torch")


def baseline_logprobs(model, data, indices, temperature):
    """The reference code's way: full width, logits everywhere, full-vocabulary fp32 log-softmax."""
    rows = data[indices]
    out = []
    for name in ("chosen", "reject"):
        ids = torch.cat([rows["prompt_input_ids"], rows[f"{name}_input_ids"]], 1)
        mask = torch.cat([rows["prompt_attention_mask"], rows[f"{name}_attention_mask"]], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        logprobs = torch.log_softmax(logits[:, rows["prompt_input_ids"].shape[1] - 1:-1].float() / temperature, -1)
        token = logprobs.gather(2, rows[f"{name}_input_ids"][..., None]).squeeze(2)
        out.append((token * rows[f"{name}_attention_mask"]).sum(1))
    return torch.cat(out)


def run_variant(name, args, queue):
    import rebel

    model, data = setup(args)
    ours = name == "ours"
    wrapped = rebel.SequenceLogprobs(model, 0.8, chunk_size=1024)
    logprobs_of = (lambda idx: wrapped(**rebel.trimmed_batch(data, idx, "cpu"))) if ours else (
        lambda idx: baseline_logprobs(model, data, idx, 0.8))
    def tokens(idx):  # real tokens the pairs put through the model (the prompt counts twice)
        rows = data[idx]
        return int(rows["chosen_attention_mask"].sum() + rows["reject_attention_mask"].sum()
                   + 2 * rows["prompt_attention_mask"].sum())

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # reference logprobs: ours in micro-batches, the baseline one pair at a time
    start = time.perf_counter()
    step = args.local_micro_batch_size if ours else 1
    with torch.no_grad():
        ref = torch.cat([logprobs_of(list(range(i, min(i + step, args.pairs)))).view(2, -1).T
                         for i in range(0, args.pairs, step)])
    ref_seconds = time.perf_counter() - start

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    rewards = torch.stack([data["chosen_reward"][:], data["reject_reward"][:]], 1).double()
    timings, real_tokens = [], 0
    for update in range(args.updates + 1):  # update 0 warms up
        batch = [(update * args.batch_size + i) % args.pairs for i in range(args.batch_size)]
        start = time.perf_counter()
        for micro in range(0, args.batch_size, args.local_micro_batch_size):
            idx = batch[micro:micro + args.local_micro_batch_size]
            logprobs = logprobs_of(idx).view(2, -1).T.double()
            losses, _, _, _ = rebel.rebel_losses(logprobs, ref[idx], rewards[idx], eta=1.0)
            (losses.sum() / args.batch_size).backward()
            real_tokens += tokens(idx) if update else 0
        if update == 0:  # before the optimizer state exists: what the logprob path itself costs
            forward_backward_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    update_seconds = sum(timings[1:])
    params = sum(p.numel() for p in model.parameters())
    queue.put({"name": name, "ref_pairs_per_s": args.pairs / ref_seconds,
               "pairs_per_s": args.updates * args.batch_size / update_seconds,
               "useful_flop_per_s": 6 * params * real_tokens / update_seconds,  # 6 N per real token, fwd + bwd
               "peak_mib_over_setup": (forward_backward_rss - start_rss) / 1024,
               "params": params, "logprobs_first_pair": ref[0].tolist()})


def matmul_flops(threads, n=1024, repeats=20):
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def main(args: Args):
    context = mp.get_context("spawn")
    results = {}
    for name in ("baseline", "ours"):
        queue = context.Queue()
        process = context.Process(target=run_variant, args=(name, args, queue))
        process.start()
        results[name] = queue.get()
        process.join()
    peak = matmul_flops(args.threads)
    ours, base = results["ours"], results["baseline"]
    assert torch.allclose(torch.tensor(ours["logprobs_first_pair"]), torch.tensor(base["logprobs_first_pair"]),
                          atol=1e-3), "the two paths disagree on the logprobs"
    report = {"args": asdict(args), "matmul_flop_per_s": peak, **results,
              "update_throughput_ratio": ours["pairs_per_s"] / base["pairs_per_s"],
              "reference_throughput_ratio": ours["ref_pairs_per_s"] / base["ref_pairs_per_s"],
              "peak_memory_ratio": ours["peak_mib_over_setup"] / base["peak_mib_over_setup"]}
    print(f"model: {ours['params'] / 1e6:.1f} M parameters, vocab {args.vocab_size}; {args.pairs} pairs, widths "
          f"{args.maxlen_prompt} + {args.maxlen}; {args.threads} threads; matmul {peak / 1e9:.0f} GFLOP/s")
    print(f"{'':<10}{'update pairs/s':>16}{'ref pairs/s':>14}{'fwd+bwd peak MiB':>18}{'% of matmul FLOP/s':>20}")
    for name, r in results.items():
        print(f"{name:<10}{r['pairs_per_s']:>16.2f}{r['ref_pairs_per_s']:>14.2f}{r['peak_mib_over_setup']:>18.0f}"
              f"{100 * r['useful_flop_per_s'] / peak:>19.1f}%")
    print(f"ours / baseline: update throughput {report['update_throughput_ratio']:.2f}x, reference logprobs "
          f"{report['reference_throughput_ratio']:.2f}x, peak memory {report['peak_memory_ratio']:.2f}x")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
