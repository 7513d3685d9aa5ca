"""qllava review end to end: the real openai client over HTTP against a local OpenAI-compatible judge on 127.0.0.1
that replays the published Quilt-LLaVA reviews and injects 429s, 500s, timeouts, unparseable and key-echoing replies."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from qllava.core import ConfigError
from qllava.evaluation.review import (LocalJudge, replay_judge, review, review_cli, load_reviews, make_client, JudgeSpec,
                                      ReviewInputs)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QLLAVA_SHARED", REPO.parents[0] / "shared"))
QG = SHARED / "data" / "quilt_gpt"
SECRET = "sk-" + "test-7f3c9e1d-DO-NOT-LEAK-4b2a"  # split so no key-shaped literal sits in the repo

needs_shared = pytest.mark.skipif(not (QG / "reviews" / "Qreview-gpt4.jsonl").exists(),
                                  reason=f"shared Quilt-LLaVA review tables not found under {QG} (set QLLAVA_SHARED)")


def jl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def quilt_inputs():
    return ReviewInputs(question_file=QG / "questions.jsonl", context_file=QG / "captions.jsonl",
                        answer1_file=QG / "answers-gpt4-reference.jsonl", answer2_file=QG / "answers" / "quilt-llava-v1.5-7b-gpteval.jsonl")


def quilt_replay():
    return replay_judge(QG / "questions.jsonl", QG / "answers" / "quilt-llava-v1.5-7b-gpteval.jsonl", QG / "reviews" / "Qreview-gpt4.jsonl")


def cli_args(out, url, *extra):
    i = quilt_inputs()
    return ["-q", str(i.question_file), "-c", str(i.context_file), "-a", str(i.answer1_file), str(i.answer2_file),
            "-o", str(out), "-m", "gpt-4", "--base-url", url, *extra]


def assert_no_secret(folder):
    for p in Path(folder).rglob("*"):
        if p.is_file():
            assert SECRET not in p.read_text(errors="replace"), f"the key leaked into {p}"


@needs_shared
def test_faults_end_with_every_item_reviewed_or_flagged(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    questions = jl(QG / "questions.jsonl")
    published = {r["question_id"]: r for r in jl(QG / "reviews" / "Qreview-gpt4.jsonl")}
    answers = {r["question_id"]: r["text"] for r in jl(quilt_inputs().answer2_file)}
    q = lambda i: answers[questions[i]["question_id"]]   # the model's answer text is unique to its question
    faults = {q(3): ["429", "429", "500"], q(10): ["500"], q(20): ["timeout"], q(30): ["429", "timeout"],
              q(40): ["garbage"], q(50): ["echo"], q(60): ["500", "500"], q(70): ["429"]}
    with LocalJudge(reply=quilt_replay(), faults=faults, hang=4.0) as judge:
        counts = review(quilt_inputs(), tmp_path / "reviews.jsonl",
                        JudgeSpec(model="gpt-4", base_url=judge.url, concurrency=16, max_retries=4, timeout=2.0))
        stats = dict(judge.stats)
    recs = jl(tmp_path / "reviews.jsonl")
    # none lost, none duplicated, in question order, ids as published
    assert [r["question_id"] for r in recs] == [x["question_id"] for x in questions]
    assert [r["id"] for r in recs] == [published[r["question_id"]]["id"] for r in recs]
    assert counts["failed"] == 0 and counts["flagged"] == 1 and counts["reviewed"] == 325
    # every fault was met and retried
    assert stats["429"] == 4 and stats["500"] == 4 and stats["timeout"] == 2 and stats["garbage"] == 1
    flagged = [r for r in recs if r.get("flagged")]
    assert [r["question_id"] for r in flagged] == [questions[40]["question_id"]]
    assert flagged[0]["tuple"] is None and flagged[0]["content"].startswith("Both answers are reasonable")
    # the key echoed by the server is masked; every other review is the published one
    echoed = recs[50]
    assert "***" in echoed["content"] and SECRET not in echoed["content"]
    for r in recs:
        if r["question_id"] in (questions[40]["question_id"], questions[50]["question_id"]): continue
        p = published[r["question_id"]]
        assert (r["tuple"], r["content"], r["answer1_id"], r["answer2_id"], r["category"]) == \
               (p["tuple"], p["content"], p["answer1_id"], p["answer2_id"], p["category"])
    assert_no_secret(tmp_path)


@needs_shared
def test_failed_calls_are_recorded_then_retried_on_rerun(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    questions = jl(QG / "questions.jsonl")[:12]
    target = questions[5]
    marker = {r["question_id"]: r["text"] for r in jl(quilt_inputs().answer2_file)}[target["question_id"]]
    with LocalJudge(reply=quilt_replay(), faults={marker: ["500"] * 4}) as judge:
        out = tmp_path / "r.jsonl"
        counts = review(quilt_inputs(), out, JudgeSpec(base_url=judge.url, max_retries=2, concurrency=4), limit=12)
        assert counts["failed"] == 1 and counts["reviewed"] == 11
        rec = [r for r in jl(out) if r["question_id"] == target["question_id"]][0]
        assert rec["failed"] is True and rec["tuple"] is None and "InternalServerError" in rec["error"]
        before = judge.stats["requests"]
        counts = review(quilt_inputs(), out, JudgeSpec(base_url=judge.url, max_retries=2, concurrency=4), limit=12)
        assert counts == {"skipped": 11, "reviewed": 1}
        assert judge.stats["requests"] - before == 2        # one 500 left, then the review
    recs = jl(out)
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in questions]
    assert not any(r.get("failed") for r in recs) and all(r["tuple"] for r in recs)


@needs_shared
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    env = dict(os.environ, OPENAI_API_KEY=SECRET, PYTHONPATH=str(REPO))
    out = tmp_path / "reviews.jsonl"
    code = "import sys; from qllava.evaluation.review import review_cli; sys.exit(review_cli(sys.argv[1:]))"
    with LocalJudge(reply=quilt_replay(), latency=0.1) as judge:
        args = [sys.executable, "-c", code, *cli_args(out, judge.url, "--limit", "80", "--concurrency", "4")]
        with open(tmp_path / "run1.log", "w") as log:
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
            deadline = time.time() + 60
            while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 20): time.sleep(0.02)
            os.kill(p.pid, signal.SIGKILL); p.wait()
        partial = load_reviews(out)
        assert 20 <= len(partial) < 80, len(partial)
        with open(tmp_path / "run2.log", "w") as log:
            r = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, (tmp_path / "run2.log").read_text()
        # the server saw the key from the environment ...
        assert judge.stats["requests"] >= 80
    recs = jl(out)
    ids = [x["question_id"] for x in jl(QG / "questions.jsonl")[:80]]
    assert [r["question_id"] for r in recs] == ids                              # none lost, none duplicated
    assert f"{len(partial)} already done" in (tmp_path / "run2.log").read_text()
    published = {r["question_id"]: r["tuple"] for r in jl(QG / "reviews" / "Qreview-gpt4.jsonl")}
    assert all(r["tuple"] == published[r["question_id"]] for r in recs)
    assert_no_secret(tmp_path)                                                  # ... but it is in no file or log


def _tiny_inputs(d, n=6):
    d = Path(d)
    for name, rows in {"q": [{"question_id": f"q{i}", "text": f"What is shown in slide {i}?", "category": "detail"} for i in range(n)],
                       "c": [{"question_id": f"q{i}", "text": f"slide {i} shows glands", "type": "Breast"} for i in range(n)],
                       "a1": [{"question_id": f"q{i}", "text": "glands"} for i in range(n)],
                       "a2": [{"question_id": f"q{i}", "text": "bone", "answer_id": f"x{i}"} for i in range(n)]}.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [d / "q.jsonl", d / "c.jsonl", d / "a1.jsonl", d / "a2.jsonl"]


def test_key_sent_from_environment_and_server_sees_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    seen = []
    class Judge(LocalJudge):
        def _handle(self, h):
            seen.append(h.headers.get("Authorization")); return super()._handle(h)
    with Judge() as judge:
        counts = review(ReviewInputs(*_tiny_inputs(tmp_path)), tmp_path / "out.jsonl", JudgeSpec("judge-x", base_url=judge.url))
    assert counts["reviewed"] == 6 and set(seen) == {f"Bearer {SECRET}"}
    assert_no_secret(tmp_path)


def test_key_as_argument_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="environment only"):
        review(ReviewInputs(*_tiny_inputs(tmp_path)), tmp_path / "o.jsonl", JudgeSpec(base_url="http://127.0.0.1:9/v1"),
               api_key="sk-x")
    with pytest.raises(ConfigError, match="environment only"):
        review_cli(["-q", "a", "-c", "b", "-a", "c", "d", "-o", "e", "--api-key", "sk-x"])
    with pytest.raises(ConfigError, match="environment only"):
        make_client(api_key="sk-x")


def test_no_key_for_a_remote_judge_is_a_clear_error(tmp_path, monkeypatch):
    for v in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"): monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="no API key"):
        review(ReviewInputs(*_tiny_inputs(tmp_path)), tmp_path / "o.jsonl", JudgeSpec(base_url="https://judge.example.com/v1"))


def test_rejected_key_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    inputs = ReviewInputs(*_tiny_inputs(tmp_path))
    with LocalJudge(faults={"slide 2?": ["401"]}) as judge:
        with pytest.raises(ConfigError, match="refused"):
            review(inputs, tmp_path / "o.jsonl", JudgeSpec(base_url=judge.url, concurrency=1))
        # what was reviewed before the refusal is kept and skipped next time
        done = load_reviews(tmp_path / "o.jsonl")
        counts = review(inputs, tmp_path / "o.jsonl", JudgeSpec(base_url=judge.url))
    assert counts["skipped"] == len(done) and len(load_reviews(tmp_path / "o.jsonl")) == 6


def test_prompt_file_replaces_our_prompt(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    seen = []
    def reply(content):
        seen.append(content); return "6 4\nfine"
    (tmp_path / "rule.txt").write_text("Score the two helpers from 1 to 10, scores first.")
    with LocalJudge(reply=reply) as judge:
        review(ReviewInputs(*_tiny_inputs(tmp_path), prompt_file=tmp_path / "rule.txt"), tmp_path / "o.jsonl",
               JudgeSpec(base_url=judge.url), limit=2)
    assert len(seen) == 2 and all(c.rstrip().endswith("Score the two helpers from 1 to 10, scores first.") for c in seen)
    assert all(r["tuple"] == [6.0, 4.0] for r in jl(tmp_path / "o.jsonl"))


def test_azure_client_against_local_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    paths = []
    class Judge(LocalJudge):
        def _handle(self, h):
            paths.append((h.path, h.headers.get("api-key"))); return super()._handle(h)
    with Judge() as judge:
        counts = review(ReviewInputs(*_tiny_inputs(tmp_path)), tmp_path / "o.jsonl",
                        JudgeSpec("my-gpt4-deployment", azure_endpoint=judge.url.removesuffix("/v1"),
                                  api_version="2024-06-01"), limit=2)
    assert counts["reviewed"] == 2
    assert all(p.startswith("/openai/deployments/my-gpt4-deployment/chat/completions") and k == SECRET for p, k in paths)
    assert_no_secret(tmp_path)


def test_review_called_from_a_running_event_loop(tmp_path, monkeypatch):
    "Inside Jupyter an event loop is already running; `review` must still work (it runs its own loop in a thread)."
    import asyncio
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    inputs = ReviewInputs(*_tiny_inputs(tmp_path))
    async def notebook_cell():
        with LocalJudge() as judge:
            return review(inputs, tmp_path / "o.jsonl", JudgeSpec(base_url=judge.url))
    counts = asyncio.run(notebook_cell())
    assert counts["reviewed"] == 6 and len(load_reviews(tmp_path / "o.jsonl")) == 6


# --- resuming is safe: a review is kept only while what it judged is unchanged ------------------------------------

def _rewrite(path, change):
    rows = jl(path)
    Path(path).write_text("".join(json.dumps(change(dict(r))) + "\n" for r in rows))


def test_rerun_with_other_answers_model_or_prompt_reviews_again(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    out = tmp_path / "r.jsonl"
    with LocalJudge() as judge:
        args = ["-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(out), "--base-url", judge.url, "-m", "judge-a"]
        assert review_cli(args) == 0
        first = {r["question_id"]: r for r in jl(out)}
        assert all(r["fingerprint"]["judge_model"] == "judge-a" for r in first.values())
        # same inputs: nothing is asked again
        n = judge.stats["requests"]
        assert review_cli(args) == 0 and judge.stats["requests"] == n
        assert "6 already done" in capsys.readouterr().err
        # another answers file (two answers differ): those two are reviewed again, the other four kept
        _rewrite(a2, lambda r: r | {"text": "glands, clearly"} if r["question_id"] in ("q1", "q4") else r)
        assert review_cli(args) == 0
        err = capsys.readouterr().err
        assert judge.stats["requests"] == n + 2
        assert "2 reviews were made with other inputs (answer2 changed for 2)" in err and "4 already done" in err
        recs = {r["question_id"]: r for r in jl(out)}
        assert recs["q1"]["tuple"] != first["q1"]["tuple"] and recs["q0"] == first["q0"]
        # another judge model: every review is asked again
        n = judge.stats["requests"]
        assert review_cli(args[:-1] + ["judge-b"]) == 0
        assert judge.stats["requests"] == n + 6 and "judge_model changed for 6" in capsys.readouterr().err
        # another prompt: every review is asked again
        (tmp_path / "rule.txt").write_text("Score both from 1 to 10, scores first.")
        n = judge.stats["requests"]
        assert review_cli(args[:-1] + ["judge-b", "--prompt-file", str(tmp_path / "rule.txt")]) == 0
        assert judge.stats["requests"] == n + 6 and "prompt changed for 6" in capsys.readouterr().err
    assert [r["question_id"] for r in jl(out)] == [f"q{i}" for i in range(6)]


def test_reviews_without_fingerprint_are_reviewed_again(tmp_path, monkeypatch):
    "A file written by the original scripts (or an older qllava) cannot prove what it judged: it is reviewed again."
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    inputs = ReviewInputs(*_tiny_inputs(tmp_path))
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps({"id": i + 1, "question_id": f"q{i}", "answer1_id": f"q{i}", "answer2_id": f"x{i}",
                                       "category": "detail", "content": "8 2\nold", "tuple": [8.0, 2.0]}) + "\n" for i in range(6)))
    with LocalJudge() as judge:
        counts = review(inputs, out, JudgeSpec(base_url=judge.url))
    assert counts["stale"] == 6 and counts["reviewed"] == 6 and judge.stats["requests"] == 6
    assert all("fingerprint" in r and r["content"] != "8 2\nold" for r in jl(out))


def test_redo_flagged_asks_again_for_unreadable_replies(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    out = tmp_path / "r.jsonl"
    with LocalJudge(faults={"slide 3?": ["garbage"]}) as judge:
        args = ["-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(out), "--base-url", judge.url]
        assert review_cli(args) == 0
        err = capsys.readouterr().err
        assert "1 flagged" in err and "q3" in err and "--redo-flagged" in err
        n = judge.stats["requests"]
        assert review_cli(args) == 0 and judge.stats["requests"] == n       # kept by default
        assert review_cli(args + ["--redo-flagged"]) == 0 and judge.stats["requests"] == n + 1
    recs = {r["question_id"]: r for r in jl(out)}
    assert recs["q3"]["tuple"] and not recs["q3"].get("flagged") and len(recs) == 6


def _main(argv, capsys):
    from qllava.cli import main
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_output_that_is_a_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    with LocalJudge() as judge:
        rc, err = _main(["review", "-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(tmp_path), "--base-url", judge.url], capsys)
        assert judge.stats["requests"] == 0
    assert rc == 2 and "Traceback" not in err
    assert f"{tmp_path}: is a directory" in err and "Fix:" in err and "reviews.jsonl" in err
    # an input file given as the output would be overwritten: refused too
    rc, err = _main(["review", "-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(a2), "--base-url", "http://127.0.0.1:9/v1"], capsys)
    assert rc == 2 and f"{a2}" in err and "input" in err and "Fix:" in err and len(jl(a2)) == 6
    # a file that holds something else than reviews (say the answers) is never overwritten
    other = tmp_path / "answers-copy.jsonl"; other.write_text(a2.read_text())
    rc, err = _main(["review", "-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(other), "--base-url", "http://127.0.0.1:9/v1"], capsys)
    assert rc == 2 and f"{other}" in err and "not a review" in err and "Fix:" in err
    assert other.read_text() == a2.read_text()


def test_base_url_with_azure_endpoint_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    rc, err = _main(["review", "-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(tmp_path / "o.jsonl"),
                     "--base-url", "http://127.0.0.1:9/v1", "--azure-endpoint", "https://x.openai.azure.com"], capsys)
    assert rc == 2 and "--base-url" in err and "--azure-endpoint" in err and "Fix:" in err
    with pytest.raises(ConfigError, match="both"):
        make_client(base_url="http://127.0.0.1:9/v1", azure_endpoint="https://x.openai.azure.com")
    assert not (tmp_path / "o.jsonl").exists()


def test_failures_name_their_question_ids_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    with LocalJudge(faults={"slide 2?": ["500"] * 3}) as judge:
        rc = review_cli(["-q", str(q), "-c", str(c), "-a", str(a1), str(a2), "-o", str(tmp_path / "o.jsonl"),
                         "--base-url", judge.url, "--max-retries", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "q2" in err and "InternalServerError" in err and str(tmp_path / "o.jsonl") in err
    assert "run the same command again" in err
    # a rejected key names the question it stopped at and where the finished reviews are
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with LocalJudge(faults={"slide 4?": ["401"]}) as judge:
        with pytest.raises(ConfigError) as e:
            review(ReviewInputs(q, c, a1, a2), tmp_path / "o2.jsonl", JudgeSpec(base_url=judge.url, concurrency=1))
    assert "'q4'" in str(e.value) and str(tmp_path / "o2.jsonl") in str(e.value) and "Fix:" in str(e.value)
    assert SECRET not in str(e.value)


def test_question_file_without_question_id_is_named(tmp_path):
    q, c, a1, a2 = _tiny_inputs(tmp_path)
    q.write_text(q.read_text() + json.dumps({"text": "orphan?"}) + "\n")
    from qllava.core import DataError
    with pytest.raises(DataError, match=r"q.jsonl, record 6: .*no question_id.*Fix:"):
        review(ReviewInputs(q, c, a1, a2), tmp_path / "o.jsonl", JudgeSpec(base_url="http://127.0.0.1:9/v1"))
