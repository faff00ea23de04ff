"""bench/gpu_check.py --dry_run: the GPU check's own code on CPU at tiny shapes, so it still works the day a GPU is
at hand. Every stage must finish, every saved model and dataset must load, and REBEL's ratio must be exactly 1 before
its first update."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

SCRIPT_STAGES = {"sft": "causal", "reward": "classifier", "ppo": "causal", "rebel_ddp": "causal",
                 "rebel_fsdp": "causal", "generate": "dataset", "score": "dataset", "ppo_fsdp": "causal",
                 "ppo_fsdp_resume": "causal"}
VLLM_STAGES = ("ppo_vllm", "ppo_vllm_sleep", "vllm_rollout")  # skipped with a note where vLLM or a GPU is missing
MEASUREMENTS = ("rebel_memory", "logprob_memory", "bf16_drift", "ppo_throughput", "score_batching")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry_run", "--output_dir", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_every_stage_finished_and_saved_what_loads(dry_run):
    out, results = dry_run
    stages = results["stages"]
    assert set(SCRIPT_STAGES) | set(MEASUREMENTS) | set(VLLM_STAGES) | {"setup"} <= set(stages)
    done = {n: s for n, s in stages.items() if n not in VLLM_STAGES}
    assert all(s["status"] == "ok" for s in done.values()), {n: s for n, s in done.items() if s["status"] != "ok"}
    for name in VLLM_STAGES:  # ok where vLLM is installed; else skipped, saying why, without failing the check
        assert stages[name]["status"] == "ok" or (stages[name]["status"] == "skipped" and stages[name]["note"]), name
    for name, kind in SCRIPT_STAGES.items():
        assert stages[name]["loads"] is True, name
        if kind == "dataset":
            import datasets

            assert len(datasets.load_from_disk(out / name)) > 0
        else:  # load it here too, independently of the check's own loader
            cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
            assert sum(p.numel() for p in cls.from_pretrained(out / name).parameters()) == stages[name]["saved_params"]
    # the 1B-shaped stand-in has a vocabulary larger than its tokenizer: generation and training still work
    assert results["stages"]["setup"]["tokenizer_size"] < results["sizes"]["vocab_size"]


@pytest.mark.slow
def test_rebel_ratio_is_exactly_one_before_the_first_update(dry_run):
    stages = dry_run[1]["stages"]
    for name in ("rebel_ddp", "rebel_fsdp"):
        assert stages[name]["initial_ratio"] == 1.0 and stages[name]["initial_ratio_var"] == 0.0, name
    for name in ("ppo", "ppo_fsdp"):
        assert stages[name]["initial_ratio"] == 1.0 and stages[name]["initial_ratio_var"] == 0.0, name


@pytest.mark.slow
def test_ppo_fsdp_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(dry_run):
    resumed = dry_run[1]["stages"]["ppo_fsdp_resume"]
    assert resumed["first_update_logged"] == 2 and resumed["max_abs_weight_diff"] == 0.0


@pytest.mark.slow
def test_figures_are_measured_and_consistent(dry_run):
    out, results = dry_run
    stages = results["stages"]
    for name in ("rebel_ddp", "rebel_fsdp"):
        assert stages[name]["tokens_per_s"] > 0 and 0 < stages[name]["mfu"] < 1, name
    # the chunked logprob path computes what the naive full-vocabulary log-softmax computes, gradients included
    assert stages["logprob_memory"]["max_logprob_diff"] < 1e-3
    assert stages["logprob_memory"]["max_rel_grad_diff"] < 1e-2
    drift = stages["bf16_drift"]
    assert 0 < drift["max_abs_drift"] < 1 and drift["bf16_repeatable"] and drift["finite"]
    assert drift["fp32_padding_max_diff"] < 1e-3  # left/right padding in a batch leaves each pair's logprobs alone
    assert stages["ppo_throughput"]["rollout_tokens_per_s"] > 0 and stages["ppo_throughput"]["update_mfu"] > 0
    assert stages["score_batching"]["ratio"] > 0 and stages["score_batching"]["max_diff"] < 1e-3
    # CPU keeps no allocator statistics: memory figures say so instead of inventing a number
    assert stages["logprob_memory"]["ratio"] is None
    assert stages["rebel_memory"]["pair_peak_gib_over_weights_and_grads"] is None
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {row['figure']} |" in table for row in results["summary"])
    assert "| rebel_ddp: MFU |" in table and "| score: batched / one at a time |" in table


def test_a_failing_stage_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    """A stage that breaks is recorded with its error, what needs it is skipped, and the run exits 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    def broken(self):
        raise gpu_check.StageFailed("--model_name_or_path: broken on purpose")

    monkeypatch.setattr(gpu_check.Check, "generate", broken)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(gpu_check.Args(dry_run=True, output_dir=str(tmp_path), stages=("score",)))
    assert stop.value.code == 1
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert list(stages) == ["setup", "generate", "score"]
    assert stages["setup"]["status"] == "ok"
    assert stages["generate"]["status"] == "failed" and "broken on purpose" in stages["generate"]["error"]
    assert stages["score"]["status"] == "skipped"
    assert "## generate: failed" in (tmp_path / "gpu_check.md").read_text()


def test_without_a_gpu_the_full_check_stops_at_once_naming_the_problem(tmp_path, monkeypatch):
    """Outside --dry_run, a machine where torch sees no CUDA GPU (this CPU machine; on a GPU machine, a driver too old
    for torch's CUDA) stops before writing anything, instead of running the full sizes on the CPU until they time
    out."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check"
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU: torch .* cannot use a GPU: .*--dry_run"):
        gpu_check.main(gpu_check.Args(output_dir=str(out)))
    assert not out.exists()


def test_ppo_runs_the_output_layer_at_response_positions_only():
    """The premise of the GPU check's PPO FLOP count (6 * N_head * response tokens, not every position): ppo.py's
    forward pass feeds the output layer the hidden states of the response positions alone."""
    import torch
    from conftest import TINY_LLAMA
    from transformers import AutoConfig, AutoModelForCausalLM

    import ppo

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    policy = ppo.CausalLogprobs(model, 1.0, 3)
    positions = []
    model.get_output_embeddings().register_forward_hook(lambda m, inputs, out: positions.append(
        inputs[0].numel() // inputs[0].shape[-1]))
    queries, query_mask = ppo.left_pad([[5, 6, 7, 8, 9], [5, 6]], pad_id=0)
    responses = torch.randint(10, 100, (2, 4))
    with torch.no_grad():
        ppo.forward_response(policy, queries, query_mask, responses)
    assert sum(positions) == responses.numel()  # 8 positions, not 2 x (5 + 4)
