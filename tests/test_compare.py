"""tools/compare.py without training anything: the stage list, skipping a missing script, finished-stage detection,
the cost measurement of a stage, and the report (table, plots, results) from fake metrics. Seconds, not minutes."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402
import quickstart  # noqa: E402


def small_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "cmp"), algorithms=("ppo", "rebel", "dpo"), ppo=(0.05, 0.5),
                    rebel=(1.0,), dpo=(0.1,), episodes=640)
    return compare.Args(**{**defaults, **kw})


def test_stage_list(tmp_path):
    args = small_args(tmp_path)
    plan = compare.stages(args)
    out = args.output_dir
    folders = list(dict.fromkeys(s.folder for s in plan))
    assert folders[:2] == [f"{out}/sft", f"{out}/reward"]
    assert len(folders) == 2 + 2 + 9 + 5  # sft, reward; 2 PPO runs; REBEL: 3 shared data, 2 train, 3 iter1 data, eval
    ppo = next(s for s in plan if s.folder == f"{out}/seed1/ppo_0.05")
    assert ppo.script == "ppo.py" and ppo.run == ("ppo", 0.05, 1)
    flag = lambda s, name: s.args[s.args.index(name) + 1]  # noqa: E731
    assert flag(ppo, "--total_episodes") == "640" and flag(ppo, "--ppo.kl_coef") == "0.05"
    assert flag(ppo, "--model_name_or_path") == f"{out}/sft" and flag(ppo, "--reward_model_name_or_path") == \
        f"{out}/reward"
    # REBEL: iteration 0 on the shared pairs of the SFT policy (prompts [0, 80)), iteration 1 from iteration 0's policy
    gen0 = next(s for s in plan if s.folder == f"{out}/seed1/data/iter0/generate")
    assert (flag(gen0, "--start_idx"), flag(gen0, "--end_idx"), flag(gen0, "--num_responses")) == ("0", "80", "4")
    gen1 = next(s for s in plan if s.folder == f"{out}/seed1/rebel_1/iter1/generate")
    assert (flag(gen1, "--start_idx"), flag(gen1, "--end_idx")) == ("80", "160")
    assert flag(gen1, "--model_name_or_path") == f"{out}/seed1/rebel_1/iter0/train"
    evaluation = next(s for s in plan if s.folder == f"{out}/seed1/rebel_1/eval")
    i = evaluation.args.index("--episodes")
    assert evaluation.args[i + 1:i + 3] == ["320", "640"]
    # DPO: one round on the whole budget's prompts from the SFT policy, trained from the SFT policy
    gen = next(s for s in plan if s.folder == f"{out}/seed1/data/all/generate")
    assert (flag(gen, "--start_idx"), flag(gen, "--end_idx")) == ("0", "160")
    train = next(s for s in plan if s.folder == f"{out}/seed1/dpo_0.1/iter0/train")
    assert train.script == "dpo.py" and flag(train, "--dpo.beta") == "0.1"
    # 160 prompts x 4 responses = 640 episodes for every run; a budget that does not divide is refused
    with pytest.raises(SystemExit, match="multiple of 64"):
        compare.stages(small_args(tmp_path, episodes=650))


def test_missing_script_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(compare.ALGORITHMS, "ppo", compare.Algorithm("PPO", "no_such_script.py", "online", "--x"))
    args = small_args(tmp_path, dry_run=True)
    plan = compare.main(args)
    assert not any(s.run and s.run[0] == "ppo" for s in plan)
    assert "no_such_script.py is not in this repository yet, skipped" in capsys.readouterr().out


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    args = small_args(tmp_path)
    for folder in ("sft", "reward"):
        os.makedirs(os.path.join(args.output_dir, folder))
        open(os.path.join(args.output_dir, folder, "config.json"), "w").close()
    ran = []

    def fake_run(stage, overwrite, env):
        ran.append(stage.folder)
        if stage.folder.endswith("data/iter0/filter"):  # e.g. too few pairs left
            raise compare.subprocess.CalledProcessError(1, ["filter.py"])
        return {"wall_s": 1.0, "peak_mib": 1.0}

    monkeypatch.setattr(compare, "run_stage", fake_run)
    compare.main(args)
    assert not any("rebel_1" in f for f in ran)  # REBEL needs the failed stage: its other stages are not run
    assert any(f.endswith("ppo_0.5") for f in ran) and any("dpo_0.1" in f for f in ran)
    assert "rebel 1 seed 1: failed at" in capsys.readouterr().out


def test_finished_markers(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")  # a training run writes this as it goes: not finished
    assert not quickstart.finished(str(folder), "ppo.py")
    assert quickstart.finished(str(folder), "tools/eval_policy.py")
    (folder / "config.json").write_text("{}")
    assert quickstart.finished(str(folder), "ppo.py")
    assert not quickstart.finished(str(folder), "generate.py")


def test_run_stage_measures_the_child(tmp_path):
    stage = compare.Stage(str(tmp_path / "x"), "tools/report.py", ["--help"])
    cost = compare.run_stage(stage, False, dict(os.environ))
    assert cost["wall_s"] > 0 and 10 < cost["peak_mib"] < 10_000


def fake_eval(folder, start, end, kl, episodes):
    os.makedirs(folder, exist_ok=True)
    step = lambda i: i / (len(episodes) - 1)  # noqa: E731
    rows = [{"episode": e, "eval/scores": start[0] + (end[0] - start[0]) * step(i),
             "eval/judge": start[1] + (end[1] - start[1]) * step(i), "eval/kl": kl * step(i)}
            for i, e in enumerate(episodes)]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [{"episode": 0, "loss": 1.0}, *rows])
    # two held-out prompts whose judge scores move by the change of the mean +- 0.01: standard error 0.01
    change = end[1] - start[1]
    samples = [{"update": u, "index": i, "judge": start[1] + (change + (0.01 if i else -0.01)) * (u == len(rows) - 1)}
               for u in range(len(rows)) for i in range(2)]
    with open(os.path.join(folder, "eval_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def test_report_from_fake_metrics(tmp_path):
    args = small_args(tmp_path, seeds=(1, 2), report_only=True)
    for seed in args.seeds:
        for kl, end in ((0.05, (0.9, 0.1)), (0.5, (0.4, 0.3))):
            folder = compare.run_folder(args, "ppo", kl, seed)
            fake_eval(folder, (0.1, 0.2), (end[0] + 0.01 * seed, end[1]), 3 - 4 * kl, [0, 320, 640])
            open(os.path.join(folder, "config.json"), "w").close()
        fake_eval(os.path.join(compare.run_folder(args, "rebel", 1.0, seed), "eval"), (0.1, 0.2), (0.8, 0.4), 2.0,
                  [0, 320, 640])
        # DPO of seed 2 unfinished: left out
    fake_eval(os.path.join(compare.run_folder(args, "dpo", 0.1, 1), "eval"), (0.1, 0.2), (0.5, 0.25), 1.0, [0, 640])
    costs = {compare.run_folder(args, "ppo", 0.05, 1): {"wall_s": 10.0, "peak_mib": 300.0, "runs": [["ppo", 0.05, 1]]},
             f"{args.output_dir}/seed1/data/all/generate": {"wall_s": 5.0, "peak_mib": 200.0,
                                                              "runs": [["dpo", 0.1, 1], ["rebel", 1.0, 1]]},
             f"{args.output_dir}/seed1/dpo_0.1/iter0/train": {"wall_s": 7.0, "peak_mib": 250.0,
                                                              "runs": [["dpo", 0.1, 1]]}}
    records = compare.write_report(args, costs)
    assert len(records) == 2 * 2 + 2 + 1
    report = os.path.join(args.output_dir, "report")
    for name in ("frontier.png", "curves.png", "table.md", "results.json"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    table = open(os.path.join(report, "table.md")).read()
    assert "Budget: 640 sampled and scored responses per run; seeds 1, 2" in table
    assert "| SFT policy | | +0.100 ± 0.000 | +0.200 ± 0.000 | | 0 |" in table
    assert ("| PPO | kl_coef 0.05 | +0.915 ± 0.007 | +0.100 ± 0.000 | -0.100 ± 0.010 / -0.100 ± 0.010 | 2.80 ± 0.00 | "
            "no | 10 | 300 |") in table  # the judge fell below the SFT policy's
    assert "| 1.00 ± 0.00 | yes | n/a | n/a |" in table
    assert "| DPO | beta 0.1 | +0.500 | +0.250 | +0.050 ± 0.010 | 1.00 | yes | 12 | 250 |" in table  # shared stage
    records[0]["judge_delta"] = 0.015  # a rise within 2 standard errors
    assert compare.verdict(records[0]) == "within noise"
    results = json.load(open(os.path.join(report, "results.json")))
    assert results["episodes"] == 640 and len(results["runs"]) == 7
