"Hand-made checks of qllava.evaluation.metrics against the published VQA metric definitions, and the metrics CLI."
import json, math, subprocess, sys
from pathlib import Path
import pytest
from qllava.core import DataError
from qllava.evaluation.metrics import (normalize_answer, exact_match, f1_precision_recall, sentence_bleu, vqa_metrics,
                            choice_metrics, parse_choice, metrics_cli, evaluate_files, closed_hit, closed_hit_strict)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw,norm", [
    ("The nucleus.", "nucleus"),                       # article, final period
    ("a an the", ""),                                  # only articles
    ("An eosinophilic cytoplasm", "eosinophilic cytoplasm"),
    ("anthem theory", "anthem theory"),                # articles are whole words only
    ("h&e-stained", "h&e stained"),                    # '-' touching no space becomes a space
    ("large - pleomorphic", "large pleomorphic"),      # ' - ' is deleted
    ("(mitoses)", "mitoses"),
    ("What? Yes!", "what yes"),
    ("1,000 cells", "1000 cells"),                     # thousands comma: all punctuation deleted
    ("1,000 cells (a-b)", "1000 cells ab"),            # ... including '(' ')' and '-'
    ("cells, nuclei", "cells nuclei"),
    ("x,y", "x y"),                                    # comma touching no space, no digits: a space
    ("grade 2.5.", "grade 2.5"),                       # decimal point kept
    ("Three foci, none necrotic", "3 foci 0 necrotic"),
    ("it isnt, dont", "it isn't don't"),               # contractions gain their apostrophe
    ("she's shes", "she's shes"),                      # reference table has no 'shes'
    ("Can't", "can't"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalisation_makes_answers_equal():
    assert exact_match("The tumour doesnt invade.", "tumour doesn't invade") == 1.0
    assert f1_precision_recall("Two (2) nuclei", "two nuclei") == (1.0, 1.0, 1.0)  # "2 2 nuclei": true positives counted on the prediction side
    assert exact_match("1,000", "1000") == 1.0


def test_exact_match_is_reference_coverage_of_prediction():
    # distinct reference words found in the prediction / number of prediction words
    assert exact_match("cell cell carcinoma", "cell carcinoma") == pytest.approx(2 / 3)
    assert exact_match("carcinoma", "squamous cell carcinoma") == 1.0
    assert exact_match("", "x") == 0.0


def test_f1_precision_recall_hand_computed():
    f1, p, r = f1_precision_recall("a well differentiated adenocarcinoma of colon", "moderately differentiated adenocarcinoma")
    # pred words: well differentiated adenocarcinoma of colon (5); ref: moderately differentiated adenocarcinoma (3)
    assert (p, r) == (2 / 5, 2 / 3) and f1 == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    assert f1_precision_recall("", "x") == (0.0, 0.0, 0.0)
    assert f1_precision_recall("x", "y") == (0.0, 0.0, 0.0)


def test_bleu_hand_computed():
    ref = "lymph node with metastatic carcinoma".split()
    hyp = "lymph node with carcinoma".split()
    # p1 = 4/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> float min; bp = exp(1 - 5/4)
    bp = math.exp(1 - 5 / 4)
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(bp)
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(bp * 2 / 3)
    assert sentence_bleu(ref, hyp, (0, 0, 1, 0)) == pytest.approx(bp * 1 / 2)
    assert 0 < sentence_bleu(ref, hyp) < 1e-50
    assert sentence_bleu(ref, "nothing shared".split()) == 0.0
    assert sentence_bleu(ref, []) == 0.0


def test_bleu_matches_nltk_when_available():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score", reason="nltk not installed; hand-computed cases cover BLEU").sentence_bleu
    cases = [("a b c d e", "a b c d e"), ("a b c d e", "a b x d e"), ("a b", "a b c d e f"), ("a b c", "c b a"),
             ("x y z w", "x y z w x y"), ("m", "m m m")]
    for r, h in cases:
        for w in [(0.25,) * 4, (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]:
            assert sentence_bleu(r.split(), h.split(), w) == nltk_bleu([r.split()], h.split(), weights=w)


def test_yes_no_rule():
    # the published Quilt-VQA rule: "no" when the answer holds the word "no" or "not", otherwise "yes"
    gt = [{"id": i, "answer": a, "answer_type": "CLOSED"} for i, a in enumerate(["yes", "no", "yes", "no", "yes", "No.", "no", "no"])]
    pred = [{"question_id": i, "text": t} for i, t in enumerate([
        "Yes, it is.",                  # yes == yes: hit
        "No!",                          # no == no: hit
        "Yesterday's slide",            # no negation -> yes: hit (the rule is lenient)
        "No, not yes",                  # negation -> no: hit
        "It is not positive",           # "not" -> no, gt yes: miss
        "no",                           # gt "No." normalises to "no": hit
        "It isn't involved",            # "isn't" is not "not" -> yes: miss
        "There is nothing (none)",      # "none" becomes "0", "nothing" is not "no" -> yes: miss
    ])]
    m = vqa_metrics(gt, pred)
    assert m["yes_no_accuracy"] == 5 / 8 * 100
    # the stricter rule of the earlier reference: must say yes/no as a word, and the ground-truth word
    assert m["yes_no_accuracy_strict"] == 4 / 8 * 100     # hits: 0, 1, 3, 5
    assert m["n_closed"] == 8 and m["n_open"] == 0 and m["f1"] is None and m["bleu"] is None
    assert closed_hit("Not at all.", "no") == 1 and closed_hit_strict("Not at all.", "no") == 0


def test_quilt_yes_no_answer_option():
    gt = [{"id": 5, "answer": "Yes, the cells are atypical.", "answer_type": "CLOSED", "yes_no_answer": "Yes"},
          {"id": 6, "answer": "There is no necrosis.", "answer_type": "CLOSED", "yes_no_answer": "no"}]
    pred = [{"question_id": 6, "text": "No necrosis is seen"}, {"question_id": 5, "text": "yes"}]
    assert vqa_metrics(gt, pred, quilt=True)["yes_no_accuracy"] == 100.0
    with pytest.raises(DataError, match="not yes or no"):
        vqa_metrics(gt, pred, quilt=False)


def test_open_other_type_and_bleu_average():
    gt = [{"id": 1, "answer": "Carcinoma", "answer_type": "OPEN"}, {"id": 2, "answer": "the lymph node", "answer_type": "other"}]
    pred = [{"question_id": 1, "text": "a carcinoma."}, {"question_id": 2, "text": "spleen"}]
    m = vqa_metrics(gt, pred)
    assert m["n_open"] == 2 and m["exact_match"] == 50.0 and m["f1"] == 50.0 and m["bleu_1"] == 50.0


def test_anchor_cuts_predictions_to_the_anchor_length():
    gt = [{"id": 1, "answer": "adenocarcinoma", "answer_type": "OPEN"}, {"id": 2, "answer": "yes", "answer_type": "CLOSED"}]
    pred = [{"question_id": 1, "text": "Adenocarcinoma, moderately differentiated"}, {"question_id": 2, "text": "Yes, but not here"}]
    anchor = [{"question_id": 2, "text": "Yes."}, {"question_id": 1, "text": "The adenocarcinoma"}]   # normalised: 3 and 14 chars
    m = vqa_metrics(gt, pred, anchor=anchor)
    assert m["exact_match"] == 100.0 and m["yes_no_accuracy"] == 100.0      # "adenocarcinoma", "yes"
    assert vqa_metrics(gt, pred)["yes_no_accuracy"] == 0.0                  # uncut, "not" makes it a no
    with pytest.raises(DataError, match="no prediction for ids 2"):
        vqa_metrics(gt, pred, anchor=anchor[1:])
    mc = [{"id": 0, "answer": "B"}]
    long = [{"question_id": 0, "text": "B then C."}]                       # two letters: unparsable uncut
    assert choice_metrics(mc, long)["unparsed"] == 1
    assert choice_metrics(mc, long, anchor=[{"question_id": 0, "text": "A"}])["choice_accuracy"] == 100.0


def test_mismatched_ids_are_named():
    gt = [{"id": "q1", "answer": "x", "answer_type": "OPEN"}, {"id": "q2", "answer": "y", "answer_type": "OPEN"}]
    with pytest.raises(DataError, match="no prediction for ids 'q2'.*unknown ids 'q9'"):
        vqa_metrics(gt, [{"question_id": "q1", "text": "x"}, {"question_id": "q9", "text": "y"}])
    with pytest.raises(DataError, match="repeated question_ids: 'q1'"):
        vqa_metrics(gt, [{"question_id": "q1", "text": "x"}, {"question_id": "q1", "text": "y"}])


def test_choice():
    assert parse_choice("A") == "A" and parse_choice("D. Melanoma") == "D" and parse_choice("option C is right") == "C"
    assert parse_choice("the answer is b") == "FAILED"
    gt = [{"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": v}]} for i, v in enumerate("ABCD")]
    pred = [{"question_id": i, "text": t} for i, t in enumerate(["A", "The answer is B.", "D", "no idea"])]
    m = choice_metrics(gt, pred)
    assert m == {"choice_accuracy": 50.0, "n": 4, "unparsed": 1}


def test_cli_json(tmp_path, capsys):
    gt = [{"id": 0, "answer": "carcinoma", "answer_type": "OPEN"}, {"id": 1, "answer": "yes", "answer_type": "CLOSED", "yes_no_answer": "yes"}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [{"question_id": 1, "text": "Yes."}, {"question_id": 0, "text": "carcinoma"}]))
    assert metrics_cli(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "a.jsonl"), "--quilt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ["exact_match", "f1", "precision", "recall", "yes_no_accuracy", "bleu", "bleu_1", "bleu_2", "bleu_3"]:
        assert k in out
    assert out["exact_match"] == 100.0 and out["yes_no_accuracy"] == 100.0 and out["bleu_1"] == 100.0
    # multiple choice is picked automatically when the ground truth has no answer_type
    (tmp_path / "mc.json").write_text(json.dumps([{"id": 0, "answer": "B"}]))
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question_id": 0, "text": "B"}))
    assert evaluate_files(tmp_path / "mc.json", tmp_path / "mc.jsonl")["choice_accuracy"] == 100.0


def test_cli_error_names_ids(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps([{"id": 0, "answer": "x", "answer_type": "OPEN"}]))
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 3, "text": "x"}))
    code = "import sys; from qllava.evaluation.metrics import metrics_cli; from qllava.core import DataError\n" \
           "try: metrics_cli(sys.argv[1:])\nexcept DataError as e: print('ERR', e); sys.exit(2)"
    r = subprocess.run([sys.executable, "-c", code, "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "a.jsonl")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "no prediction for ids 0" in r.stdout and "unknown ids 3" in r.stdout
