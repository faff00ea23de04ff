"""score.py --reward_fn: rewards from a Python function (verifiable answers, rules, a remote judge) instead of a
reward model, with the same checks; generate.py --keep_columns carries the columns such a function reads; the
arithmetic reward shipped in data/arith."""

import importlib.util
import json
import math

import datasets
import pytest
import transformers
from conftest import DATA, run, run_in_process

import generate
import score

# loaded by path: `import reward` would find the top-level reward.py (the reward-model trainer) first
_spec = importlib.util.spec_from_file_location("arith_reward", DATA / "arith" / "reward.py")
arith_reward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arith_reward)

FUNCTIONS = '''
import json, math, os

def length_plus_answer(prompts, responses, answer, **columns):
    with open(os.environ["REWARD_FN_LOG"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "responses": responses, "answer": answer,
                            "columns": sorted(columns)}) + "\\n")
    return [len(r) + a for r, a in zip(responses, answer)]

def one_short(prompts, responses, **columns):
    return [0.0] * (len(responses) - 1)

def nan_for_maybe(prompts, responses, **columns):
    return [math.nan if r == "maybe" else 1.0 for r in responses]

def words(prompts, responses, **columns):
    return ["high"] * len(responses)
'''


@pytest.fixture
def scored_input(tmp_path):
    """generate.py's layout with a kept `answer` column: 3 rows x 2 responses."""
    rows = [{"prompt_id": f"p{i}", "prompt": f"question {i}", "prompt_token_ids": [1, 2, i], "answer": 10 * i,
             "response_0": ["yes", "no", "maybe"][i], "response_0_token_ids": [5, i],
             "response_1": ["sure", "nope", "ok"][i], "response_1_token_ids": [6, i]} for i in range(3)]
    path = tmp_path / "generated"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reward model was loaded although --reward_fn was given")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def fn_args(tmp_path, name, dataset):
    return ["--reward_fn", f"{tmp_path / 'fns.py'}:{name}", "--dataset", dataset, "--shard_size", "2"]


def test_score_takes_rewards_from_a_function_with_the_data_columns(tmp_path, scored_input, monkeypatch,
                                                                   no_model_loading):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_FN_LOG", str(log))
    run_in_process(score, fn_args(tmp_path, "length_plus_answer", scored_input), tmp_path / "out")
    data = datasets.load_from_disk(str(tmp_path / "out"))
    assert data["response_0_reward"] == [3.0, 12.0, 25.0] and data["response_1_reward"] == [4.0, 14.0, 22.0]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2  # once per shard (2 rows, then 1), on every response of its rows, flattened row by row
    assert calls[0]["responses"] == ["yes", "sure", "no", "nope"] and calls[0]["answer"] == [0, 0, 10, 10]
    assert calls[0]["prompts"] == ["question 0", "question 0", "question 1", "question 1"]
    assert calls[0]["columns"] == ["prompt_id", "prompt_token_ids"]  # the other columns; no response columns
    assert json.load(open(tmp_path / "out" / "args.json"))["reward_fn"].endswith("fns.py:length_plus_answer")


@pytest.mark.parametrize("spec, match", [
    ("{tmp}/missing.py:f", r"--reward_fn .*missing.py:f: no such file .*missing.py"),
    ("{tmp}/fns.py:absent", r"--reward_fn .*fns.py:absent: .*fns.py has no function 'absent'; it defines \[.*'words'"),
    ("{tmp}/fns.py", r"--reward_fn .*fns.py: expected path/to/file.py:function"),
    ("{tmp}/fns.py:one_short", r"--reward_fn .*one_short: returned 3 rewards for 4 responses"),
    ("{tmp}/fns.py:words", r"--reward_fn .*words: must return a list of numbers, one per response"),
    ("{tmp}/fns.py:nan_for_maybe", r"non-finite reward nan for row 2 \(prompt_id p2\) response_0 'maybe'"),
])
def test_a_bad_reward_function_is_a_clear_error_naming_it(tmp_path, scored_input, no_model_loading, spec, match):
    args = ["--reward_fn", spec.format(tmp=tmp_path), "--dataset", scored_input, "--shard_size", "2"]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_in_process(score, args, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_arithmetic_reward_reads_the_last_integer():
    responses = ["8", "The answer is 8.", "20 - 12 = 8", "20 minus 12 equals 12.", "no idea", "-8", "18", "8 apples"]
    assert arith_reward.exact_answer(["q"] * 8, responses, [8] * 8, op=["sub"] * 8) == [1, 1, 1, 0, 0, 0, 0, 1]
    assert math.isfinite(sum(arith_reward.exact_answer(["q"], ["x"], [3])))


def test_generate_keeps_columns_for_a_reward_function(session_dir, chat_policy, tmp_path):
    """The chain a verifiable reward needs: the answer travels from the prompt data through generate.py (a subprocess,
    as a user runs it) to score.py's function."""
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"write about film {i}", "answer": i,
                                           "note": "unused"}) + "\n" for i in range(3)))
    gen, scored = tmp_path / "gen", tmp_path / "score"
    run("generate.py", "--model_name_or_path", chat_policy, "--dataset", prompts, "--split", "train",
        "--keep_columns", "answer", "--num_responses", "2", "--maxlen", "8", "--backend", "hf", "--output_dir", gen)
    data = datasets.load_from_disk(str(gen))
    assert data["answer"] == [0, 1, 2] and "note" not in data.column_names
    fn = tmp_path / "rule.py"
    fn.write_text("def rule(prompts, responses, answer, **columns):\n"
                  "    return [a + len(r) / 100 for r, a in zip(responses, answer)]\n")
    run_in_process(score, ["--reward_fn", f"{fn}:rule", "--dataset", gen], scored)  # in-process: saves a start-up
    out = datasets.load_from_disk(str(scored))
    assert out["response_1_reward"] == [pytest.approx(a + len(r) / 100) for a, r in zip([0, 1, 2], out["response_1"])]
    base = ["--model_name_or_path", chat_policy, "--dataset", prompts, "--split", "train", "--backend", "hf"]
    with pytest.raises(ValueError, match=r"--keep_columns \['prompt'\]: the output has columns of these names"):
        run_in_process(generate, [*base, "--keep_columns", "prompt"], tmp_path / "clash")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\]"):
        run_in_process(generate, [*base, "--keep_columns", "solution"], tmp_path / "missing")
    assert not (tmp_path / "clash").exists() and not (tmp_path / "missing").exists()


def test_reward_function_helpers_are_identical_in_score_and_ppo():
    import ast
    import inspect

    import ppo

    for name in ("load_reward_fn", "call_reward_fn"):
        assert ast.dump(ast.parse(inspect.getsource(getattr(score, name)))) == ast.dump(
            ast.parse(inspect.getsource(getattr(ppo, name)))), f"{name} differs between score.py and ppo.py"
