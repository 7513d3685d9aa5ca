"""qllava summarize reproduces the published Quilt-LLaVA GPT-4 review summaries (per category, per subspecialty, overall)
from the review files in ../shared/data/quilt_gpt/reviews."""
import json, os
from collections import defaultdict
from pathlib import Path
import pytest
from qllava.core import DataError
from qllava.evaluation.summarize import summarize_files, summarize_reviews, summary_table, plot_summary, summarize_cli

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QLLAVA_SHARED", REPO.parents[0] / "shared"))
QG = SHARED / "data" / "quilt_gpt"
REVIEW_FILES = sorted((QG / "reviews").glob("*.jsonl")) if (QG / "reviews").exists() else []
needs_shared = pytest.mark.skipif(not REVIEW_FILES, reason=f"shared Quilt-LLaVA review tables not found under {QG} (set QLLAVA_SHARED)")


def jl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def published_summary(reviews_path, captions_path):
    """The published procedure, written out independently: walk reviews and captions line by line (they must be
    aligned), collect the score pairs per category, per caption type and overall, average each column, round the
    means to 3 decimals, report relative = round(m2 / m1 * 100, 1), score1 = round(m1 * 10, 1), score2 = round(m2 * 10, 1)."""
    groups = defaultdict(list)
    for review, cap in zip(jl(reviews_path), jl(captions_path)):
        assert review["question_id"] == cap["question_id"]
        groups[review["category"]].append(review["tuple"])
        groups["all"].append(review["tuple"])
        groups[cap["type"]].append(review["tuple"])
    out = {}
    for k, v in groups.items():
        m1 = round(sum(t[0] for t in v) / len(v), 3)
        m2 = round(sum(t[1] for t in v) / len(v), 3)
        out[k] = (len(v), round(m2 / m1 * 100, 1), round(m1 * 10, 1), round(m2 * 10, 1))
    return out


@needs_shared
@pytest.mark.parametrize("path", REVIEW_FILES, ids=lambda p: p.name)
def test_reproduces_published_summary(path):
    expected = published_summary(path, QG / "captions.jsonl")
    summary = summarize_files(path, QG / "captions.jsonl")
    table = summary_table(summary)
    assert set(summary) == set(expected)
    assert {k for k, s in summary.items() if s["group"] == "category"} == {"conv", "detail"}
    assert len([k for k, s in summary.items() if s["group"] == "subspecialty"]) == 14
    for name, (n, rel, s1, s2) in expected.items():
        row = table.loc[name]
        assert (row["n"], row["relative (%)"], row["reference (x10)"], row["model (x10)"]) == (n, rel, s1, s2), name
        s = summary[name]
        assert s["flagged"] == 0 and s["failed"] == 0
        assert s["score1"] == pytest.approx(s1, abs=0.051) and s["relative"] == pytest.approx(rel, abs=0.06)


@needs_shared
def test_hand_verified_figures():
    # checked by hand (jq + awk over the raw tuples) for Quilt-LLaVA 7B (Qreview-gpt4.jsonl)
    s = summarize_files(QG / "reviews" / "Qreview-gpt4.jsonl", QG / "captions.jsonl")
    assert s["all"]["n"] == 326 and s["detail"]["n"] == 70 and s["conv"]["n"] == 256
    assert s["all"]["score1"] == pytest.approx(76.1196, abs=1e-4) and s["all"]["score2"] == pytest.approx(57.5307, abs=1e-4)
    assert s["all"]["relative"] == pytest.approx(75.579, abs=1e-3)
    assert s["detail"]["score1"] == pytest.approx(80.2857, abs=1e-4) and s["detail"]["relative"] == pytest.approx(66.014, abs=1e-3)
    t = summary_table(s)
    assert list(t.loc["all", ["reference (x10)", "model (x10)", "relative (%)"]]) == [76.1, 57.5, 75.6]
    s = summarize_files(QG / "reviews" / "Qreview-gpt4-liuhaotian.jsonl", QG / "captions.jsonl")
    assert s["all"]["relative"] == pytest.approx(55.686, abs=1e-3) and s["detail"]["score2"] == pytest.approx(31.8571, abs=1e-4)


@needs_shared
def test_cli_json_and_chart(tmp_path, capsys):
    path = QG / "reviews" / "Qreview-gpt4-llavamed.jsonl"
    assert summarize_cli([str(path), "--captions", str(QG / "captions.jsonl"), "--json", "--plot", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"conv", "detail", "all", "Bone", "Renal"} <= set(out)
    for v in out.values():
        assert {"n", "flagged", "score1", "score2", "relative"} <= set(v)
    assert out["all"]["relative"] == pytest.approx(64.799, abs=1e-3)
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_flagged_and_failed_are_left_out_of_the_means(tmp_path):
    reviews = [{"id": 1, "question_id": "a", "category": "conv", "tuple": [8.0, 4.0]},
               {"id": 2, "question_id": "b", "category": "conv", "tuple": None, "flagged": True, "content": "no scores"},
               {"id": 3, "question_id": "c", "category": "conv", "tuple": None, "failed": True, "content": None},
               {"id": 4, "question_id": "d", "category": "detail", "tuple": [6.0, 6.0]}]
    caps = [{"question_id": q, "type": "Renal"} for q in "abcd"]
    s = summarize_reviews(reviews, caps)
    assert s["conv"] == {"group": "category", "n": 3, "flagged": 1, "failed": 1, "score1": 80.0, "score2": 40.0,
                         "relative": 50.0, "mean1": 8.0, "mean2": 4.0}
    assert s["Renal"]["n"] == 4 and s["Renal"]["score2"] == 50.0 and s["all"]["relative"] == pytest.approx(5 / 7 * 100)
    assert len(plot_summary(s).axes[0].patches) == 2 * 4
    # a failed call later reviewed counts once
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in reviews + [{"id": 3, "question_id": "c", "category": "conv", "tuple": [2.0, 2.0]}]))
    c = tmp_path / "c.jsonl"; c.write_text("".join(json.dumps(r) + "\n" for r in caps))
    s = summarize_files(p, c)
    assert s["conv"]["n"] == 3 and s["conv"]["failed"] == 0 and s["conv"]["score1"] == 50.0


def test_reviews_without_captions_are_named(tmp_path):
    with pytest.raises(DataError, match=r"question_ids \['z'\] have no caption"):
        summarize_reviews([{"question_id": "z", "category": "conv", "tuple": [1, 1]}], [{"question_id": "a", "type": "Bone"}])


def _write(path, rows):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_corrupt_line_fails_naming_file_and_line(tmp_path, capsys):
    rows = [{"id": i + 1, "question_id": f"q{i}", "category": "conv", "content": "8 4", "tuple": [8.0, 4.0]} for i in range(4)]
    p = _write(tmp_path / "r.jsonl", [rows[0], rows[1], '{"id": 3, "question_id": "q2", "categ', rows[3]])
    with pytest.raises(DataError) as e:
        summarize_files(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "Fix:" in msg and "qllava review" in msg
    from qllava.cli import main
    assert main(["summarize", str(p)]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "Traceback" not in err
    # a line that is JSON but no review (an answers file passed by mistake) is named the same way
    p = _write(tmp_path / "a.jsonl", [rows[0], {"question_id": "q1", "text": "an answer", "answer_id": "x"}])
    with pytest.raises(DataError, match=r"a.jsonl, record 1: line 2 is not a review"):
        summarize_files(p)


def test_original_failure_value_is_counted_failed_and_left_out_of_the_means(tmp_path):
    "The original scripts write [-1, -1] when they cannot read the scores: that is a failure, not a score."
    rows = [{"id": 1, "question_id": "a", "category": "conv", "content": "8 4\n", "tuple": [8.0, 4.0]},
            {"id": 2, "question_id": "b", "category": "conv", "content": "Assistant 1 is better.", "tuple": [-1, -1]},
            {"id": 3, "question_id": "c", "category": "detail", "content": "6 6\n", "tuple": [6.0, 6.0]}]
    s = summarize_files(_write(tmp_path / "r.jsonl", rows), _write(tmp_path / "c.jsonl", [{"question_id": q, "type": "Bone"} for q in "abc"]))
    assert (s["conv"]["n"], s["conv"]["failed"], s["conv"]["flagged"], s["conv"]["score1"], s["conv"]["score2"]) == (2, 1, 0, 80.0, 40.0)
    assert (s["all"]["n"], s["all"]["failed"], s["all"]["mean1"], s["all"]["mean2"]) == (3, 1, 7.0, 5.0)
    assert summary_table(s).loc["all", "failed"] == 1
