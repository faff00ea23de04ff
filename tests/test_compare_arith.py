"""tools/compare.py --task arith without training anything: the stage list (every stage's arguments parsed by the
script it runs), the label-flip rate of tools/label_pairs.py, the scoring by the true reward (tools/eval_policy.py's
gold scores and compare.py's curves of the online runs), a finished stage skipped, and the report from fake
evaluations. Seconds, not minutes."""

import importlib.util
import json
import os
import sys

import pytest
import tyro
from datasets import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare  # noqa: E402
import eval_policy  # noqa: E402
import label_pairs  # noqa: E402

sys.path.insert(0, ROOT)
from data.arith import make_arith  # noqa: E402
from data.arith.reward import exact_answer  # noqa: E402


def arith_args(tmp_path, **kw):
    defaults = dict(task="arith", output_dir=str(tmp_path / "cmp"), algorithms=("grpo", "rebel", "dpo"),
                    grpo=(0.05,), rebel=(1.0,), dpo=(0.1,), episodes=1024, eval_size=200)
    return compare.Args(**{**defaults, **kw})


def flag(stage, name):
    return stage.args[stage.args.index(name) + 1]


def parsed(stage):
    """The stage's arguments as its script reads them (compare.py adds --output_dir)."""
    name = f"stage_{os.path.basename(stage.script)[:-3]}"
    if name not in sys.modules:  # tyro reads the docstrings through the module
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, stage.script))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return tyro.cli(sys.modules[name].Args, use_underscores=True, args=[*stage.args, "--output_dir", stage.folder])


def test_arith_stage_list(tmp_path):
    args = arith_args(tmp_path)
    plan = compare.stages(args)
    out = args.output_dir
    folders = list(dict.fromkeys(s.folder for s in plan))
    assert folders[:10] == [f"{out}/{f}" for f in ("data", "sft", "answers/train/generate", "answers/train/score",
                                                   "answers/validation/generate", "answers/validation/score",
                                                  "answers/test/generate", "answers/test/score", "comparisons",
                                                  "reward")]
    assert all(s.run is None for s in plan[:10]) and all(s.run for s in plan[10:])
    by_folder = {s.folder: s for s in plan}
    for stage in by_folder.values():  # every stage parses with its own script's arguments
        parsed(stage)
    data = parsed(by_folder[f"{out}/data"])
    assert (data.wording, data.num_train, data.num_validation) == ("plain", 400, compare.ARITH_RL_PROMPTS)
    sft = parsed(by_folder[f"{out}/sft"])
    assert sft.from_scratch and sft.task.response_column == "equation" and sft.task.dataset == f"{out}/data"
    for split in ("train", "validation", "test"):  # the SFT policy's answers, scored by the exact answer
        gen, score = (parsed(by_folder[f"{out}/answers/{split}/{stage}"]) for stage in ("generate", "score"))
        assert (gen.split, gen.model_name_or_path, gen.keep_columns, gen.temperature) == (split, f"{out}/sft",
                                                                                          ["answer"], 1.0)
        assert score.reward_fn == compare.EXACT and score.dataset == f"{out}/answers/{split}/generate"
    labels = parsed(by_folder[f"{out}/comparisons"])
    assert (labels.train, labels.validation, labels.flip_rate) == (
        (f"{out}/answers/train/score", f"{out}/answers/validation/score"), f"{out}/answers/test/score", 0.2)
    reward = parsed(by_folder[f"{out}/reward"])
    assert reward.model_name_or_path == f"{out}/sft" and reward.task.dataset == f"{out}/comparisons/train.jsonl"
    assert reward.task.eval_dataset == f"{out}/comparisons/validation.jsonl"
    # an online run: the validation split's prompts, test problems held out, the proxy reward model; then its
    # evaluation by the truth
    grpo = parsed(by_folder[f"{out}/seed1/grpo_0.05"])
    assert (grpo.task.train_split, grpo.task.eval_split, grpo.task.prompt_words, grpo.task.response_length) == (
        "validation", "test", 0, 16)
    assert grpo.reward_model_name_or_path == f"{out}/reward" and grpo.reward_fn is None
    assert (grpo.total_episodes, grpo.grpo.beta, grpo.task.temperature) == (1024, 0.05, 1.0)
    evaluation = parsed(by_folder[f"{out}/seed1/grpo_0.05/eval"])
    assert evaluation.policies == (f"{out}/seed1/grpo_0.05",) and evaluation.reference == f"{out}/sft"
    assert evaluation.gold_reward_fn == compare.EXACT and evaluation.greedy and evaluation.eval_split == "test"
    trained_on = parsed(by_folder[f"{out}/seed1/grpo_0.05/eval_rl"])  # the problems the run trains on
    assert (trained_on.eval_split, trained_on.eval_size, trained_on.policies) == ("validation", 256,
                                                                                  evaluation.policies)
    # offline REBEL: two iterations of 128 prompts x 4 answers, scored by the proxy
    gen1 = parsed(by_folder[f"{out}/seed1/rebel_1/iter1/generate"])
    assert (gen1.split, gen1.start_idx, gen1.end_idx) == ("validation", 128, 256)
    assert parsed(by_folder[f"{out}/seed1/rebel_1/iter1/score"]).reward_model == f"{out}/reward"
    train = parsed(by_folder[f"{out}/seed1/rebel_1/iter1/train"])
    assert (train.task.maxlen_prompt, train.task.maxlen, train.task.temperature, train.batch_size) == (32, 16, 1.0, 32)
    # --true_reward: the same runs trained against the exact answer, in their own folders; shared stages unchanged
    true = compare.stages(arith_args(tmp_path, true_reward=True))
    assert [s.folder for s in true[:10]] == folders[:10]
    grpo = parsed(next(s for s in true if s.folder == f"{out}/seed1-true/grpo_0.05"))
    assert grpo.reward_fn == compare.EXACT
    assert parsed(next(s for s in true if s.folder == f"{out}/seed1-true/data/iter0/score")).reward_fn == compare.EXACT
    for run in ("rebel_1/iter1", "dpo_0.1/iter0"):  # a 0/1 reward gives fewer pairs: a smaller batch
        train = parsed(next(s for s in true if s.folder == f"{out}/seed1-true/{run}/train"))
        assert (train.batch_size, train.local_micro_batch_size) == (compare.TRUE_PAIRS_BATCH,) * 2
    assert train.dpo.beta == 0.1 and train.lr == 3e-4
    with pytest.raises(SystemExit, match="more prompts"):  # the validation split has 256 problems
        compare.stages(arith_args(tmp_path, episodes=1088))


def scored_dataset(path, rewards, texts):
    """score.py's output: one row per prompt, response_{i} and response_{i}_reward columns."""
    columns = {"prompt": [f"What is {i}?" for i in range(len(rewards))]}
    for i in range(len(rewards[0])):
        columns[f"response_{i}"] = [t[i] for t in texts]
        columns[f"response_{i}_reward"] = [r[i] for r in rewards]
    Dataset.from_dict(columns).save_to_disk(path)


def test_label_pairs_flip_rate_and_pairs(tmp_path):
    import random
    rng = random.Random(0)
    texts = [[f"{i} = {j % 3 if i % 7 == 0 else j}" for j in range(4)] for i in range(1500)]  # some identical texts
    right = {t: float(rng.random() < 0.4) for ts in texts for t in ts}  # one true reward per text
    rewards = [[right[t] for t in ts] for ts in texts]
    scored_dataset(str(tmp_path / "train"), rewards, texts)
    scored_dataset(str(tmp_path / "validation"), rewards[:300], texts[:300])
    expected = sum(1 for r, t in zip(rewards, texts) for i in range(4) for j in range(i + 1, 4)
                   if r[i] != r[j] and t[i] != t[j])
    args = label_pairs.Args(train=(str(tmp_path / "train"),), validation=str(tmp_path / "validation"),
                            output_dir=str(tmp_path / "out"), flip_rate=0.2, seed=3)
    label_pairs.main(args)
    read = lambda name: [json.loads(line) for line in open(tmp_path / "out" / name)]  # noqa: E731
    train, validation = read("train.jsonl"), read("validation.jsonl")
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert len(train) == summary["train_pairs"] == expected > 1000
    # the realised rate is a binomial draw around 0.2 (4 standard deviations)
    rate = sum(r["flipped"] for r in train) / len(train)
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / len(train)) ** 0.5 and summary["realised_flip_rate"] == rate
    for row in train:  # a pair's label says which answer is right, unless it was flipped
        chosen, rejected = right[row["chosen"]], right[row["rejected"]]
        assert chosen != rejected and row["chosen"] != row["rejected"]
        assert (chosen < rejected) == row["flipped"]
    assert not any(r["flipped"] for r in validation)  # held-out labels are the truth
    assert all(right[r["chosen"]] > right[r["rejected"]] for r in validation)
    label_pairs.main(label_pairs.Args(**{**vars(args), "output_dir": str(tmp_path / "again")}))
    assert open(tmp_path / "again" / "train.jsonl").read() == open(tmp_path / "out" / "train.jsonl").read()
    with pytest.raises(ValueError, match="--flip_rate 0.5"):
        label_pairs.main(label_pairs.Args(**{**vars(args), "flip_rate": 0.5}))


def test_gold_scoring(tmp_path):
    answers = [{"index": 0, "response": "3 + 4 = 7"}, {"index": 1, "response": "9 - 2 = 8"},
               {"index": 2, "response": ""}]
    args = eval_policy.Args(policies=(), episodes=(), reference="x", reward_model="x", output_dir="x",
                            gold_reward_fn=compare.EXACT)
    gold = eval_policy.ppo.load_reward_fn(args.gold_reward_fn, "--gold_reward_fn")
    mean = eval_policy.gold_scores(gold, answers, ["a", "b", "c"], {"answer": [7, 7, 5]}, args)
    assert mean == pytest.approx(1 / 3) and [a["gold"] for a in answers] == [1.0, 0.0, 0.0]
    # an online run's curve: its samples at each evaluation scored by the exact answer of data/test.jsonl's problem
    out = tmp_path / "cmp"
    (out / "data").mkdir(parents=True)
    (out / "data" / "test.jsonl").write_text("".join(json.dumps({"answer": a}) + "\n" for a in (5, 11)))
    run = out / "seed1" / "grpo_0.05"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"update": 0, "episode": 0, "eval/scores": 0.1, "eval/kl": 0.0}, {"update": 3, "loss": 1.0},
        {"update": 20, "episode": 1280, "eval/scores": 0.9, "eval/kl": 2.0})))
    samples = [(0, 0, "2 + 3 = 5"), (0, 1, "9 + 2 = 12"), (20, 0, "2 + 3 = 5"), (20, 1, "9 + 2 = 11")]
    (run / "eval_samples.jsonl").write_text("".join(json.dumps({"update": u, "index": i, "response": r}) + "\n"
                                                    for u, i, r in samples))
    curve = compare.gold_curve(arith_args(tmp_path), str(run))
    assert curve == [{"episode": 0, "scores": 0.1, "kl": 0.0, "gold": 0.5},
                     {"episode": 1280, "scores": 0.9, "kl": 2.0, "gold": 1.0}]
    assert exact_answer(None, ["x = 11"], [11]) == [1.0]


def test_arith_finished_stages_are_skipped(tmp_path, monkeypatch, capsys):
    args = arith_args(tmp_path, algorithms=("grpo",))
    out = args.output_dir
    plan = compare.stages(args)
    stages = {s.folder: s for s in plan}
    # the problems' validation.jsonl and the comparisons' summary.json are written last: train.jsonl alone is not done
    for folder, last in (("data", "validation.jsonl"), ("comparisons", "summary.json")):
        stage = stages[f"{out}/{folder}"]
        os.makedirs(stage.folder)
        open(os.path.join(stage.folder, "train.jsonl"), "w").close()
        assert not compare.finished(stage)
        open(os.path.join(stage.folder, last), "w").close()
        assert compare.finished(stage)
    data = stages[f"{out}/data"]
    ran = []
    monkeypatch.setattr(compare, "run_stage", lambda stage, overwrite, env: ran.append(stage.folder) or
                        {"wall_s": 1.0, "peak_mib": 1.0})
    monkeypatch.setattr(compare, "write_report", lambda args, costs: [])
    compare.main(args)
    assert f"{out}/data" not in ran and f"{out}/comparisons" not in ran and f"{out}/sft" in ran
    assert f"{out}/comparisons: already finished, skipped" in capsys.readouterr().out
    # the data stage never gets --overwrite or --resume (make_arith.py has neither)
    cmd, _ = compare.stage_command(data, True, {})
    assert "--overwrite" not in cmd and "--resume" not in cmd


def fake_run(args, name, value, seed, final, kl):
    """A finished run's eval/metrics.jsonl: the SFT policy's row, then the final policy's."""
    folder = os.path.join(compare.run_folder(args, name, value, seed), "eval")
    os.makedirs(folder, exist_ok=True)
    sft = {"eval/scores": 0.0, "eval/gold": 0.30 + 0.01 * seed, "eval/gold_greedy": 0.40, "eval/kl": 0.0,
           "eval/scores_greedy": 0.1}
    last = {"eval/scores": final[0], "eval/gold": final[1] + 0.01 * seed, "eval/gold_greedy": final[2], "eval/kl": kl,
            "eval/scores_greedy": 0.2}
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"update": u, "episode": e, **m}) + "\n" for u, e, m in ((0, 0, sft), (1, 1280, last)))
    folder = os.path.join(os.path.dirname(folder), "eval_rl")  # on the problems trained on: +0.1 more
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"update": u, "episode": e, **{k: v + 0.1 * u for k, v in m.items()}}) + "\n"
                     for u, e, m in ((0, 0, sft), (1, 1280, last)))


def test_arith_report_from_fake_runs(tmp_path):
    args = arith_args(tmp_path, algorithms=("rebel",), rebel=(0.3, 1.0, 3.0), seeds=(1, 2), report_only=True)
    for seed in args.seeds:  # the proxy keeps rising with the KL; the truth peaks at eta 1
        fake_run(args, "rebel", 0.3, seed, (0.5, 0.40, 0.50), 1.0)
        fake_run(args, "rebel", 1.0, seed, (1.0, 0.50, 0.60 + 0.02 * seed), 3.0)
        fake_run(args, "rebel", 3.0, seed, (2.0, 0.20, 0.30), 9.0)
    records = compare.write_report(args, {})
    assert len(records) == 6
    report = os.path.join(args.output_dir, "report")
    for name in ("frontier.png", "curves.png", "table.md", "results.json"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    table = open(os.path.join(report, "table.md")).read()
    assert "| SFT policy | | 0.400 ± 0.000 | | 0.315 ± 0.005 | | 0.400 ± 0.000 | | +0.000 ± 0.000 | 0 | | |" in table
    assert ("| REBEL (offline) | eta 1 | 0.630 ± 0.010 | +0.230 ± 0.010 | 0.515 ± 0.005 | +0.200 ± 0.000 | "
            "0.730 ± 0.010 | +0.330 ± 0.010 | +1.000 ± 0.000 | 3.00 ± 0.00 | n/a | n/a |") in table
    assert "- REBEL (offline): best held-out greedy accuracy 0.630 ± 0.010 (eta 1); the proxy starts to mislead " \
           "beyond KL 3.00" in table
    assert json.load(open(os.path.join(report, "results.json")))["flip_rate"] == 0.2
    # the SFT policy is the first point: a first setting that raises the proxy and lowers the truth misleads at KL 0
    settings = compare.arith_groups(records)["rebel"]
    for r in settings[0][1]:
        r["gold"] = r["sft_gold"] - 0.01
    assert compare.misleads_from(settings) == 0.0


def test_make_arith_rl_split_is_disjoint(tmp_path):
    make_arith.main(make_arith.Args(output_dir=str(tmp_path), wording="plain", num_train=350, num_validation=300))
    splits = ("train", "validation", "test")
    rows = {s: [json.loads(line) for line in open(tmp_path / f"{s}.jsonl")] for s in splits}
    triples = {s: {(r["op"], r["a"], r["b"]) for r in rs} for s, rs in rows.items()}
    assert [len(triples[s]) for s in splits] == [350, 300, 200]
    assert not (triples["train"] & triples["validation"] or triples["train"] & triples["test"]
                or triples["validation"] & triples["test"])
    assert all(r["prompt"] == f"What is {r['a']} {'plus' if r['op'] == 'add' else 'minus'} {r['b']}? "
               f"{make_arith.INSTRUCTION}" and exact_answer(None, [r["equation"]], [r["answer"]]) == [1.0]
               for rs in rows.values() for r in rs)
