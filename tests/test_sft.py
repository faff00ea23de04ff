"""sft_sst2.py: EOS is learned with pad == EOS, validation loss falls, 2 ranks == 1 rank, bad columns fail early;
and, on SFT as the cheapest training script, the run-survival guards every training script shares (settings checked
on resume, torn logs, corrupt checkpoints, one run per folder, a full disk)."""

import collections
import shutil

import pytest
import torch
from conftest import (
    SST2,
    TINY_GPT2,
    assert_same_metrics,
    assert_weights_equal,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_resume_refuses_other_settings,
    copy_unfinished,
    held_lock,
    metrics,
    run_in_process,
    run_into,
)

import sft_sst2

SFT_ARGS = ["--model_name_or_path", TINY_GPT2, "--from_scratch", "--dataset", SST2, "--disable_dropout",
            "--lr", "1e-3", "--batch_size", "16", "--local_micro_batch_size", "4", "--total_episodes", "320",
            "--eval_freq", "10", "--num_samples", "8", "--save_freq", "4", "--keep_checkpoints", "100"]


@pytest.fixture(scope="session")
def sft_1p(session_dir):
    return run_into("sft_sst2.py", SFT_ARGS, session_dir / "sft_1p")


@pytest.fixture(scope="session")
def sft_2p(session_dir):
    return run_into("sft_sst2.py", SFT_ARGS, session_dir / "sft_2p", nproc=2)


def test_eos_is_in_the_loss_when_pad_is_eos():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_GPT2)
    eos = tokenizer.eos_token_id
    examples, dropped = sft_sst2.tokenize(["a fine film .", "dull", "  ", "x " * 100], tokenizer, maxlen=64)
    assert dropped == {"empty": 1, "too_long": 1}
    assert all(x[-1] == eos for x in examples)
    input_ids, attention_mask = sft_sst2.collate(examples, pad_id=eos)  # pad == eos, as GPT-2 runs do
    targets, mask = input_ids[:, 1:], attention_mask[:, 1:]
    for row, x in enumerate(examples):
        assert mask[row].sum() == len(x) - 1  # every real token after the first is predicted ...
        assert mask[row, len(x) - 2] == 1 and targets[row, len(x) - 2] == eos  # ... EOS included
        assert mask[row, len(x) - 1:].sum() == 0  # and no padding


def test_token_nll_matches_a_slow_reference():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_GPT2)).eval()
    examples = [[5, 6, 7, 0], [8, 9, 0]]
    input_ids, attention_mask = sft_sst2.collate(examples, pad_id=0)
    nll, mask = sft_sst2.token_nll(model, input_ids, attention_mask)
    for row, x in enumerate(examples):
        logits = model(torch.tensor([x])).logits[0].double()
        expected = [-(logits[t].log_softmax(-1)[x[t + 1]]).item() for t in range(len(x) - 1)]
        assert nll[row, :len(x) - 1].tolist() == pytest.approx(expected, abs=1e-5)


def test_sft_learns_and_saves_a_loadable_model(sft_1p):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evals = [m for m in metrics(sft_1p) if "val/loss" in m]
    assert [m["update"] for m in evals] == [0, 10, 20]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 1.0, evals  # random init starts near log(1024) = 6.9
    assert evals[-1]["val/perplexity"] < evals[0]["val/perplexity"]
    assert (sft_1p / "args.json").exists() and (sft_1p / "model.safetensors").exists()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(sft_1p), AutoTokenizer.from_pretrained(sft_1p)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_two_ranks_match_one_rank(sft_1p, sft_2p):
    assert_weights_equal(sft_1p, sft_2p, exact=False)
    one, two = metrics(sft_1p), metrics(sft_2p)
    assert [m["loss/sft_avg"] for m in one[1:]] == pytest.approx([m["loss/sft_avg"] for m in two[1:]], rel=1e-4)
    eos_rate = [[m["val/eos_rate"] for m in run if "val/eos_rate" in m] for run in (one, two)]
    assert eos_rate[0] == eos_rate[1]  # samples are seeded per prompt, not per rank


def test_missing_column_fails_before_training(tmp_path):
    out = tmp_path / "out"
    args = sft_sst2.Args(model_name_or_path=str(TINY_GPT2), from_scratch=True, dataset=str(SST2), text_column="text",
                         output_dir=str(out))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        sft_sst2.main(args)
    assert not out.exists()


def test_resume_from_a_checkpoint_is_exact(sft_1p, tmp_path):
    check_resume_from_checkpoint(sft_sst2, SFT_ARGS, sft_1p, tmp_path / "resumed", update=8)


@pytest.mark.slow
def test_preempted_two_rank_run_resumes_exactly(sft_2p, tmp_path):
    check_preempt_and_resume("sft_sst2.py", SFT_ARGS, sft_2p, tmp_path / "preempted", nproc=2)


def test_nonfinite_updates_are_skipped_then_stop_the_run(sft_1p, tmp_path, capsys):
    check_nonfinite_guard(sft_sst2, SFT_ARGS, sft_1p, tmp_path, good=4, capsys=capsys)


def test_resume_with_other_settings_is_refused(sft_1p, tmp_path, no_model_loading):
    other = tmp_path / "other_data"
    other.mkdir()
    lines = (SST2 / "train.jsonl").read_text().splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(lines[:1000]))
    shutil.copy(SST2 / "validation.jsonl", other / "validation.jsonl")
    check_resume_refuses_other_settings(sft_sst2, SFT_ARGS, sft_1p, tmp_path, [
        ("--lr", "0.001", "0.05"), ("--batch_size", "16", "32"), ("--dataset", SST2, other)])


def test_resume_skips_a_corrupt_checkpoint_and_a_torn_log_line(sft_1p, tmp_path, capsys):
    """The newest checkpoint fails verification (one flipped byte) and metrics.jsonl ends in half a line (a kill):
    --resume auto says so, takes the newest intact checkpoint, drops the torn line, accepts a setting that cannot
    change results (save_freq) and ends bitwise equal to the uninterrupted run; an explicit --resume of the corrupt
    checkpoint names the bad file."""
    run_dir = copy_unfinished(sft_1p, tmp_path / "run")
    args_json = (run_dir / "args.json").read_bytes()
    corrupt = run_dir / "checkpoints" / "update_0000016"
    shard = sorted((corrupt / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"update": 21, "loss/sft_av')
    with pytest.raises(ValueError, match=rf"update_0000016/dcp/{shard.name} has another checksum"):
        run_in_process(sft_sst2, [*SFT_ARGS, "--resume", corrupt], tmp_path / "explicit")
    capsys.readouterr()
    run_in_process(sft_sst2, [*SFT_ARGS, "--save_freq", "1000", "--resume", "auto"], run_dir)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "update_0000016" in err and "corrupt" in err
    assert "dropping the incomplete last line" in err
    assert_weights_equal(sft_1p, run_dir)
    assert_same_metrics(sft_1p, run_dir)
    assert len(metrics(run_dir)) == len(metrics(sft_1p))
    assert (run_dir / "args.json").read_bytes() == args_json


def test_log_rewrite_is_atomic_and_names_a_malformed_line(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"update": 1}\n{"update": 2}\n{"update": 3}\n{"upd')
    sft_sst2.rewrite_log(str(log), 2)
    assert log.read_text() == '{"update": 1}\n{"update": 2}\n'
    log.write_text('{"update": 1}\nnot json\n{"update": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON"):
        sft_sst2.rewrite_log(str(log), 3)

    def killed(*args):
        raise KeyboardInterrupt  # a kill between writing the new file and renaming it

    log.write_text('{"update": 1}\n{"update": 2}\n')
    monkeypatch.setattr(sft_sst2.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        sft_sst2.rewrite_log(str(log), 1)
    assert log.read_text() == '{"update": 1}\n{"update": 2}\n'  # the old code had already truncated it


def test_a_second_run_on_a_live_runs_folder_is_refused(sft_1p, tmp_path, no_model_loading):
    """While a run holds its folder, a second run (fresh, or --resume auto as a scheduler's requeue would start) is
    refused naming the holder, and touches nothing; once the holder dies (SIGKILL), the folder is free."""
    run_dir = copy_unfinished(sft_1p, tmp_path / "run")
    with held_lock(run_dir) as pid:
        logged = (run_dir / "metrics.jsonl").read_bytes()
        for extra in (["--resume", "auto"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=rf"in use by another run \(pid {pid} on "):
                run_in_process(sft_sst2, [*SFT_ARGS, *extra], run_dir)
        assert (run_dir / "metrics.jsonl").read_bytes() == logged
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "update_0000016"
    assert sft_sst2.lock_output_dir(str(run_dir), 0) is not None


def test_a_full_disk_says_so_and_leaves_no_half_checkpoint(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sft_sst2.torch, "save", full)
    monkeypatch.setattr(sft_sst2.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(SystemExit, match=r"no space left on device while writing .*checkpoints/update_0000004.tmp"):
        run_in_process(sft_sst2, [*SFT_ARGS, "--total_episodes", "96"], tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == []
