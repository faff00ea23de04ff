"""Build the tiny models the offline quickstart and the tests run on: a config and a tokenizer, no weights.

* `data/tiny-gpt2`: a GPT-2-shaped config (4 layers, width 128, dropout as GPT-2's) and a byte-level BPE tokenizer
  trained on the offline SST-2 corpus. Like GPT-2's, it has one special token, `<|endoftext|>`, and no pad token,
  so the scripts are exercised on the pad == eos case that bites real GPT-2 runs.
* `data/tiny-llama3-chat`: a Llama-3-shaped config (2 layers, width 128, grouped-query attention with head_dim 64,
  which vLLM's CPU backend accepts) and a tokenizer with Llama-3's special tokens and chat template: encoding adds
  `<|begin_of_text|>` and the template writes it too, so double BOS is a real hazard here as with Llama-3;
  `<|eot_id|>` ends a turn and is the eos token.
* `data/llama3-1b`: a config shaped like Llama-3.2-1B (16 layers, width 2048, 32 query and 8 key-value heads,
  MLP 8192, tied embeddings, the 128,256-token vocabulary: 1.236 B parameters) with tiny-llama3-chat's tokenizer,
  whose ids all lie inside that vocabulary. bench/gpu_check.py trains it from random weights on one GPU.

Scripts start from these folders with `--from_scratch` (random weights from the config) or the tests save random
weights into a copy. Deterministic: running it again rewrites identical files.

    python data/make_tiny_models.py
"""

import json
import os
from dataclasses import dataclass

import tyro
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))

LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's template, verbatim
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_WORDS = ("user assistant system write review describe summarize explain film movie about a short one sentence "
              "the of please give me your opinion on what is story scene happy sad good bad \n\n").split(" ")


@dataclass
class Args:
    corpus: str = os.path.join(HERE, "sst2", "train.jsonl")
    """text the tokenizers are trained on (made by data/make_sst2.py)"""
    output_dir: str = HERE
    """folder that receives tiny-gpt2/, tiny-llama3-chat/ and llama3-1b/"""
    vocab_size: int = 1024
    """BPE vocabulary size of both tokenizers, special tokens included"""


def train_bpe(texts, vocab_size, special_tokens):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main(args: Args):
    with open(args.corpus) as f:
        texts = [json.loads(line)["sentence"] for line in f]

    # GPT-2 style: <|endoftext|> is bos, eos and unk; no pad token, no BOS added on encode.
    folder = os.path.join(args.output_dir, "tiny-gpt2")
    backend = train_bpe(texts, args.vocab_size, ["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", model_max_length=128)
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4, n_head=4,
               bos_token_id=eos, eos_token_id=eos).save_pretrained(folder)

    # Llama-3 style: BOS added on encode, <|eot_id|> ends a turn, no pad token.
    folder = os.path.join(args.output_dir, "tiny-llama3-chat")
    backend = train_bpe(texts + CHAT_WORDS * 50, args.vocab_size, LLAMA3_SPECIAL)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        model_max_length=256, chat_template=LLAMA3_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    end_of_text, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rope_theta=500000.0,
                bos_token_id=bos_id, eos_token_id=[end_of_text, eot], tie_word_embeddings=False).save_pretrained(folder)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=[end_of_text, eot], do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(folder)

    # Llama-3.2-1B-shaped, for the GPU check: the real vocabulary size, the tiny tokenizer (ids 0..1023 of it)
    big = os.path.join(args.output_dir, "llama3-1b")
    tokenizer.save_pretrained(big)
    LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                bos_token_id=bos_id, eos_token_id=[end_of_text, eot], tie_word_embeddings=True).save_pretrained(big)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=[end_of_text, eot], do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(big)
    print(f"wrote {os.path.join(args.output_dir, 'tiny-gpt2')}, {folder} and {big}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
