"""tools/judge.py: the order swap and the counting (scripted judges), the standard error against a slow reference, the
answer parser, the join and its bad inputs, the HTTP backend against a stand-in server on 127.0.0.1 (request shape,
key, retries, errors), and the transformers backend end to end on a tiny random chat model. Seconds each."""

import json
import os
import random
import re
import socket
import sys
import threading
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import tyro
from conftest import ROOT, TINY_LLAMA, run, save_tiny

sys.path.insert(0, os.path.join(ROOT, "tools"))
import judge  # noqa: E402

KEY = "sk-test-0123456789-secret"
TOPICS = ["my dog ate my homework", "my landlord kept my deposit", "I got lost hiking in fog",
          "my roommate never cleans the kitchen", "I failed my driving test twice", "my cat learned to open doors"]


def post(i):
    return f"SUBREDDIT: r/tifu\nTITLE: {TOPICS[i % len(TOPICS)]}\nPOST: It happened last week, item {i}.\nTL;DR:"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    """A: generate.py-shaped answers (prompt_id, prompt, response_0) to prompts 0..5, some longer than the reference;
    B: a TL;DR-shaped reference split (id, prompt, completion) with two more prompts than A."""
    a = [{"prompt_id": f"p{i}", "prompt": post(i), "response_0": "short" if i % 3 == 0 else f"a much longer answer {i}"}
         for i in range(6)]
    b = [{"id": f"p{i}", "prompt": post(i), "completion": f" reference summary {i}"} for i in (7, 6, 5, 4, 3, 2, 1, 0)]
    return write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)


def cli(*argv):
    return tyro.cli(judge.Args, use_underscores=True, args=[str(a) for a in argv])


def shown(question):
    """The (first, second) responses a tldr, chat or sentiment question shows."""
    names = "(?:Summary|Reply|Continuation)"
    m = re.search(rf"{names} A:\n(.*)\n\n{names} B:\n(.*)\n\nFIRST", question, re.S)
    return m.group(1), m.group(2)


def prefers_longer(question):
    first, second = shown(question)
    return "Comparison: one is longer.\nPreferred: " + ("A" if len(first) >= len(second) else "B")


def recording_longer(seen):
    """A judge that prefers the longer response and records every question it was asked in `seen`."""
    def complete(questions):
        seen.extend(questions)
        return [prefers_longer(q) for q in questions]
    return complete


def always_first(questions):
    return ["Comparison: the first one.\nPreferred: A"] * len(questions)


def scripted(answers):
    def complete(questions):
        assert len(questions) == len(answers)
        return list(answers)
    return complete


def pairs(n):
    return [{"id": str(i), "prompt": post(i), "a": "x" * (i + 1), "b": "y" * 3} for i in range(n)]


def test_a_judge_that_always_picks_the_first_position_gives_exactly_one_half():
    records = judge.judge_pairs(pairs(5), "tldr", always_first)
    summary = judge.summarize(records)
    assert summary["win_rate"] == 0.5 and summary["stderr"] == 0.0 and summary["n"] == 5
    assert summary["position_consistent"] == 0 and summary["first_position_rate"] == 1.0
    assert [(r["a_first_winner"], r["b_first_winner"]) for r in records] == [("a", "b")] * 5


def test_a_judge_that_prefers_the_longer_response_gives_the_share_of_longer_a():
    records = judge.judge_pairs(pairs(6), "tldr", lambda qs: [prefers_longer(q) for q in qs])
    summary = judge.summarize(records)
    # a is longer than b ("yyy") for i >= 3 (lengths 4, 5, 6); i = 2 is a tie of lengths, which the judge gives to the
    # first position: 0.5; i = 0, 1: b wins both orders
    assert [r["outcome"] for r in records] == [0, 0, 0.5, 1, 1, 1]
    assert summary["win_rate"] == pytest.approx(3.5 / 6)
    assert summary["a_wins_both_orders"] == 3 and summary["b_wins_both_orders"] == 2
    assert summary["position_consistent"] == 5 and summary["outcomes"] == {"1": 3, "0.75": 0, "0.5": 1, "0.25": 0,
                                                                           "0": 2}


def test_ties_and_unparseable_answers_are_counted_and_enter_as_documented():
    answers = ["Preferred: A", "Preferred: A",         # each order names its first: 0.5
               "Comparison: alike.\nPreferred: tie", "Preferred: B",  # tie (0.5) and A (1): 0.75
               "Preferred: the second", "Preferred: A",                # unparseable: the prompt is left out
               "Preferred: B", "Preferred: A",                         # B in both orders: 0
               "", "**Preferred:** A"]                                 # no text: unparseable
    records = judge.judge_pairs(pairs(5), "tldr", scripted(answers))
    summary = judge.summarize(records)
    assert [r["outcome"] for r in records] == [0.5, 0.75, None, 0.0, None]
    assert summary["win_rate"] == pytest.approx(1.25 / 3) and summary["n"] == 3 and summary["prompts"] == 5
    assert (summary["ties"], summary["unparseable"], summary["excluded_prompts"]) == (1, 2, 2)
    assert summary["position_consistent"] == 1 and summary["b_wins_both_orders"] == 1
    assert summary["first_position_rate"] == pytest.approx(5 / 7)  # named answers of scored and excluded prompts


@pytest.mark.parametrize("text,verdict", [
    ("Comparison: A is terse.\nPreferred: A", "A"), ("Comparison: x\nPreferred: B\n\n", "B"),
    ("**Preferred:** **B**", "B"), ('Preferred: "A"', "A"), ("More helpful: b", "B"), ("more positive: A.", "A"),
    ("Comparison: both fine.\nPreferred: tie", "tie"), ("Preferred: equal", "tie"),
    ("**B**", None), ("Summary B.", None), ("The better one is Reply A", None), ("Comparison: A shorter one", None),
    ('Preferred: <"A" or "B">', None), ("A is better than B", None), ("Preferred: neither", None), ("", None),
    ("Preferred: A\nComparison: it goes on", None), ("a lot of words", None), ("Comparison: x\nTie", None),
    ("Preferred: A is better", None), ("A:\nB:\nA:", None),  # a looping answer names nothing
    (f"Comparison: x\nPreferred: A\n{judge.CUT_OFF}", None)])  # cut off at --max_new_tokens: not read
def test_the_last_line_is_parsed(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_the_standard_error_matches_a_slow_exact_reference():
    rng = random.Random(0)
    choices = ["A", "B", "tie", None]
    answers = [f"More helpful: {c}" if c else "???" for c in (rng.choice(choices + ["A", "B"]) for _ in range(400))]
    records = judge.judge_pairs(pairs(200), "chat", scripted(answers))
    summary = judge.summarize(records)
    # reference: exact fractions, each order's score read off the answers independently of judge.winner
    outcomes = []
    for r in records:
        firsts = [judge.parse_verdict(r["a_first_answer"]), judge.parse_verdict(r["b_first_answer"])]
        if None in firsts:
            continue
        a_score = {"A": Fraction(1), "B": Fraction(0), "tie": Fraction(1, 2)}[firsts[0]]
        b_first = {"A": Fraction(0), "B": Fraction(1), "tie": Fraction(1, 2)}[firsts[1]]  # "A" there is B's response
        outcomes.append((a_score + b_first) / 2)
    n = len(outcomes)
    mean = sum(outcomes) / n
    variance = sum((x - mean) ** 2 for x in outcomes) / (n - 1)
    assert summary["n"] == n and 50 < n < 200
    assert summary["win_rate"] == pytest.approx(float(mean), abs=1e-12)
    assert summary["stderr"] == pytest.approx(float(variance / n) ** 0.5, rel=1e-12)
    assert judge.summarize(records[:1])["stderr"] is None


def test_files_are_joined_by_prompt_id_and_judged_with_outputs_written(files, tmp_path, capsys):
    a, b = files
    out = tmp_path / "out"
    seen = []
    complete = recording_longer(seen)
    summary = judge.main(cli("--a", a, "--b", b, "--judge_model", "scripted", "--limit", 5, "--output_dir", out),
                         complete)
    # prompts p0..p4 in A's order; A ("short" or "a much longer answer i") against " reference summary i"
    assert summary["win_rate"] == pytest.approx(3 / 5) and summary["n"] == 5
    assert (summary["a_prompts"], summary["b_prompts"], summary["b_not_in_a"]) == (6, 8, 2)
    assert len(seen) == 10 and shown(seen[2]) == ("a much longer answer 1", "reference summary 1")
    assert shown(seen[3]) == ("reference summary 1", "a much longer answer 1")
    assert "POST: It happened last week, item 1." in seen[2] and "TL;DR:" not in seen[2]
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert rows[1]["a_first_answer"].endswith("Preferred: A") and rows[1]["b_first_choice"] == "B"
    assert json.loads((out / "summary.json").read_text())["win_rate"] == summary["win_rate"]
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]
    assert "win rate of A over B: 0.600 ±" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a finished judgment"):
        judge.main(cli("--a", a, "--b", b, "--judge_model", "scripted", "--output_dir", out), complete)


@pytest.mark.parametrize("case,match", [
    ("column", r"--b .*b.jsonl \(split train\): missing column\(s\) \['summary'\]"),
    ("ids", r"2 of the 6 prompt ids of --a .*a.jsonl.* are not in --b .*b.jsonl.*\['p4', 'p5'\]"),
    ("repeated", r"--a .*a.jsonl.*: column prompt_id repeats prompt ids, e.g. \['p1'\]"),
    ("prompts", r"prompt id p2: column prompt differs between --a .*a.jsonl"),
])
def test_bad_input_is_refused_before_any_model_loads(files, tmp_path, case, match, no_model_loading):
    a, b = files
    rows_a = [json.loads(line) for line in a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in b.read_text().splitlines()]
    extra = []
    if case == "column":
        extra = ["--b_column", "summary"]
    elif case == "ids":
        write_jsonl(b, [r for r in rows_b if r["id"] not in ("p4", "p5")])
    elif case == "repeated":
        write_jsonl(a, rows_a + [rows_a[1]])
    else:
        rows_b[5]["prompt"] = post(9)
        write_jsonl(b, rows_b)
    with pytest.raises(ValueError, match=match):
        judge.main(cli("--a", a, "--b", b, "--judge_model", TINY_LLAMA, "--backend", "hf", "--output_dir",
                       tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def eval_samples(path):
    """ppo.py-shaped eval_samples.jsonl: updates 0 (the SFT policy), 1 and 2 of four held-out prompts; at update 2
    prompts 1 and 3 got a longer answer than at update 0, prompt 2 one of the same length."""
    final = {0: "ok", 1: "a lovely film", 2: "no", 3: "warm and bright"}
    rows = [{"update": u, "episode": 64 * u, "index": i, "prompt": f"review {i} opens", "score": 0.0, "judge": 0.0,
             "response": {0: "no", 1: "meh", 2: final[i]}[u] if u < 2 else final[i]}
            for u in (0, 1, 2) for i in range(4)]
    return write_jsonl(path, rows)


EVAL_SAMPLES = ("--a_column", "response", "--b_column", "response", "--a_id_column", "index", "--b_id_column", "index",
                "--template", "sentiment")


def test_two_evaluations_of_one_eval_samples_file_are_judged_against_each_other(tmp_path):
    samples = eval_samples(tmp_path / "eval_samples.jsonl")
    seen = []
    complete = recording_longer(seen)
    summary = judge.main(cli("--a", samples, "--a_where", "update=2", "--b", samples, "--b_where", "update = 0",
                             *EVAL_SAMPLES, "--judge_model", "scripted", "--output_dir", tmp_path / "out"), complete)
    # update 2 against update 0: prompt 0 ("ok" vs "no": same length, each order's first wins: 0.5), 1 and 3 longer
    # (1), 2 the same answer ("no" vs "no": 0.5)
    assert [json.loads(line)["outcome"] for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()] \
        == [0.5, 1, 0.5, 1]
    assert summary["win_rate"] == pytest.approx(0.75) and (summary["a_prompts"], summary["b_prompts"]) == (4, 4)
    assert shown(seen[2]) == ("a lovely film", "no") and shown(seen[3]) == ("no", "a lovely film")
    assert "Opening words:\nreview 1 opens\n" in seen[2] and "More positive:" in seen[2]
    assert summary["args"]["a_where"] == "update=2"


@pytest.mark.parametrize("where,match", [
    (("--a_where", "update"), r"--a_where 'update': expected COLUMN=VALUE"),
    (("--a_where", "update=7"), r"--a .*eval_samples.jsonl \(split train\): no row has update = '7' \(--a_where\); "
                                r"its values include \['0', '1', '2'\]"),
    (("--a_where", "update=2", "--b_where", "step=0"),
     r"--b .*eval_samples.jsonl \(split train\): missing column\(s\) \['step'\]"),
])
def test_a_bad_row_filter_is_refused_before_any_model_loads(tmp_path, where, match, no_model_loading):
    samples = eval_samples(tmp_path / "eval_samples.jsonl")
    with pytest.raises(ValueError, match=match):
        judge.main(cli("--a", samples, "--b", samples, *EVAL_SAMPLES, *where, "--judge_model", TINY_LLAMA, "--backend",
                       "hf", "--output_dir", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


class StandIn:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 that checks each request's shape and key, answers
    with `answer(content)`, and can fail its first requests with given HTTP statuses."""

    def __init__(self, answer, fail=(), body=""):
        self.requests, self.errors, self.fail = [], [], list(fail)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append((self.path, dict(self.headers), data))
                problems = [p for p, ok in (
                    ("path", self.path == "/v1/chat/completions"),
                    ("key", self.headers.get("Authorization") == f"Bearer {KEY}"),
                    ("content type", self.headers.get("Content-Type") == "application/json"),
                    ("fields", set(data) == {"model", "messages", "temperature", "max_tokens"}),
                    ("model", data.get("model") == "judge-x"), ("temperature", data.get("temperature") == 0),
                    ("messages", [m["role"] for m in data.get("messages", [])] == ["user"]),
                    ("max_tokens", isinstance(data.get("max_tokens"), int))) if not ok]
                if problems or stand_in.fail:
                    stand_in.errors += problems
                    self.send_response(400 if problems else stand_in.fail.pop(0))
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"bad request {problems} {body}"}}).encode())
                    return
                content = data["messages"][0]["content"]
                text, finish = (lambda r: r if isinstance(r, tuple) else (r, "stop"))(answer(content))
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish}]}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(reply).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    servers = []

    def start(answer=lambda content: prefers_longer(content) if "FIRST" in content else "A", **kwargs):
        servers.append(StandIn(answer, **kwargs))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_http_judge_run_as_a_user_runs_it(files, tmp_path, stand_in):
    a, b = files
    server, out = stand_in(), tmp_path / "out"
    proc = run("tools/judge.py", "--a", a, "--b", b, "--judge_model", "judge-x", "--judge_url", server.url,
               "--judge_api_key_env", "JUDGE_TEST_KEY", "--template", "chat", "--output_dir", out,
               env={"JUDGE_TEST_KEY": KEY})
    assert not server.errors
    assert len(server.requests) == 1 + 12  # the probe, then both orders of 6 prompts
    assert server.requests[0][2]["max_tokens"] == 8 and server.requests[1][2]["max_tokens"] == 128
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "http" and summary["win_rate"] == pytest.approx(4 / 6) and summary["n"] == 6
    assert "backend: http (--judge_url given)" in proc.stdout and "win rate of A over B: 0.667" in proc.stdout
    for text in [proc.stdout, proc.stderr, *(p.read_text() for p in out.iterdir())]:
        assert KEY not in text


def test_http_judge_retries_server_errors_and_stops_at_once_on_a_refused_key(files, tmp_path, stand_in, monkeypatch,
                                                                              capsys):
    a, b = files
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = stand_in(fail=[503, 500])
    args = ["--a", a, "--b", b, "--judge_model", "judge-x", "--judge_url", server.url + "/v1", "--backoff", "0.01",
            "--retries", "2", "--limit", 2, "--num_workers", 1]
    summary = judge.main(cli(*args, "--output_dir", tmp_path / "ok"))
    assert summary["n"] == 2 and len(server.requests) == 2 + 1 + 4  # two failures, the probe, 4 answers
    server = stand_in(fail=[401], body=f"Incorrect API key provided: {KEY}")
    with pytest.raises(SystemExit) as refused:
        judge.main(cli(*args[:7], server.url, *args[8:], "--output_dir", tmp_path / "no"))
    message = str(refused.value)
    assert f"--judge_url {server.url}/v1/chat/completions: HTTP 401" in message and KEY not in message
    assert "***" in message and len(server.requests) == 1 and not (tmp_path / "no").exists()
    assert KEY not in capsys.readouterr().out


def test_answers_cut_off_at_max_new_tokens_are_not_read(files, tmp_path, stand_in, monkeypatch):
    """An endpoint that stopped at max_tokens (finish_reason "length") may end on a half-written or looping line that
    happens to name a letter: such an answer is marked and counted unparseable, however it ends."""
    a, b = files
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = stand_in(answer=lambda content: ("Comparison: A is\nPreferred: A", "length" if "FIRST" in content
                                              else "stop"))
    summary = judge.main(cli("--a", a, "--b", b, "--judge_model", "judge-x", "--judge_url", server.url, "--limit", 2,
                             "--output_dir", tmp_path / "out"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert all(r[f"{o}_answer"].endswith(judge.CUT_OFF) for r in rows for o in ("a_first", "b_first"))
    assert summary["unparseable"] == 4 and summary["n"] == 0 and summary["win_rate"] is None


def test_an_unreachable_endpoint_is_a_clear_error_before_any_judging(files, tmp_path):
    a, b = files
    with socket.socket() as s:  # a port that was free a moment ago, now closed: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SystemExit, match=rf"--judge_url {url}/v1/chat/completions: no answer after 2 tries"):
        judge.main(cli("--a", a, "--b", b, "--judge_model", "x", "--judge_url", url, "--retries", 1, "--backoff",
                       "0.01", "--timeout", 2, "--output_dir", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_vllm_asked_for_but_missing_is_an_error(files, tmp_path):
    pytest.importorskip("torch")
    if judge.generate.importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    a, b = files
    with pytest.raises(SystemExit, match="--backend vllm: vLLM is not installed"):
        judge.main(cli("--a", a, "--b", b, "--judge_model", TINY_LLAMA, "--backend", "vllm", "--output_dir",
                       tmp_path / "out"))


def test_transformers_judge_end_to_end_on_a_tiny_random_chat_model(files, tmp_path):
    """The tiny model answers noise: every answer is read by the parser and counted; none is taken as a verdict that
    the parser would not give."""
    from transformers import AutoConfig, AutoModelForCausalLM

    a, b = files
    config = AutoConfig.from_pretrained(TINY_LLAMA, max_position_embeddings=1024)  # a question is ~360 tokens here
    model = save_tiny(tmp_path / "tiny_judge", config, AutoModelForCausalLM)
    out = tmp_path / "out"
    summary = judge.main(cli("--a", a, "--b", b, "--judge_model", model, "--backend", "hf", "--limit", 3,
                             "--max_new_tokens", 12, "--batch_size", 4, "--output_dir", out))
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    answers = [r[f"{o}_answer"] for r in rows for o in ("a_first", "b_first")]
    assert len(answers) == 6 and all(isinstance(t, str) for t in answers) and any(t.strip() for t in answers)
    unparseable = sum(judge.parse_verdict(t) is None for t in answers)
    cut = [t for t in answers if t.endswith(judge.CUT_OFF)]  # 12 random tokens of 1,024 rarely hit a stop token
    assert cut and all(judge.parse_verdict(t) is None for t in cut)
    assert summary["unparseable"] == unparseable and summary["answers"] == 6 and summary["backend"] == "hf"
    assert summary["excluded_prompts"] == sum(r["outcome"] is None for r in rows) >= 1
    # the context check: a question and its answer longer than the model's 1024 positions are refused before judging
    with pytest.raises(SystemExit, match="exceeds the model's context of 1024"):
        judge.main(cli("--a", a, "--b", b, "--judge_model", model, "--backend", "hf", "--max_new_tokens", 700,
                       "--output_dir", tmp_path / "long"))
