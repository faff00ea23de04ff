"""Shared test helpers: run a script as a user would (a subprocess, optionally under torchrun), read what it wrote.

Everything runs offline on the tiny models in data/ and the synthetic SST-2 corpus in data/sst2."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
TLDR = DATA / "tldr"
TINY_GPT2 = DATA / "tiny-gpt2"
TINY_LLAMA = DATA / "tiny-llama3-chat"


def command(script, args, nproc=1):
    """`python script args` (nproc 1) or `torchrun --nproc_per_node nproc script args`."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    return [*launcher, str(ROOT / script), *map(str, args)]


def run(script, *args, nproc=1, check=True, env=None):
    """Run a top-level script as a user would; return the finished process (raise with its output if it failed)."""
    cmd = command(script, args, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=900)  # a hang fails the test instead of stalling the suite
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_into(script, args, run_dir, nproc=1):
    """Run a script with --output_dir run_dir (a session fixture's run); return run_dir."""
    run(script, *args, "--output_dir", run_dir, nproc=nproc)
    return run_dir


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


def logged_updates(run_dir):
    """Updates in metrics.jsonl so far (a line being written is skipped)."""
    updates = []
    with contextlib.suppress(FileNotFoundError), open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                updates.append(json.loads(line)["update"])
    return updates


def preempt(script, args, run_dir, nproc=1, after_update=1):
    """Start a run in its own process group; once it has logged `after_update`, freeze the group and send SIGTERM to
    every process in it (as Slurm does to a job step), then let it go on. Returns the finished process's
    (returncode, output)."""
    proc = subprocess.Popen(command(script, args, nproc), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    while not any(u >= after_update for u in logged_updates(run_dir)):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{script} ended or stalled before update {after_update}:\n{proc.communicate()[0]}")
        time.sleep(0.005)
    for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT):
        os.killpg(proc.pid, sig)
    output = proc.communicate(timeout=600)[0]
    return proc.returncode, output


def assert_same_metrics(reference_dir, run_dir, skip=("eps", "elapsed")):
    """Every update logged once, with the same numbers as the reference run's (timing aside)."""
    reference, rows = metrics(reference_dir), metrics(run_dir)
    assert [m["update"] for m in rows] == [m["update"] for m in reference[-len(rows):]]
    for a, b in zip(reference[-len(rows):], rows):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def check_preempt_and_resume(script, args, reference_dir, run_dir, nproc):
    """SIGTERM mid-run: the update finishes, a checkpoint is written, the run exits 143 saying how to resume; resumed
    with --resume auto it ends with weights bitwise equal to the uninterrupted reference run's, and the same metrics.
    Returns the output of both runs."""
    code, output = preempt(script, [*args, "--output_dir", run_dir], run_dir, nproc)
    assert code != 0 and "preempted: checkpoint written to" in output and "--resume auto" in output, output[-3000:]
    assert not (Path(run_dir) / "config.json").exists()
    stopped_at = logged_updates(run_dir)[-1]
    assert (Path(run_dir) / "checkpoints" / f"update_{stopped_at:07d}" / "state.json").exists()
    assert stopped_at < logged_updates(reference_dir)[-1], "the run ended before SIGTERM could interrupt it"
    resumed = run(script, *args, "--output_dir", run_dir, "--resume", "auto", nproc=nproc)
    assert_weights_equal(reference_dir, run_dir)
    assert_same_metrics(reference_dir, run_dir)
    return output, resumed.stdout


def online_args(sft, rm, *extra):
    """The arguments the online scripts (ppo.py, rloo.py, grpo.py) share, at the size of the short test runs."""
    return ["--model_name_or_path", sft, "--reward_model_name_or_path", rm, "--task.dataset", SST2, "--lr", "1e-4",
            "--batch_size", "16", "--local_micro_batch_size", "4", "--local_rollout_forward_batch_size", "8",
            "--eval_size", "8", *extra]


def assert_same_run(one, two, keys=("objective/scores", "objective/kl", "loss/policy_avg", "eval/scores")):
    """Close weights and curves (one rank against several: sums run in another order)."""
    assert_weights_equal(one, two, exact=False)
    for key in keys:
        expected = [m[key] for m in metrics(one) if key in m]
        assert expected, key
        assert [m[key] for m in metrics(two) if key in m] == pytest.approx(expected, rel=1e-4, abs=1e-6), key


LEARN_UPDATES = 30


def learning_args(sft, rm, *extra):
    """The short learning runs' settings (30 updates of 32 responses, 256 held-out prompts). The prompt is a
    sentence's first word, so the response decides its sentiment: with the default 4 words the prompt mostly fixes it,
    and with 15 updates the held-out gain was within seed-to-seed noise (measured on one 2-core machine, seeds 1-6:
    PPO -0.19 to +0.86, GRPO -0.44 to +0.89, RLOO -0.16 to +0.77, online REBEL -0.03 to +0.87; a CI machine, whose
    float sums differ, failed two of the four). With these settings seeds 1-4 there gained PPO +1.44 to +2.64, online
    REBEL +1.43 to +1.93, RLOO +0.90 to +1.51, GRPO +0.74 to +1.56."""
    return ["--model_name_or_path", sft, "--reward_model_name_or_path", rm, "--task.dataset", SST2,
            "--task.prompt_words", "1", "--lr", "3e-4", "--batch_size", "32", "--local_micro_batch_size", "32",
            "--total_episodes", str(32 * LEARN_UPDATES), "--eval_size", "256", *extra]


def check_short_run_learns(script, args, out, margin):
    """A short run on the SST-2 toy (`learning_args`) whose held-out reward-model score (evaluated before the first
    update and after the last) ends more than `margin` above the SFT policy's, having moved away from the reference to
    get there. The paired standard error of the gain on 256 prompts is about 0.17."""
    run(script, *args, "--eval_freq", LEARN_UPDATES, "--output_dir", out)
    evals = [m for m in metrics(out) if "eval/scores" in m]
    assert [m["update"] for m in evals] == [0, LEARN_UPDATES]
    # the reward model's scores spread over about [-3, 3]; the SFT policy's held-out mean is near 0
    assert evals[-1]["eval/scores"] > evals[0]["eval/scores"] + margin, evals
    assert evals[-1]["eval/kl"] > 0.1, evals
    assert (Path(out) / "model.safetensors").exists() and (Path(out) / "tokenizer.json").exists()
    return evals


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any model fails the test: errors that must come before that expensive work use it. Building one on
    the meta device (no weights, no memory: the LoRA target check) is allowed."""
    import transformers

    def refuse(original):
        def call(*args, **kwargs):
            if torch.get_default_device().type == "meta":
                return original(*args, **kwargs)
            raise AssertionError("a model was loaded before the bad input was reported")
        return call

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse(cls.from_pretrained))
        monkeypatch.setattr(cls, "from_config", refuse(cls.from_config))


def run_in_process(module, args, run_dir):
    """main() of an imported script, with the arguments a user would type (faster than a new process)."""
    import tyro

    argv = [*map(str, args), "--output_dir", str(run_dir)]
    return module.main(tyro.cli(module.Args, use_underscores=True, args=argv))


def check_resume_from_checkpoint(module, args, reference_dir, run_dir, update):
    """Resuming the reference run's checkpoint at `update`, with nothing else from that run (a new process state, a
    new output folder), ends with weights bitwise equal to the reference's and the same metrics after it."""
    run_in_process(module, [*args, "--resume", Path(reference_dir) / "checkpoints" / f"update_{update:07d}"], run_dir)
    assert_weights_equal(reference_dir, run_dir)
    assert_same_metrics(reference_dir, run_dir)


def run_of_commit(commit, script, args, out, tmp_path):
    """`script` as it was at `commit` (git show; every path in `args` absolute), run as a user would; skipped where
    there is no git history holding the commit."""
    folder = tmp_path / f"at_{commit}"
    folder.mkdir(exist_ok=True)
    source = subprocess.run(["git", "show", f"{commit}:{script}"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"no git history with commit {commit} here: {source.stderr.strip()}")
    (folder / script).write_text(source.stdout)
    proc = subprocess.run([sys.executable, str(folder / script), *map(str, args), "--output_dir", str(out)],
                          cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def copy_unfinished(run_dir, to):
    """A copy of a finished run as it was before its final save: args, logs and checkpoints, no model."""
    shutil.copytree(run_dir, to, ignore=lambda d, names: [n for n in names if n == "config.json" or
                                                          n.endswith(".safetensors")])
    return to


@contextlib.contextmanager
def held_lock(output_dir):
    """Another process holds the output folder's lock (as a live run does) until the block ends, then dies by SIGKILL.
    Yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sft_sst2; "
                               f"lock = sft_sst2.lock_output_dir({str(output_dir)!r}, 0); print('locked', flush=True); "
                               "import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def check_resume_refuses_other_settings(module, args, reference_dir, tmp_path, changes):
    """`--resume auto` with arguments that change results (`changes`: (flag, old, new) triples) is refused before any
    model is loaded, naming each changed flag with its old and new value, and leaves args.json as it was."""
    run_dir = copy_unfinished(reference_dir, tmp_path / "unfinished")
    before = (run_dir / "args.json").read_bytes()
    flags = [part for flag, _, new in changes for part in (flag, new)]
    with pytest.raises(ValueError, match="the run was started with other settings") as refused:
        run_in_process(module, [*args, *flags, "--resume", "auto"], run_dir)
    for flag, old, new in changes:
        assert f"{flag} {old} -> {new}" in str(refused.value), str(refused.value)
    assert (run_dir / "args.json").read_bytes() == before
    assert not (run_dir / "config.json").exists()


def checkpoint_weights(checkpoint):
    """The model weights stored in a checkpoint (torch.distributed.checkpoint format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(checkpoint).parent / (Path(checkpoint).name + ".pt")
    dcp_to_torch_save(Path(checkpoint) / "dcp", path)
    return torch.load(path, weights_only=False)["model"]


@contextlib.contextmanager
def nonfinite_gradients(at_steps):
    """Turn the gradient non-finite at the given optimizer steps (1-based), as a NaN loss or an overflow would."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def poisoned(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) in at_steps:
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = float("nan")
        return real(parameters, max_norm, *args, **kwargs)

    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = poisoned
    try:
        yield calls
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def check_nonfinite_guard(module, args, reference_dir, tmp_path, good, capsys):
    """In-process runs with poisoned gradients. One bad update (good + 1) is skipped and counted and the run finishes
    with finite weights, keeping only keep_checkpoints checkpoints; two in a row (max_bad_updates 2) stop the run with
    a message and a checkpoint holding the last good weights: bitwise those of the reference run after update good."""
    with nonfinite_gradients({good + 1}):
        run_in_process(module, [*args, "--keep_checkpoints", "2"], tmp_path / "one")
    rows = [m for m in metrics(tmp_path / "one") if "loss/skipped_updates" in m]
    assert [m["loss/skipped_updates"] for m in rows[good - 1:good + 2]] == [0, 1, 1]
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "one").values())
    assert len(list((tmp_path / "one" / "checkpoints").iterdir())) == 2
    capsys.readouterr()
    with nonfinite_gradients({good + 1, good + 2}), pytest.raises(SystemExit) as stop:
        run_in_process(module, [*args, "--max_bad_updates", "2"], tmp_path / "two")
    assert stop.value.code == 1 and "stopping: 2 updates in a row had a non-finite" in capsys.readouterr().err
    stopped = checkpoint_weights(tmp_path / "two" / "checkpoints" / f"update_{good + 2:07d}")
    last_good = checkpoint_weights(Path(reference_dir) / "checkpoints" / f"update_{good:07d}")
    assert stopped.keys() == last_good.keys() and all(torch.equal(stopped[k], last_good[k]) for k in last_good)


def pair_rows(maxlen_prompt=7, maxlen=6, lengths=((3, 2, 5), (7, 6, 1), (1, 4, 3)), seed=1):
    """Pairs in filter.py's layout (random ids), one per (prompt, chosen, reject) real length in `lengths`."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, chosen_len, reject_len in lengths:
        row = {}
        for name, n, width, left in (("prompt", prompt_len, maxlen_prompt, True), ("chosen", chosen_len, maxlen, False),
                                     ("reject", reject_len, maxlen, False)):
            ids = torch.randint(5, 1000, (n,), generator=g).tolist()
            pad = [4] * (width - n)
            row[f"{name}_input_ids"] = pad + ids if left else ids + pad
            row[f"{name}_attention_mask"] = [0] * len(pad) + [1] * n if left else [1] * n + [0] * len(pad)
        row["chosen_reward"], row["reject_reward"] = 1.0, 0.0
        rows.append(row)
    return datasets.Dataset.from_list(rows).with_format("torch")


def save_tiny(path, config, model_class):
    """A model of `config` with seeded random weights, saved with the tiny Llama-3 chat tokenizer."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_class.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


RM_ARGS = ["--model_name_or_path", TINY_GPT2, "--from_scratch", "--dataset", SST2, "--lr", "3e-3",
           "--warmup_ratio", "0.1", "--batch_size", "32", "--local_micro_batch_size", "16", "--eval_freq", "50"]


@pytest.fixture(scope="session")
def reward_model(session_dir):
    """A reward model trained for one epoch of the offline corpus (about 0.98 pairwise accuracy)."""
    return run_into("reward_sst2.py", RM_ARGS, session_dir / "rm")


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
