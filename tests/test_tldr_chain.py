"""tools/tldr_chain.py: the stage list (every stage's arguments parse with its script), finished-stage skipping and the
true-quality summary in seconds; the whole chain in miniature, run as a user runs it, in the slow suite."""

import contextlib
import importlib.util
import io
import json
import os
import sys

import datasets
import pytest
import tyro
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "data"))
import make_tldr  # noqa: E402
import tldr_chain  # noqa: E402


def script_args(script):
    spec = importlib.util.spec_from_file_location(f"chain_{script.replace('/', '_')[:-3]}", ROOT / script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # tyro's errors inspect it
    spec.loader.exec_module(module)
    return module.Args


@pytest.mark.parametrize("algorithm,judge", [("rebel_online", None), ("rloo", "some/chat-model")])
def test_stage_list_and_every_stage_parses(tmp_path, algorithm, judge):
    args = tldr_chain.Args(output_dir=str(tmp_path / "c"), algorithm=algorithm, judge_model=judge,
                           reward_data="ranked")
    plan = tldr_chain.stages(args)
    out = args.output_dir
    expected = [("sft", "sft.py"), ("reward", "reward.py"), ("rl", f"{algorithm}.py"), ("answers/sft", "generate.py"),
                ("gold/sft", "score.py"), ("answers/rl", "generate.py"), ("gold/rl", "score.py")]
    expected += [("judge", os.path.join("tools", "judge.py"))] if judge else []
    assert [(os.path.relpath(f, out), s) for f, s, _ in plan] == expected
    flag = lambda a, name: a[a.index(name) + 1]  # noqa: E731
    _, _, reward = plan[1]
    assert flag(reward, "--task.dataset").endswith("ranked") and flag(reward, "--task.dataset_format") == "ranked"
    _, _, gold = plan[4]
    assert flag(gold, "--reward_fn").endswith("make_tldr.py:gold") and flag(gold, "--dataset") == f"{out}/answers/sft"
    for folder, script, a in plan:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                tyro.cli(script_args(script), args=[*a, "--output_dir", folder], use_underscores=True)
        except SystemExit:
            pytest.fail(f"{script} refuses {' '.join(a)}:\n{stderr.getvalue()[-2000:]}")


def test_finished_stages_are_skipped_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    args = tldr_chain.Args(output_dir=str(tmp_path / "c"))
    plan = tldr_chain.stages(args)
    (tmp_path / "c" / "sft").mkdir(parents=True)
    (tmp_path / "c" / "sft" / "config.json").write_text("{}")  # a saved model: finished
    (tmp_path / "c" / "reward").mkdir()
    (tmp_path / "c" / "reward" / "metrics.jsonl").write_text("")  # metrics but no model: interrupted
    (tmp_path / "c" / "answers" / "sft").mkdir(parents=True)
    (tmp_path / "c" / "answers" / "sft" / "dataset_dict.json").write_text("{}")  # a saved dataset: finished
    ran = []
    monkeypatch.setattr(tldr_chain.quickstart.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(tldr_chain, "summarize", lambda args: {})
    with contextlib.suppress(KeyError):  # the fake summary has nothing to print
        tldr_chain.main(args)
    assert [os.path.relpath(cmd[1], ROOT) for cmd in ran] == [s for _, s, _ in plan[1:3]] + ["score.py", "generate.py",
                                                                                            "score.py"]
    assert ran[0][-2:] == ["--resume", "auto"]  # the reward model continues from its checkpoint
    assert "--resume" not in ran[2]  # score.py continues from its shards by itself


def test_gold_summary(tmp_path):
    """Per-post means first, then their mean and standard error; the fraction of summaries as good as the reference."""
    posts = [(4.0, 0.0), (4.0, 4.0), (2.0, 1.0), (2.0, 3.0)]  # response i's reward for the two posts
    columns = {f"response_{i}_reward": [a, b] for i, (a, b) in enumerate(posts)}
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "g")
    g = tldr_chain.gold_summary(str(tmp_path / "g"))
    assert g["quality"] == pytest.approx(2.5) and g["quality_se"] == pytest.approx(0.5)  # post means 3 and 2
    assert g["perfect"] == pytest.approx(3 / 8) and g["posts"] == 2


def test_gold_reward_scores_the_references_4_and_rankings_in_order():
    rows = [json.loads(line) for line in open(ROOT / "data" / "tldr" / "sft" / "validation.jsonl")][:50]
    assert make_tldr.gold([r["prompt"] for r in rows], [r["completion"] for r in rows]) == [4.0] * 50
    ranked = [json.loads(line) for line in open(ROOT / "data" / "tldr" / "ranked" / "validation.jsonl")][:20]
    for r in ranked:
        scores = make_tldr.gold([r["prompt"]] * len(r["ranked"]), r["ranked"])
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


@pytest.mark.slow
def test_the_chain_runs_end_to_end_and_skips_what_is_finished(tmp_path):
    import subprocess

    cmd = [sys.executable, str(ROOT / "tools" / "tldr_chain.py"), "--output_dir", str(tmp_path / "c"), "--sft_epochs",
           "1", "--reward_epochs", "1", "--rl_episodes", "64", "--eval_posts", "8"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["sft/val_loss"][1] < summary["sft/val_loss"][0] - 2
    assert summary["reward/val_accuracy"][1] > 0.7  # the comparisons are learnable in one epoch
    for policy in ("sft", "rl"):  # score.py's gold rewards equal the rule applied to generate.py's answers
        answers = datasets.load_from_disk(tmp_path / "c" / "answers" / policy)
        per_post = [sum(make_tldr.quality(r["prompt"], r[f"response_{k}"]) for k in range(4)) / 4 for r in answers]
        assert summary[f"gold/{policy}"]["posts"] == len(per_post) == 8
        assert summary[f"gold/{policy}"]["quality"] == pytest.approx(sum(per_post) / 8)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already finished, skipped") == 7
