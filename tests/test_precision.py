"""Precision and placement on CPU, for every training script: a bf16 checkpoint trains with fp32 master weights and
fp32 AdamW state; --bf16 runs on CPU under RLHF_BF16_ON_CPU=1 (the GPU runs' bf16 paths: autocast, FSDP2 mixed
precision, the logprob probes' bf16 tolerance); --fsdp shards every model before anything moves it to the device;
the logprob probes attend with sdpa, never with a flash kernel in fp32. Runs go through tests/placement_recorder.py,
which records optimizer dtypes, fully_shard calls and module moves as they happen."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import ROOT, SST2, TINY_GPT2, TINY_LLAMA, TLDR, metrics, online_args, pair_rows, weights

import ppo
import rebel

TRAINING = ["sft_sst2.py", "reward_sst2.py", "sft.py", "reward.py", "ppo.py", "rloo.py", "grpo.py", "rebel_online.py",
            "rebel.py", "dpo.py"]
SUPERVISED = ("sft_sst2.py", "reward_sst2.py", "sft.py", "reward.py")
FSDP_SCRIPTS = ["ppo.py", "rloo.py", "grpo.py", "rebel_online.py", "rebel.py", "dpo.py"]


def save_bf16(path, config_dir, model_class, tokenizer_dir, **config):
    """Random weights of `config_dir`'s config saved in bf16, as Llama-3-8B-Instruct's checkpoint is."""
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(0)
    model = model_class.from_config(AutoConfig.from_pretrained(config_dir, **config), dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    assert {t.dtype for t in weights(path).values()} == {torch.bfloat16}
    return path


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """A GPT-2-shaped policy and reward model (SST-2 scripts, online scripts) and a Llama-3-shaped policy with 8
    filter.py-layout pairs (rebel.py, dpo.py), every checkpoint stored in bf16."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bf16")
    pairs = root / "pairs"
    datasets.DatasetDict({"train": pair_rows(lengths=[(3, 2, 5), (7, 6, 1), (1, 4, 3), (5, 5, 2)] * 2, seed=2),
                          "test": pair_rows(seed=3)}).save_to_disk(str(pairs))
    return {"policy": save_bf16(root / "policy", TINY_GPT2, AutoModelForCausalLM, TINY_GPT2),
            "rm": save_bf16(root / "rm", TINY_GPT2, AutoModelForSequenceClassification, TINY_GPT2, num_labels=1),
            "chat": save_bf16(root / "chat", TINY_LLAMA, AutoModelForCausalLM, TINY_LLAMA), "pairs": pairs}


def short_args(script, m):
    """Two updates of `script` on the bf16 checkpoints (one for the online scripts' 16-prompt batch)."""
    sst2 = ["--dataset", SST2, "--eval_split", "None", "--batch_size", "8", "--local_micro_batch_size", "4",
            "--total_episodes", "16", "--save_freq", "0"]
    tldr = ["--task.eval_split", "None", "--batch_size", "8", "--local_micro_batch_size", "4", "--total_episodes", "16",
            "--save_freq", "0"]
    pairs = ["--model_name_or_path", m["chat"], "--task.dataset", m["pairs"], "--task.maxlen_prompt", "7",
             "--task.maxlen", "6", "--batch_size", "4", "--local_micro_batch_size", "2", "--total_episodes", "8",
             "--eval_freq", "1000", "--save_freq", "0"]
    return {"sft_sst2.py": ["--model_name_or_path", m["policy"], *sst2],
            "reward_sst2.py": ["--model_name_or_path", m["policy"], *sst2],
            "rebel.py": pairs, "dpo.py": pairs,
            "sft.py": ["--model_name_or_path", m["policy"], "--task.dataset", TLDR / "sft",
                       "--task.maxlen_prompt", "96", "--task.maxlen", "32", *tldr],
            "reward.py": ["--model_name_or_path", m["policy"], "--task.dataset", TLDR / "preference", "--task.maxlen",
                          "128", *tldr],
            }.get(script) or online_args(m["policy"], m["rm"], "--total_episodes", "32", "--eval_freq", "1000",
                                         "--save_freq", "0", "--eval_size", "4")


def recorded_run(script, args, out, nproc=1, bf16_on_cpu=True):
    """`script args --output_dir out` under tests/placement_recorder.py (torchrun with a process group when nproc is
    given as a number > 0 and fsdp is wanted); returns the recorded events."""
    record = out.parent / f"{out.name}.jsonl"
    launcher = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / "tests" / "placement_recorder.py"), str(record), str(ROOT / script),
           *map(str, args), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"RLHF_BF16_ON_CPU": "1"} if bf16_on_cpu else {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (out / "model.safetensors").exists()
    return [json.loads(line) for line in record.read_text().splitlines()], proc.stdout


@pytest.mark.parametrize("script", TRAINING)
def test_bf16_checkpoint_trains_fp32_master_weights_with_bf16_autocast_on_cpu(script, bf16_models, tmp_path):
    """A checkpoint stored in bf16 (transformers 5 would load it bf16) trains fp32 parameters with fp32 AdamW state
    and is saved fp32, while --bf16 (forced on CPU) runs the forward passes under bf16 autocast; before the first
    optimizer step the policy's logprobs equal the reference's exactly (objective/kl 0), so no bf16 drift arises
    between rollout, reference and training passes (measured on CPU; GPU kernels may differ)."""
    events, _ = recorded_run(script, short_args(script, bf16_models), tmp_path / "run", nproc=0)
    assert {"autocast": "cpu", "dtype": "torch.bfloat16"} in events, f"{script}: --bf16 did not apply on CPU"
    steps = [e for e in events if "step" in e]
    assert steps, f"{script}: no optimizer step recorded"
    for e in steps:
        assert e["params"] == ["torch.float32"] and e["state"] == ["torch.float32"], (script, e)
    assert {t.dtype for t in weights(tmp_path / "run").values()} == {torch.float32}
    if script not in SUPERVISED:  # policy = reference before the first step, in bf16 too:
        first = next(m for m in metrics(tmp_path / "run") if "objective/kl" in m)  # both paths autocast alike
        assert first["update"] == 1 and first["objective/kl"] == 0.0, first


@pytest.mark.slow
@pytest.mark.parametrize("script", FSDP_SCRIPTS)
def test_fsdp_shards_every_model_before_any_move_to_the_device(script, bf16_models, tmp_path):
    """--fsdp (one rank, bf16 mixed precision forced on CPU): fully_shard runs, and no module is ever moved to the
    device while it holds a parameter that is not sharded (the whole model on one GPU is what --fsdp must avoid);
    the logprob probe then runs on the sharded models in bf16 and accepts them; the optimizer holds the fp32 shards
    (a probe through the root left rebel.py's and dpo.py's root gathered in bf16 until it was resharded)."""
    events, stdout = recorded_run(script, [*short_args(script, bf16_models), "--fsdp"], tmp_path / "run", nproc=1)
    assert any("shard" in e for e in events), f"{script}: fully_shard never called"
    unsharded_moves = [e for e in events if "move" in e and e["plain"]]
    assert not unsharded_moves, f"{script}: moved before sharding: {unsharded_moves[:3]}"
    steps = [e for e in events if "step" in e]  # the optimizer holds the fp32 shards, not gathered bf16 copies
    assert steps and all(e["params"] == e["state"] == ["torch.float32"] and e["unsharded"] == 0 for e in steps), steps


class FakeFlash:
    """A stand-in for flash-attn registered as "flash_attention_2": refuses fp32 as flash-attn does, else sdpa."""

    def __init__(self):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.sdpa, self.calls = sdpa_attention_forward, []

    def __call__(self, module, query, key, value, *args, **kwargs):
        self.calls.append(query.dtype)
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")
        return self.sdpa(module, query, key, value, *args, **kwargs)


@pytest.fixture
def fake_flash(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    flash = FakeFlash()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", flash)
    return flash


def tiny_llama(attn, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA), dtype=dtype)
    model.config._attn_implementation_internal = attn  # as from_pretrained(attn_implementation=...) with flash-attn
    return model.eval()


def probe_batch():
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(5, 1000, (2, 6), generator=g)
    mask = torch.ones_like(queries)
    mask[0, :2] = 0
    return queries, mask, torch.randint(5, 1000, (2, 5), generator=g)


@pytest.mark.parametrize("which", ["ppo", "rebel"])
def test_logprob_probe_attends_with_sdpa_not_a_flash_kernel_in_fp32(which, fake_flash):
    """With --attn_implementation flash_attention_2 the fp32 probe (ppo.py's check_response_logprobs, copied into the
    online scripts; rebel.py's check_logprob_path, copied into dpo.py) must not hand fp32 tensors to the flash kernel:
    it attends with sdpa, and the model attends with the flash kernel again afterwards (the fake kernel refuses fp32,
    as flash-attn does, so the probe of the code before this fix fails here)."""
    model = tiny_llama("flash_attention_2")
    queries, mask, responses = probe_batch()
    if which == "ppo":
        ppo.check_response_logprobs(ppo.CausalLogprobs(model, 0.7, 4), queries, mask, responses, "probe")
    else:
        ids = torch.cat([queries, responses], 1)
        batch = {"input_ids": ids, "attention_mask": torch.cat([mask, torch.ones_like(responses)], 1),
                 "response_mask": torch.ones_like(responses, dtype=torch.bool), "prompt_len": queries.shape[1]}
        rebel.check_logprob_path(rebel.SequenceLogprobs(model, 0.7, 4), batch, "probe")
    assert fake_flash.calls == []  # the probe never reached the flash kernel
    assert model.config._attn_implementation == "flash_attention_2"
    with pytest.raises(RuntimeError, match="FlashAttention only supports"):  # afterwards the model uses it again
        model(input_ids=queries, attention_mask=mask)
    assert fake_flash.calls == [torch.float32]


def granite_like(model, scale):
    """`model` whose output layer is followed by a logit scale (as Granite's `logits_scaling`), in its own dtype."""
    head = model.lm_head
    model.lm_head = torch.nn.Sequential(head)
    model.lm_head.append(ScaleBy(scale))
    model.get_output_embeddings = lambda: head  # the fast path reads the bare output layer, as for Granite
    return model


class ScaleBy(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x / self.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_tolerance_follows_the_dtype_and_still_refuses_a_logit_transform(dtype, capsys):
    """In bf16 the fast path and the model's own forward round their logits differently: the probe accepts the
    model (measured gap printed with -s) within probe_tolerance's bf16 bound, which is well above the gap and well
    below what a logit scale of 1/2 causes, and a refusal names the dtype both paths ran in."""
    queries, mask, responses = probe_batch()
    model = tiny_llama("sdpa", dtype)
    wrapped = ppo.CausalLogprobs(model, 0.7, 4)
    ppo.check_response_logprobs(wrapped, queries, mask, responses, "plain")
    fast = ppo.forward_response(wrapped, queries, mask, responses)[0]
    logits = model(input_ids=torch.cat([queries, responses], 1),
                   attention_mask=torch.cat([mask, torch.ones_like(responses)], 1)).logits
    assert logits.dtype == dtype
    tolerance = ppo.probe_tolerance(logits, 0.7)
    assert tolerance == (1e-3 if dtype == torch.float32 else pytest.approx(
        1e-3 + 2 * 2 ** -7 * logits.float().abs().max().item() / 0.7))
    with pytest.raises(SystemExit, match=f"more than {str(dtype)[6:]} rounding explains") as refused:
        ppo.check_response_logprobs(ppo.CausalLogprobs(granite_like(model, 2.0), 0.7, 4), queries, mask, responses,
                                    "scaled")
    print(f"{dtype}: fast-path logprobs {fast.abs().max().item():.3g} nats at most; tolerance {tolerance:.3g}; "
          f"refusal: {refused.value}")


def test_bf16_applies_on_cpu_only_when_forced(monkeypatch):
    """--bf16 keeps its meaning on CPU (ignored: fp32) unless RLHF_BF16_ON_CPU=1; bf16_compute is an identical copy
    in every training script (tests/test_shared_helpers.py), so ppo.py's stands for all."""
    from types import SimpleNamespace

    cpu, on, off = torch.device("cpu"), SimpleNamespace(bf16=True), SimpleNamespace(bf16=False)
    monkeypatch.delenv("RLHF_BF16_ON_CPU", raising=False)
    assert not ppo.bf16_compute(on, cpu) and ppo.bf16_compute(on, torch.device("cuda", 0))
    monkeypatch.setenv("RLHF_BF16_ON_CPU", "1")
    assert ppo.bf16_compute(on, cpu) and not ppo.bf16_compute(off, cpu)
