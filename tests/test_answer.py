"""qllava answer end to end: the original model_vqa answer format, batched == one at a time, a real `qllava answer`
process killed with SIGKILL mid-run and rerun (nothing lost, nothing duplicated), and 2 shards == 1 run.

Nothing is trained: a tiny random model is built and saved as a qllava checkpoint in a fixture."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qllava.evaluation.answer import answer_questions, answer_sharded, read_answers, get_chunk, read_questions
from qllava.modeling.generate import Decoding
from qllava.core import CheckpointError, DataError

pytestmark = pytest.mark.timeout(900)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N_QUESTIONS = 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("ckpt") / "tiny-model"
    model, tok = build_model(seed=0)
    save_checkpoint(model, d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Image questions of different lengths (some with the placeholder in the text), plus text-only ones."
    d = tmp_path_factory.mktemp("vqa")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    qs = []
    for i in range(N_QUESTIONS):
        if i % 7 == 6:
            qs.append({"question_id": f"q{i:03d}", "text": "Say something about stains" + " please" * (i % 3), "category": "conv"})
            continue
        Image.fromarray(rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8)).save(d / "img" / f"{i}.png")
        text = "Is the staining strong?" + " Answer briefly." * (i % 4)
        if i % 5 == 0: text = "<image>\n" + text
        qs.append({"question_id": f"q{i:03d}", "image": f"{i}.png", "text": text, "category": "conv"})
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return d


def cli_cmd(*args):
    "`qllava answer` as a user runs it: through the qllava CLI once it is registered there, else the module entry."
    from qllava.cli import SUBCOMMANDS
    entry = ["-m", "qllava.cli", "answer"] if "answer" in SUBCOMMANDS else ["-m", "qllava.evaluation.answer"]
    return [sys.executable, *entry, *map(str, args)]


def test_answers_file_has_the_original_format(ckpt, data, tmp_path):
    out = tmp_path / "answers.jsonl"
    r = answer_questions(ckpt, data / "questions.jsonl", data / "img", out, Decoding(max_new_tokens=6, batch_size=4))
    assert (r["total"], r["answered"], r["skipped"]) == (N_QUESTIONS, N_QUESTIONS, 0)
    lines = out.read_text().splitlines()
    recs = [json.loads(l) for l in lines]
    qs = read_questions(data / "questions.jsonl")
    assert [x["question_id"] for x in recs] == [q["question_id"] for q in qs]
    for rec, q in zip(recs, qs):
        assert list(rec) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        assert rec["prompt"] == q["text"] and isinstance(rec["text"], str) and rec["model_id"] == "tiny-model"
        assert isinstance(rec["metadata"], dict) and len(rec["answer_id"]) == 22
    assert len({x["answer_id"] for x in recs}) == N_QUESTIONS
    # the answers feed qllava.evaluation.metrics directly
    from qllava.evaluation.metrics import vqa_metrics
    gt = [{"id": q["question_id"], "answer": "yes", "answer_type": "CLOSED"} for q in qs]
    assert vqa_metrics(gt, recs)["n_closed"] == N_QUESTIONS


def test_batched_answers_equal_one_at_a_time(ckpt, data, tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join((data / "questions.jsonl").read_text().splitlines(keepends=True)[:14]))
    answer_questions(ckpt, qf, data / "img", tmp_path / "b8.jsonl", Decoding(max_new_tokens=12, batch_size=8))
    answer_questions(ckpt, qf, data / "img", tmp_path / "b1.jsonl", Decoding(max_new_tokens=12, batch_size=1))
    b8 = [(r["question_id"], r["text"]) for r in read_answers(tmp_path / "b8.jsonl")]
    b1 = [(r["question_id"], r["text"]) for r in read_answers(tmp_path / "b1.jsonl")]
    assert len(b8) == 14 and b8 == b1
    assert len({t for _, t in b8}) > 1  # the answers do depend on the question / image


def test_killed_run_resumes_without_loss_or_duplicates(ckpt, data, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["--model-path", ckpt, "--question-file", data / "questions.jsonl", "--image-folder", data / "img",
            "--answers-file", out, "--batch-size", 2, "--max_new_tokens", 32]
    p = subprocess.Popen(cli_cmd(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < 600:
            if out.exists() and len(out.read_text().splitlines()) >= 4: break
            if p.poll() is not None: pytest.fail(f"finished before it could be killed: {p.stdout.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    before = out.read_text().splitlines()
    assert 4 <= len(before) < N_QUESTIONS, len(before)
    # a kill in the middle of a write leaves a cut-off line; make sure there is one, as the worst case
    with open(out, "a") as f: f.write('{"question_id": "q0')
    r = subprocess.run(cli_cmd(*args), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cut-off last line" in r.stderr
    after = out.read_text().splitlines()
    ids = [json.loads(l)["question_id"] for l in after]
    want = [q["question_id"] for q in read_questions(data / "questions.jsonl")]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)) == N_QUESTIONS  # each exactly once
    assert ids == want                                                              # and in question order
    assert after[:len(before)] == before                                            # earlier answers kept as written
    # and the answers are those of an uninterrupted run (greedy decoding is deterministic)
    ref = tmp_path / "ref.jsonl"
    answer_questions(ckpt, data / "questions.jsonl", data / "img", ref, Decoding(max_new_tokens=32, batch_size=8))
    assert [json.loads(l)["text"] for l in after] == [r["text"] for r in read_answers(ref)]
    # a third run has nothing left to do
    r = subprocess.run(cli_cmd(*args), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "answered 0" in r.stderr and out.read_text().splitlines() == after


def test_two_shards_merge_to_the_single_run(ckpt, data, tmp_path):
    single, sharded = tmp_path / "single.jsonl", tmp_path / "sharded.jsonl"
    answer_questions(ckpt, data / "questions.jsonl", data / "img", single, Decoding(max_new_tokens=10, batch_size=8))
    # a shard killed earlier left half its answers behind: they are kept and not answered again
    qs = read_questions(data / "questions.jsonl")
    chunk1 = {q["question_id"] for q in get_chunk(qs, 2, 1)}
    early = [r for r in read_answers(single) if r["question_id"] in chunk1][:5]
    Path(f"{sharded}.chunk1").write_text("".join(json.dumps(r) + "\n" for r in early))
    r = answer_sharded(ckpt, data / "questions.jsonl", data / "img", sharded, num_gpus=2,
                       decoding=Decoding(max_new_tokens=10, batch_size=8))
    assert r["shards"] == 2
    a, b = read_answers(single), read_answers(sharded)
    assert [(x["question_id"], x["text"]) for x in b] == [(x["question_id"], x["text"]) for x in a]
    assert {x["answer_id"] for x in b} >= {x["answer_id"] for x in early}  # resumed, not redone
    assert not list(tmp_path.glob("sharded.jsonl.chunk*"))
    # the CLI's --num-chunks/--chunk-idx give the same split
    parts = [tmp_path / f"c{i}.jsonl" for i in range(3)]
    for i, p in enumerate(parts):
        res = subprocess.run(cli_cmd("--model-path", ckpt, "--question-file", data / "questions.jsonl", "--image-folder",
                                     data / "img", "--answers-file", p, "--num-chunks", 3, "--chunk-idx", i, "--max_new_tokens", 10),
                             env=ENV, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    joined = [(x["question_id"], x["text"]) for p in parts for x in read_answers(p)]
    assert joined == [(x["question_id"], x["text"]) for x in a]


def test_clear_errors(ckpt, data, tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"question_id": "ok", "text": "hi"}) + "\n" + json.dumps({"question_id": "lost", "image": "nope.png", "text": "?"}) + "\n")
    with pytest.raises(DataError, match="id 'lost'.*nope.png"):
        answer_questions(ckpt, qf, data / "img", tmp_path / "a.jsonl")
    assert not read_answers(tmp_path / "a.jsonl")  # checked before anything is generated
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        answer_questions(tmp_path / "nothing-here", data / "questions.jsonl", data / "img", tmp_path / "a.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "a", "text": "x"}\n{"question_id": "b", "text": "y"\n')
    r = subprocess.run(cli_cmd("--model-path", ckpt, "--question-file", bad, "--answers-file", tmp_path / "b.jsonl"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "line 2 is not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cli_cmd("--model-path", tmp_path / "nothing-here", "--question-file", qf, "--answers-file", tmp_path / "b.jsonl"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "no such checkpoint folder" in r.stderr and "Traceback" not in r.stderr


def test_media_paths_never_leave_the_image_folder(tmp_path):
    "A question naming ../../x.png or an absolute path is refused, as training refuses such a record."
    from qllava.core import DataError
    from qllava.evaluation.answer import check_media
    (tmp_path / "imgs").mkdir(); (tmp_path / "secret.png").write_bytes(b"x")
    for bad in ["../secret.png", str(tmp_path / "secret.png")]:
        q = [{"question_id": "q7", "image": bad, "text": "What is shown?"}]
        with pytest.raises(DataError, match="q7") as e: check_media(q, tmp_path / "imgs", {"image": None}, "Q.jsonl")
        assert "outside the media folder" in str(e.value) or "absolute" in str(e.value)
