"""score.py's batched scoring against scoring one sequence at a time: same reward model, same sequences, one run.

The reward model is the tiny Llama-3-style one from data/tiny-llama3-chat (random weights) unless --reward_model
names another; the sequences are random token ids with lengths spread like chat prompt + response pairs. Prints
sequences per second of both and their ratio, and checks that both give the same rewards.

    python bench/bench_score.py
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import score  # noqa: E402


@dataclass
class Args:
    reward_model: str | None = None
    """a reward model folder or hub id; None: random weights from data/tiny-llama3-chat's config"""
    num_sequences: int = 256
    """sequences to score"""
    min_len: int = 32
    """shortest sequence, in tokens"""
    max_len: int = 224
    """longest sequence, in tokens"""
    batch_size: int = 16
    """score.py's --local_micro_batch_size for the batched run"""
    threads: int = 2
    """torch CPU threads"""
    seed: int = 0
    """seed of the weights and sequences"""


def compare_batching(model, sequences, pad_id, batch_size, device):
    """score.py's score_sequences in batches of batch_size against one sequence at a time: sequences per second of
    both (after a warm-up, timed with the device synchronised), their ratio and the largest reward difference."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates, rewards = {}, {}
    for name, batch in (("one_at_a_time", 1), ("batched", batch_size)):
        score.score_sequences(model, sequences[:batch * 2], pad_id, batch, device)  # warm-up
        sync()
        start = time.perf_counter()
        rewards[name] = score.score_sequences(model, sequences, pad_id, batch, device)
        sync()
        rates[name] = len(sequences) / (time.perf_counter() - start)
    return {"one_at_a_time_per_s": rates["one_at_a_time"], "batched_per_s": rates["batched"],
            "ratio": rates["batched"] / rates["one_at_a_time"],
            "max_diff": max(abs(a - b) for a, b in zip(rewards["one_at_a_time"], rewards["batched"]))}


def main(args: Args):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.reward_model:
        model = AutoModelForSequenceClassification.from_pretrained(args.reward_model)
    else:
        config = AutoConfig.from_pretrained(os.path.join(os.path.dirname(score.__file__), "data", "tiny-llama3-chat"),
                                            num_labels=1, pad_token_id=1)
        model = AutoModelForSequenceClassification.from_config(config)
    model.to(device).eval()
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.num_sequences,)).tolist()
    sequences = [torch.randint(5, vocab, (n,)).tolist() for n in lengths]

    result = compare_batching(model, sequences, pad, args.batch_size, device)
    print(f"reward model: {args.reward_model or 'tiny Llama-3-style, random weights'} on {device}, "
          f"{args.num_sequences} sequences of {args.min_len}-{args.max_len} tokens, {args.threads} threads")
    print(f"  {'one at a time':<32} {result['one_at_a_time_per_s']:8.1f} sequences/s")
    print(f"  {f'batched ({args.batch_size}, sorted by length)':<32} {result['batched_per_s']:8.1f} sequences/s")
    print(f"  batched / one at a time: {result['ratio']:.2f}x; largest reward difference {result['max_diff']:.2e}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
