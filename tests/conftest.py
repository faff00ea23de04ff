"""Shared test helpers: run a script as a user would (a subprocess, optionally under torchrun), read what it wrote.

Everything runs offline on the tiny models in data/ and the synthetic SST-2 corpus in data/sst2."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", HF_HUB_DISABLE_PROGRESS_BARS="1",
                  TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"
SST2 = DATA / "sst2"
TINY_GPT2 = DATA / "tiny-gpt2"
TINY_LLAMA = DATA / "tiny-llama3-chat"


def run(script, *args, nproc=1, check=True, env=None):
    """Run a top-level script with `python` (nproc 1) or `torchrun --nproc_per_node nproc`; return the process."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_weights_equal(a_dir, b_dir, exact=True, atol=1e-4):
    """Bitwise equal, or (exact=False: one rank against several, where sums run in another order) close. Adam turns
    float noise in near-zero gradients (the attention key bias has none in exact math) into steps of up to lr, so
    atol is 1e-4: far below the lr-sized steps (3e-4 and up in these tests) a wrong batch split would change."""
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs between {a_dir} and {b_dir}"
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=f"{name}: {a_dir} vs {b_dir}")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


RM_ARGS = ["--model_name_or_path", TINY_GPT2, "--from_scratch", "--dataset", SST2, "--lr", "3e-3",
           "--warmup_ratio", "0.1", "--batch_size", "32", "--local_micro_batch_size", "16", "--eval_freq", "50"]


@pytest.fixture(scope="session")
def reward_model(session_dir):
    """A reward model trained for one epoch of the offline corpus (about 0.98 pairwise accuracy)."""
    run("reward_sst2.py", *RM_ARGS, "--output_dir", session_dir / "rm")
    return session_dir / "rm"


@pytest.fixture(scope="session")
def sft_policy(session_dir):
    """A tiny SFT policy that writes passable sentences and ends them with EOS (60 updates, val loss about 3.1)."""
    run("sft_sst2.py", "--model_name_or_path", TINY_GPT2, "--from_scratch", "--dataset", SST2, "--lr", "2e-3",
        "--warmup_ratio", "0.1", "--batch_size", "32", "--local_micro_batch_size", "32", "--total_episodes", "1920",
        "--eval_freq", "1000", "--num_samples", "8", "--output_dir", session_dir / "sft_policy")
    return session_dir / "sft_policy"


CHAT_ADJECTIVES = ("superb dull moving tedious witty bland charming lifeless gorgeous clumsy tender stale funny "
                   "boring lovely flat").split()


def chat_prompt(i):
    return f"write a short review of a {CHAT_ADJECTIVES[i % len(CHAT_ADJECTIVES)]} film"


@pytest.fixture(scope="session")
def chat_prompts(session_dir):
    """An UltraFeedback-shaped prompt file: prompt_id and prompt columns."""
    path = session_dir / "chat_prompts.jsonl"
    rows = [{"prompt_id": f"id{i:03d}", "prompt": chat_prompt(i)} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def chat_policy(session_dir):
    """A tiny Llama-3-style chat policy, trained here for a few seconds to answer through the chat template with an
    SST-2 sentence and to end its turn with <|eot_id|> (a random model would never stop)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = session_dir / "chat_policy"
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    with open(SST2 / "train.jsonl") as f:
        sentences = [json.loads(line)["sentence"] for line, _ in zip(f, range(512))]
    sequences = [tokenizer.apply_chat_template([{"role": "user", "content": chat_prompt(i)},
                                                {"role": "assistant", "content": s}], tokenize=True)["input_ids"]
                 for i, s in enumerate(sentences)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        batch = [sequences[i] for i in torch.randint(len(sequences), (16,), generator=generator).tolist()]
        width = max(map(len, batch))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (loss * mask[:, 1:]).sum() / mask[:, 1:].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig.from_pretrained(TINY_LLAMA).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_reward_model(session_dir):
    """A tiny Llama-3-style reward model with random weights and a pad token of its own, as ArmoRM has."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = session_dir / "chat_rm"
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.pad_token = "<|end_of_text|>"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(TINY_LLAMA, num_labels=1))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
