"""The real-model path: data/make_smollm2.py's SmolLM2-135M-Instruct loads like a hub model, and a shortened
tools/real_model_example.py (one REBEL iteration on a few arithmetic problems) runs end to end and reports.

Minutes of CPU, so opt-in: skipped unless RUN_REAL_MODEL=1 (CI's optional real-model stage sets it after making the
model with `pip install -r requirements-smollm2.txt && python data/make_smollm2.py`); the main suite stays fast."""

import json
import os

import pytest
from conftest import DATA, run

MODEL = DATA / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(os.environ.get("RUN_REAL_MODEL") != "1", reason="set RUN_REAL_MODEL=1 to run")


@pytest.fixture(autouse=True)
def converted_model():
    assert (MODEL / "model.safetensors").exists(), "no data/smollm2-135m-instruct: run python data/make_smollm2.py"


def test_converted_model_loads_like_the_hub_model_and_stops_on_im_end():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and GenerationConfig.from_pretrained(MODEL).eos_token_id == [end]
    source = json.loads((MODEL / "SOURCE.json").read_text())
    assert source["stand_in_for"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(source["wheel_sha256"]) == 64
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 1] != tokenizer.bos_token_id  # <|im_start|>, once
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert out[0, -1].item() == end  # it finished its turn
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_shortened_real_model_example_runs_and_reports(tmp_path):
    out = tmp_path / "real"
    run("tools/real_model_example.py", "--output_dir", out, "--iterations", "1", "--prompts_per_iteration", "24",
        "--num_responses", "4", "--eval_size", "12", "--kl_samples", "8", "--batch_size", "2", "--num_train_epochs",
        "1", "--maxlen", "24")
    report = (out / "report" / "report.md").read_text()
    assert (out / "report" / "report.png").stat().st_size > 10_000
    assert "after iteration 1" in report and "| problem | answer | before | after |" in report
    kls = json.loads((out / "report" / "kl.json").read_text())
    assert kls[0] == 0.0 and kls[1] > -0.5  # an estimate of a KL: near zero or positive
    stats = json.loads((out / "iter0" / "filter" / "filter_stats.json").read_text())
    assert stats["train"] >= 2
    timings = json.loads((out / "timings.json").read_text())
    assert {"eval0/generate", "iter0/generate", "iter0/train", "eval1/score"} <= set(timings)


# TL;DR-shaped pairs where the first summary is plainly right and the second is about something else entirely
JUDGE_POSTS = [
    ("relationships", "My girlfriend wants to move to another city for her job",
     "My girlfriend (25F) got a job offer in Seattle. I (26M) have a stable job here in Austin and my family lives "
     "nearby. She wants me to come with her, but I am not sure I want to leave everything behind.",
     "Girlfriend got a job in another city and wants me to move with her; I don't want to leave my job and family.",
     "I bought a new bike and it already has a flat tire."),
    ("dogs", "My dog barks all night since we moved",
     "We moved to an apartment two weeks ago and since then our dog barks from midnight to 3am. The neighbours have "
     "complained twice. He never did this in our old house.",
     "Since we moved, my dog barks every night and the neighbours complain; how do I make him stop?",
     "My sister is getting married next month and I have to give a speech."),
    ("personalfinance", "Lent my friend $500 and he won't pay me back",
     "Six months ago I lent my best friend $500 for rent. He promised to pay it back in a month. Now he ignores my "
     "messages about it but posts photos from concerts.",
     "Friend borrowed $500 six months ago, won't repay it and ignores me while spending on concerts.",
     "I like cooking pasta on the weekends with fresh tomatoes."),
    ("jobs", "My boss presents my work as his own",
     "For the third time this quarter my manager presented a report I wrote to the directors without mentioning "
     "me. I found out from a colleague. I am up for promotion next month.",
     "My manager keeps presenting my reports as his own work, and my promotion is coming up.",
     "The weather in my town has been rainy all week."),
]


def test_smollm2_judges_tldr_pairs_with_one_plainly_right_summary(tmp_path):
    """SmolLM2-135M-Instruct as the judge of tools/judge.py (transformers, greedy) on the pairs above, A the right
    summary, B the unrelated one: it runs end to end, every answer is read and counted."""
    rows_a = [{"prompt_id": f"t{i}", "prompt": f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {body}\nTL;DR:",
               "response_0": good} for i, (sub, title, body, good, _) in enumerate(JUDGE_POSTS)]
    rows_b = [{"id": f"t{i}", "completion": " " + bad} for i, (*_, bad) in enumerate(JUDGE_POSTS)]
    for name, rows in (("a.jsonl", rows_a), ("b.jsonl", rows_b)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge"
    proc = run("tools/judge.py", "--a", tmp_path / "a.jsonl", "--b", tmp_path / "b.jsonl", "--judge_model", MODEL,
               "--backend", "hf", "--max_new_tokens", "64", "--output_dir", out)
    print(proc.stdout[-1500:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == len(JUDGE_POSTS) and summary["answers"] == 2 * len(JUDGE_POSTS)
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    verdicts = [r[f"{o}_answer"] for r in rows for o in ("a_first", "b_first") if r[f"{o}_choice"] is not None]
    assert len(verdicts) == summary["answers"] - summary["unparseable"]
    for text in verdicts:  # a verdict only from an answer that ended, on the template's label line
        last = text.strip().splitlines()[-1].replace("*", "").strip().lower()
        assert last.startswith("preferred") and not text.endswith("[cut off at --max_new_tokens: not read]"), text
