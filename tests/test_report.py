"""tools/report.py on fake runs, in seconds: the before/after table shows an empty answer as "(empty response)", so a
reader can tell it from a display fault, and keeps the text of the others."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import report  # noqa: E402


def fake_run(folder, answers):
    folder.mkdir()
    rows = [{"update": u, "episode": 64 * u, "eval/scores": 0.1 * u, "eval/judge": 0.2, "eval/kl": 0.5 * u}
            for u in (0, 10)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [{"update": u, "prompt": f"prompt {i}", "response": answer if u else " before", "score": -2.33,
                "judge": 0.0, "kl": 0.0} for u in (0, 10) for i, answer in enumerate(answers)]
    (folder / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return str(folder)


def test_empty_answers_are_shown_as_such(tmp_path):
    run = fake_run(tmp_path / "ppo", ["", "  ", "a rare study ."])
    report.main(report.Args(runs=(run,), output_dir=str(tmp_path / "report")))
    table = (tmp_path / "report" / "report.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| prompt ") and not line.startswith("| prompt |")]
    assert rows[0] == "| prompt 0 | before (-2.33 / +0.00) | *(empty response)* (-2.33 / +0.00) |"
    assert rows[1].endswith("| *(empty response)* (-2.33 / +0.00) |")
    assert rows[2].endswith("| a rare study . (-2.33 / +0.00) |")
    assert any("*(empty response)*: the policy ended its answer at once" in line for line in table)
