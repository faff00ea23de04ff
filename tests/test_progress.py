"""Progress on long work: update (or shard) k of N, the rate and the time left on rank 0 (a tqdm bar on a terminal,
plain lines in a log file, nothing with --no_progress), and the elapsed time in metrics.jsonl, resumed runs
continuing the count. The Progress and Logger classes are identical copies in every script
(tests/test_shared_helpers.py), so one script's copy stands for all."""

import dataclasses
import importlib
import io
import json
import re
from types import SimpleNamespace

import pytest
from conftest import ROOT

import sft_sst2

LONG_RUNNING = ("sft_sst2.py", "reward_sst2.py", "sft.py", "reward.py", "ppo.py", "rebel.py", "dpo.py",
                "rebel_online.py", "rloo.py", "grpo.py", "generate.py", "score.py")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_periodic_lines_with_k_of_n_rate_and_time_left():
    stream = io.StringIO()
    progress = sft_sst2.Progress(4, 0, "update", True, stream=stream)
    progress.every = 0.0  # a line at every update (the default is one a minute)
    for k in range(1, 5):
        progress.update(k)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    for k, line in enumerate(lines, 1):
        assert re.fullmatch(rf"progress: update {k}/4 \(\d+%\), \S+ (updates/s|s/update), elapsed \d+:\d\d:\d\d, "
                            r"left (\d+:\d\d:\d\d|\?)", line), line
    assert lines[-1].startswith("progress: update 4/4 (100%)") and lines[-1].endswith("left 0:00:00")


def test_log_file_lines_are_rate_limited_but_the_end_is_always_shown():
    stream = io.StringIO()
    progress = sft_sst2.Progress(50, 10, "shard", True, stream=stream)  # resumed: 10 of 50 done before
    for k in range(11, 51):
        progress.update(k)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]
    assert stream.getvalue().startswith("progress: shard 50/50 (100%)")


def test_terminal_gets_a_bar_and_logged_lines_above_it(capsys):
    stream = Terminal()
    progress = sft_sst2.Progress(3, 1, "update", True, stream=stream)
    progress.update(2)
    progress.write("update 2: loss 1")
    progress.update(3)
    progress.close()
    assert "3/3" in stream.getvalue() and "update" in stream.getvalue()
    assert "update 2: loss 1" in capsys.readouterr().out


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()])
def test_off_prints_nothing(stream, capsys):
    progress = sft_sst2.Progress(3, 0, "update", False, stream=stream)
    progress.every = 0.0
    for k in range(1, 4):
        progress.update(k)
    progress.write("update 3: loss 1")  # the script's own lines still print
    progress.close()
    assert stream.getvalue() == "" and capsys.readouterr().out == "update 3: loss 1\n"


def test_metrics_gain_elapsed_time_and_a_resumed_run_continues_it(tmp_path, capsys):
    args = SimpleNamespace(output_dir=str(tmp_path), num_updates=3, progress=True, track=False)
    logger = sft_sst2.Logger(args, 0, "run", None)
    for update in range(3):
        logger.log({"loss": 1.0}, update)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [0, 1, 2] and all("elapsed" in r for r in rows)
    assert 0 <= rows[0]["elapsed"] <= rows[1]["elapsed"] <= rows[2]["elapsed"]
    assert "progress: update" not in capsys.readouterr().out  # progress goes to stderr, metrics lines to stdout
    # resumed from update 1's checkpoint: update 2's line is dropped and the count goes on from update 1's
    resumed = sft_sst2.Logger(args, 0, "run", 1)
    resumed.log({"loss": 1.0}, 2)
    resumed.close()
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in again] == [0, 1, 2] and again[2]["elapsed"] >= rows[1]["elapsed"]
    assert "progress: update 2/3 (67%)" not in capsys.readouterr().err  # rate-limited: not the last update
    other = sft_sst2.Logger(SimpleNamespace(**{**vars(args), "progress": False}), 1, "run", None)  # rank 1
    other.log({"loss": 1.0}, 3)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("path", LONG_RUNNING)
def test_every_long_running_script_has_the_switch(path):
    module = importlib.import_module(path[:-3])
    field = {f.name: f for f in dataclasses.fields(module.Args)}["progress"]
    assert field.default is True
    assert "Progress(" in (ROOT / path).read_text()
