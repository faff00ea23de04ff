"""tools/compare.py without training anything: the stage list, skipping a missing script, finished-stage detection,
the cost measurement of a stage, and the report (table, plots, results) from fake metrics; with --judge llm, the judge
stages (their arguments as tools/judge.py reads them, run on fake evaluations with a scripted judge, skipped when
finished) and the win-rate report from fake judge summaries. Seconds, not minutes."""

import json
import os
import sys

import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402
import judge  # noqa: E402
import quickstart  # noqa: E402
from test_judge import KEY, StandIn  # noqa: E402  (an OpenAI-compatible stand-in server on 127.0.0.1)


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
    assert not any(s.script == compare.JUDGE for s in plan)  # VADER, the default: no judge stage


def judge_args(stage):
    """A judge stage's arguments as tools/judge.py reads them (compare.py adds --output_dir)."""
    return tyro.cli(judge.Args, use_underscores=True, args=[*stage.args, "--output_dir", stage.folder])


def test_stage_list_with_an_llm_judge(tmp_path):
    args = small_args(tmp_path, judge="llm", judge_model="judge-x", judge_url="http://127.0.0.1:9",
                      judge_api_key_env="MY_KEY")
    plan = compare.stages(args)
    out = args.output_dir
    judges = [s for s in plan if s.script == compare.JUDGE]
    assert [s.folder for s in judges] == [f"{out}/seed1/{run}/judge" for run in ("ppo_0.05", "ppo_0.5", "rebel_1",
                                                                                   "dpo_0.1")]
    # each run's last stage, after the one that writes its evaluations
    for s in judges:
        run_stages = [t.folder for t in plan if t.run == s.run]
        assert run_stages[-1] == s.folder and s.run[0] in s.folder
    # the final evaluation: an online run's last update (640 / 64), an offline run's last policy (eval_policy.py's
    # update t is its t-th policy): REBEL's second iteration, DPO's only one
    for s, samples, final in zip(judges, ("ppo_0.05/eval_samples.jsonl", "ppo_0.5/eval_samples.jsonl",
                                          "rebel_1/eval/eval_samples.jsonl", "dpo_0.1/eval/eval_samples.jsonl"),
                                 ("10", "10", "2", "1")):
        j = judge_args(s)
        assert j.a == j.b == f"{out}/seed1/{samples}"
        assert (j.a_where, j.b_where) == (f"update={final}", "update=0")
        assert (j.a_column, j.b_column, j.a_id_column, j.b_id_column) == ("response", "response", "index", "index")
        assert (j.judge_model, j.judge_url, j.judge_api_key_env, j.template) == ("judge-x", "http://127.0.0.1:9",
                                                                                  "MY_KEY", "sentiment")
        assert j.output_dir == s.folder
    assert "--judge_url" not in compare.stages(small_args(tmp_path, judge="llm", judge_model="m"))[-1].args
    with pytest.raises(SystemExit, match="--judge llm needs --judge_model"):
        compare.stages(small_args(tmp_path, judge="llm"))
    with pytest.raises(SystemExit, match="--judge_model --judge_template: only with --judge llm"):
        compare.stages(small_args(tmp_path, judge_model="m", judge_template="tldr"))


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


def fake_eval(folder, start, end, kl, episodes, updates=None):
    """metrics.jsonl and eval_samples.jsonl of a run evaluated at `episodes` (its updates: 0, 1, ... or `updates`);
    the answers to the two held-out prompts are "meh i" until the last evaluation's "good i"."""
    os.makedirs(folder, exist_ok=True)
    step = lambda i: i / (len(episodes) - 1)  # noqa: E731
    rows = [{"episode": e, "eval/scores": start[0] + (end[0] - start[0]) * step(i),
             "eval/judge": start[1] + (end[1] - start[1]) * step(i), "eval/kl": kl * step(i)}
            for i, e in enumerate(episodes)]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [{"episode": 0, "loss": 1.0}, *rows])
    # two held-out prompts whose judge scores move by the change of the mean +- 0.01: standard error 0.01
    change = end[1] - start[1]
    updates = updates or range(len(rows))
    samples = [{"update": u, "index": i, "prompt": f"review {i}",
                "response": f"{'good' if k == len(rows) - 1 else 'meh'} {i}",
                "judge": start[1] + (change + (0.01 if i else -0.01)) * (k == len(rows) - 1)}
               for k, u in enumerate(updates) for i in range(2)]
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
    # VADER, the default: none of the LLM judge's columns, keys or panels
    assert ("| algorithm | setting | RM score | judge (VADER) | judge − SFT's (± s.e.) | KL to SFT | judge agrees | "
            "wall time (s) | peak memory (MiB) |") in table and "win rate" not in table and "Judge:" not in table
    assert "judge" not in results and not any("win_rate" in r for r in results["runs"])


def scripted_sentiment_judge(questions):
    """Prefers the continuation saying "good" (the fake runs' final answers)."""
    return ["More positive: " + ("A" if "Continuation A:\ngood" in q else "B") for q in questions]


def finished_ppo_run(args):
    """The SFT policy, the reward model and a PPO run at kl_coef 0.05 finished, its evaluations as ppo.py writes them
    (updates 0, 5 and 10 of 640 / 64)."""
    for folder in ("sft", "reward"):
        os.makedirs(os.path.join(args.output_dir, folder))
        open(os.path.join(args.output_dir, folder, "config.json"), "w").close()
    ppo = compare.run_folder(args, "ppo", 0.05, 1)
    fake_eval(ppo, (0.1, 0.2), (0.5, 0.3), 1.0, [0, 320, 640], updates=[0, 5, 10])
    open(os.path.join(ppo, "config.json"), "w").close()
    return ppo


def test_judge_stages_run_on_the_evaluations_and_are_skipped_when_finished(tmp_path, monkeypatch, capsys):
    args = small_args(tmp_path, algorithms=("ppo", "dpo"), ppo=(0.05,), judge="llm", judge_model="judge-x")
    ppo = finished_ppo_run(args)
    for stage in compare.stages(args):  # DPO: every stage finished, its evaluation as eval_policy.py writes it
        if stage.run and stage.run[0] == "dpo" and stage.script != compare.JUDGE:
            os.makedirs(stage.folder, exist_ok=True)
            open(os.path.join(stage.folder, "dataset_dict.json" if stage.script.endswith(("generate.py", "score.py",
                                                                                          "filter.py"))
                              else "config.json"), "w").close()
    fake_eval(os.path.join(compare.run_folder(args, "dpo", 0.1, 1), "eval"), (0.1, 0.2), (0.05, 0.3), 2.0, [0, 640])
    ran = []

    def fake_run(stage, overwrite, env):  # only the judge stages are left to run: tools/judge.py, a scripted judge
        ran.append(stage.folder)
        assert stage.script == compare.JUDGE and not overwrite
        judge.main(judge_args(stage), scripted_sentiment_judge)
        return {"wall_s": 100.0, "peak_mib": 1.0}

    monkeypatch.setattr(compare, "run_stage", fake_run)
    compare.main(args)
    assert ran == [f"{ppo}/judge", f"{compare.run_folder(args, 'dpo', 0.1, 1)}/judge"]
    summary = json.load(open(os.path.join(ppo, "judge", "summary.json")))
    assert (summary["win_rate"], summary["stderr"], summary["n"]) == (1.0, 0.0, 2)  # "good i" over "meh i", both orders
    table = open(os.path.join(args.output_dir, "report", "table.md")).read()
    # PPO's score rose, DPO's fell (+0.05 < +0.1): the judge's verdict needs both; the judge's time is not the run's
    assert "| PPO | kl_coef 0.05 | +0.500 | 1.000 ± 0.000 | 1.00 | yes | n/a | n/a |" in table
    assert "| DPO | beta 0.1 | +0.050 | 1.000 ± 0.000 | 2.00 | no | n/a | n/a |" in table
    capsys.readouterr()
    compare.main(args)  # everything finished: nothing runs again
    assert len(ran) == 2 and f"{ppo}/judge: already finished, skipped" in capsys.readouterr().out


def test_a_judge_stage_runs_tools_judge_py_as_a_user_runs_it(tmp_path, monkeypatch):
    server = StandIn(lambda content: scripted_sentiment_judge([content])[0])
    try:
        monkeypatch.setenv("H21_JUDGE_KEY", KEY)  # the stand-in refuses a request without this key
        args = small_args(tmp_path, algorithms=("ppo",), ppo=(0.05,), judge="llm", judge_model="judge-x",
                          judge_url=server.url, judge_api_key_env="H21_JUDGE_KEY")
        ppo = finished_ppo_run(args)
        compare.main(args)  # the judge stage only: a tools/judge.py process asking the stand-in
        summary = json.load(open(os.path.join(ppo, "judge", "summary.json")))
        assert (summary["win_rate"], summary["n"], summary["backend"]) == (1.0, 2, "http") and not server.errors
        assert len(server.requests) == 1 + 4  # the probe, then 2 prompts x 2 orders
        assert KEY not in open(os.path.join(ppo, "judge", "summary.json")).read()
    finally:
        server.close()
    stage = next(s for s in compare.stages(args) if s.script == compare.JUDGE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    cmd, env = compare.stage_command(stage, True, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "X": "y"})
    assert cmd[-3:] == ["--output_dir", stage.folder, "--overwrite"]  # compare.py --overwrite redoes a judgment
    # the judge loads from the hub as the user's environment allows, not offline as the toy's stages do
    assert env == {"HF_DATASETS_OFFLINE": "0", "X": "y"}


def test_report_with_an_llm_judge_from_fake_summaries(tmp_path, monkeypatch, capsys):
    args = small_args(tmp_path, seeds=(1, 2), report_only=True, judge="llm", judge_model="judge-x")
    wins = {("ppo", 0.05, 1): (0.70, 0.04), ("ppo", 0.05, 2): (0.66, 0.04), ("ppo", 0.5, 1): (0.45, 0.05),
            ("ppo", 0.5, 2): (0.61, 0.05), ("rebel", 1.0, 1): (0.30, 0.05), ("dpo", 0.1, 1): (None, None)}
    for seed in args.seeds:
        for kl, end in ((0.05, 0.9), (0.5, 0.4)):
            folder = compare.run_folder(args, "ppo", kl, seed)
            fake_eval(folder, (0.1, 0.2), (end, 0.3), 3 - 4 * kl + seed - 1.5, [0, 320, 640])
            open(os.path.join(folder, "config.json"), "w").close()
        fake_eval(os.path.join(compare.run_folder(args, "rebel", 1.0, seed), "eval"), (0.1, 0.2), (0.8, 0.4), 2.0,
                  [0, 320, 640])  # REBEL of seed 2 evaluated but not judged: left out
    fake_eval(os.path.join(compare.run_folder(args, "dpo", 0.1, 1), "eval"), (0.1, 0.2), (0.5, 0.25), 1.0, [0, 640])
    for (name, value, seed), (win, se) in wins.items():
        os.makedirs(os.path.join(compare.run_folder(args, name, value, seed), "judge"))
        with open(os.path.join(compare.run_folder(args, name, value, seed), "judge", "summary.json"), "w") as f:
            json.dump({"win_rate": win, "stderr": se, "n": 0 if win is None else 128, "prompts": 128, "ties": 3,
                       "unparseable": 256 if win is None else 0}, f)
    drawn = []
    original_plot = compare.plt.Axes.plot

    def plot(ax, *xy, **kw):  # every line drawn, with its panel
        drawn.append((ax, list(xy[0]), list(xy[1]), kw.get("label")))
        return original_plot(ax, *xy, **kw)
    monkeypatch.setattr(compare.plt.Axes, "plot", plot)
    records = compare.write_report(args, {})
    assert "rebel 1 seed 2: not judged" in capsys.readouterr().out and len(records) == 6
    report = os.path.join(args.output_dir, "report")
    table = open(os.path.join(report, "table.md")).read()
    assert "Judge: judge-x (tools/judge.py --template sentiment)" in table
    assert ("| algorithm | setting | RM score | win rate vs SFT (± s.e.) | KL to SFT | judge agrees | wall time (s) | "
            "peak memory (MiB) |") in table and "VADER" not in table and "judge − SFT's" not in table
    assert "| SFT policy | | +0.100 ± 0.000 | | 0 |" in table
    assert "| PPO | kl_coef 0.05 | +0.900 ± 0.000 | 0.700 ± 0.040 / 0.660 ± 0.040 | 2.80 ± 0.71 | yes |" in table
    # seed 1 within 2 standard errors of 0.5, seed 2 above
    assert "| PPO | kl_coef 0.5 | +0.400 ± 0.000 | 0.450 ± 0.050 / 0.610 ± 0.050 | 1.00 ± 0.71 | within noise, yes |" \
        in table
    assert "| REBEL (offline) | eta 1 | +0.800 | 0.300 ± 0.050 | 2.00 | no |" in table
    assert "| DPO | beta 0.1 | +0.500 | n/a | 1.00 | n/a |" in table  # no parseable answer: no win rate
    results = json.load(open(os.path.join(report, "results.json")))
    assert results["judge"] == {"kind": "llm", "model": "judge-x", "template": "sentiment"}
    assert [r["win_rate"] for r in results["runs"]] == [0.70, 0.45, 0.66, 0.61, 0.30, None]
    # frontier.png's judge panel: the win rate (mean over seeds) against the KL, the SFT policy at (0, 0.5)
    panel = [ax for ax, *_ in drawn if ax.get_title() == "judge: win rate vs SFT (judge-x)"]
    lines = [(xs, ys, label) for ax, xs, ys, label in drawn if ax is panel[0]]
    assert lines[0] == ([pytest.approx(2.8), pytest.approx(1.0)], [pytest.approx(0.68), pytest.approx(0.53)], "PPO")
    assert lines[1] == ([2.0], [0.30], "REBEL (offline)") and lines[2] == ([], [], "DPO")
    assert panel[0].collections[0].get_offsets().tolist() == [[0, 0.5]]  # the SFT policy's star
