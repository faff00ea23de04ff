"""generate.py's transformers backend against the way it sampled before, in one process on the same model and prompts:

plain:   `model.generate` on left-padded batches with `num_return_sequences`, as generate.py did: every one of the n
         rows of a prompt encodes the whole prompt.
shared:  generate.py's `generate_hf`: the tokens every prompt shares (system prompt, worked example) encoded once per
         shard, the rest of each prompt once per prompt, their keys and values copied to the rows.

Both run the same batches with the same seeds; the bench reports responses per second of each, their ratio, and how
many responses came out identical (sampling from logits that differ by float rounding only). The default workload is
the real-model example's (data/arith's chat prompts, about 100 tokens of which 70 are shared, 8 samples of up
to 24 tokens at temperature 0.7, 8 prompts per call) on SmolLM2-135M-Instruct (`python data/make_smollm2.py`), or on
any model given with --model.

    python bench/bench_generate.py           # writes bench/results/generate.json
"""

import json
import os
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
    """model to sample from (made by data/make_smollm2.py)"""
    prompts: int = 32
    """data/arith training problems sampled for"""
    num_responses: int = 8
    """samples per prompt"""
    maxlen: int = 24
    """most new tokens per response"""
    temperature: float = 0.7
    """sampling temperature"""
    local_micro_batch_size: int = 8
    """prompts per generate call (8 x 8 = 64 rows)"""
    threads: int = 2
    """torch threads"""
    output: str = os.path.join(ROOT, "bench", "results", "generate.json")
    """where the figures go (JSON)"""


def plain_generate(model, prompt_ids, stop_ids, pad_id, args, shard=0):
    """The baseline: left-padded batches through `generate` with num_return_sequences, seeded as generate_hf seeds."""
    from transformers import GenerationConfig

    import generate

    config = GenerationConfig(do_sample=args.temperature > 0, temperature=args.temperature or None, top_p=args.top_p,
                              top_k=0, max_new_tokens=args.maxlen, num_return_sequences=args.num_responses,
                              eos_token_id=stop_ids, pad_token_id=pad_id)
    responses = []
    for batch_index, start in enumerate(range(0, len(prompt_ids), args.local_micro_batch_size)):
        batch = prompt_ids[start:start + args.local_micro_batch_size]
        width = max(map(len, batch))
        torch.manual_seed(args.seed * 1_000_003 ** 2 + shard * 1_000_003 + batch_index)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([[pad_id] * (width - len(x)) + x for x in batch]),
                                 attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch]),
                                 generation_config=config)
        rows = [generate.cut_at_stop(row, stop_ids) for row in out[:, width:].tolist()]
        responses += [rows[i * args.num_responses:(i + 1) * args.num_responses] for i in range(len(batch))]
    return responses


def main(args: Args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import generate

    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.model, "config.json")) and os.path.isabs(args.model):
        raise SystemExit(f"--model {args.model}: not found; make it with python data/make_smollm2.py")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with open(os.path.join(ROOT, "data", "arith", "train.jsonl")) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.prompts))]
    gen_args = generate.Args(model_name_or_path=args.model, num_responses=args.num_responses, maxlen=args.maxlen,
                             temperature=args.temperature, top_p=1.0,
                             local_micro_batch_size=args.local_micro_batch_size)
    prompt_ids = generate.encode_prompts([r["messages"] for r in rows], tokenizer, gen_args)
    prompt_ids.sort(key=len, reverse=True)  # as generate.py orders a shard
    stop_ids = generate.stop_token_ids(tokenizer, args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    shared = generate.shared_prefix_length(prompt_ids)
    results = {"args": asdict(args), "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
               "shared_prefix_tokens": shared}
    outputs = {}
    for name, fn in (("plain", lambda: plain_generate(model, prompt_ids, stop_ids, pad_id, gen_args)),
                     ("shared", lambda: generate.generate_hf(model, tokenizer, prompt_ids, 0, stop_ids, gen_args,
                                                             torch.device("cpu")))):
        start = time.time()
        outputs[name] = fn()
        seconds = time.time() - start
        count = sum(len(r) for r in outputs[name])
        results[name] = {"seconds": round(seconds, 2), "responses_per_s": round(count / seconds, 2),
                         "response_tokens": sum(len(x) for r in outputs[name] for x in r)}
        print(f"{name}: {count} responses in {seconds:.1f} s ({count / seconds:.2f} per s)", flush=True)
    pairs = [(a, b) for ra, rb in zip(outputs["plain"], outputs["shared"]) for a, b in zip(ra, rb)]
    results["speedup"] = round(results["plain"]["seconds"] / results["shared"]["seconds"], 2)
    results["identical_responses"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    print(f"shared prefix {shared} of {results['prompt_tokens_mean']:.0f} prompt tokens on average; "
          f"speedup {results['speedup']}x; identical responses {results['identical_responses']}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
