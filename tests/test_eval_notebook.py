"""nbs/eval.ipynb executed by papermill in the venv's kernel, against checkpoints built here (tiny random models, nothing
trained) and the shipped demo questions: the output notebook shows the metrics table, the review summary, the chart and
the gallery; a key in the environment never reaches the output notebook, the logs or any file written; a key passed as
a parameter stops the notebook with a clear message."""
import json, logging, os
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")
from papermill.exceptions import PapermillExecutionError
from qllava.workflows.evalrun import reference_overlap_judge
from qllava.evaluation.review import LocalJudge

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "eval.ipynb"
SECRET = "sk-" + "test-3a9c0e5b-DO-NOT-LEAK-eval-77d1"  # split so no key-shaped literal sits in the repo


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("ckpts")
    m, t = build_model(seed=0)
    save_checkpoint(m, d / "finetune-image", tokenizer=t)
    m, t = build_model(encoders={"sensor": "preset:tiny-limu"}, seed=0)
    save_checkpoint(m, d / "finetune-sensor", tokenizer=t)
    return d


def execute(out, cwd, **params):
    return papermill.execute_notebook(str(NB), str(out), parameters=params, kernel_name="python3", cwd=str(cwd),
                                      progress_bar=False, log_output=True)


def outputs(nb_path):
    "(all text of the outputs, number of PNG images) of an executed notebook."
    nb = json.loads(Path(nb_path).read_text())
    texts, pngs = [], 0
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if "text" in o: texts.append("".join(o["text"]))
            for mime, v in (o.get("data") or {}).items():
                if mime == "image/png": pngs += 1
                elif mime.startswith("text/"): texts.append("".join(v))
    return "\n".join(texts), pngs


def assert_no_secret(folder, caplog):
    for p in Path(folder).rglob("*"):
        if p.is_file(): assert SECRET not in p.read_bytes().decode("utf-8", "replace"), f"the key leaked into {p}"
    assert SECRET not in caplog.text, "the key leaked into the logs"


class RecordingJudge(LocalJudge):
    "The local OpenAI-compatible judge, also keeping the Authorization header it was sent."
    auth = None
    def _handle(self, h):
        self.auth = h.headers.get("Authorization")
        return super()._handle(h)


def test_eval_notebook_shows_everything_and_never_leaks_the_key(ckpts, tmp_path, monkeypatch, caplog, keep_for_docs):
    from qllava.data.presets import demo_paths
    n_q = sum(1 for l in demo_paths("pathology")["eval_questions"].read_text().splitlines() if l.strip())
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)   # the kernel inherits it and sends it to the judge over HTTP
    run_dir = tmp_path / "runs" / "eval-demo"
    out = tmp_path / "eval-out.ipynb"
    with RecordingJudge(reply=reference_overlap_judge) as judge:
        execute(out, tmp_path, checkpoint=str(ckpts / "finetune-image"), run_dir=str(run_dir), max_new_tokens=8,
                judge_base_url=judge.url, judge_model="judge-under-test")
    assert judge.auth == f"Bearer {SECRET}" and judge.stats["ok"] == n_q      # the key was used ...
    text, pngs = outputs(out)
    assert "yes_no_accuracy" in text and "open: F1" in text                # the metrics table
    assert "relative (%)" in text and "subspecialty" in text                # the review summary
    assert f"judge-under-test at http://127.0.0.1:{judge.port}" in text
    assert pngs >= 2                                                         # the chart and the gallery
    assert "patho-q000" in text and "sha256: eval_questions.jsonl" in text   # answers table, provenance
    rec = json.loads((run_dir / "eval.json").read_text())
    assert rec["kind"] == "eval" and rec["judge"]["kind"] == "endpoint" and rec["metrics"]["review_judge"] == "judge-under-test"
    assert rec["metrics"]["n_closed"] + rec["metrics"]["n_open"] == n_q and rec["review"]["all"]["n"] == n_q
    assert any(k.endswith("eval_gt.json") for k in rec["provenance"]["files"])
    answers = [json.loads(l) for l in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == n_q and len({a["question_id"] for a in answers}) == n_q
    assert_no_secret(tmp_path, caplog)                                      # ... and never written
    keep_for_docs(out, "run-eval.ipynb")                                    # (shown by the docs site)


def test_imu_eval_without_key_uses_the_local_judge(ckpts, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    for k in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"): monkeypatch.delenv(k, raising=False)
    out = tmp_path / "eval-imu.ipynb"
    execute(out, tmp_path, checkpoint=str(ckpts / "finetune-sensor"), modality="sensor", limit=6, max_new_tokens=6, gallery_size=3)
    text, pngs = outputs(out)
    assert "imu-q000" in text and "local stand-in judge" in text and pngs >= 2
    assert "relative (%) [local judge]" in text and "local-judge numbers" in text and "not GPT-4" in text
    rec = json.loads((tmp_path / "runs" / "eval-finetune-sensor" / "eval.json").read_text())
    assert rec["review"]["all"]["n"] == 6 and rec["judge"]["kind"] == "local"


@pytest.mark.parametrize("params, said", [
    ({"openai_api_key": SECRET}, "parameter 'openai_api_key' looks like a secret (by its name)"),
    ({"judge_model": SECRET}, "parameter 'judge_model' looks like a secret (by its value"),
])
def test_key_as_parameter_is_refused(ckpts, tmp_path, params, said):
    out = tmp_path / "refused.ipynb"
    with pytest.raises(PapermillExecutionError) as e:
        execute(out, tmp_path, checkpoint=str(ckpts / "finetune-image"), **params)
    assert e.value.ename == "ConfigError" and said in e.value.evalue and "environment" in e.value.evalue
    assert "delete that output notebook" in e.value.evalue   # papermill has written the value into it already
    assert SECRET not in e.value.evalue
    assert not (tmp_path / "runs").exists()  # stopped before anything ran


def test_judge_timeout_and_retries_reach_the_client(ckpts, tmp_path, monkeypatch):
    "A judge slower than judge_timeout: each call is tried 1 + judge_max_retries times, then counted as failed (no hang)."
    for k in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"): monkeypatch.delenv(k, raising=False)
    out = tmp_path / "eval-slow.ipynb"
    run_dir = tmp_path / "runs" / "eval-slow"
    import time
    with LocalJudge(latency=20.0) as judge:
        t0 = time.time()
        execute(out, tmp_path, checkpoint=str(ckpts / "finetune-image"), run_dir=str(run_dir), limit=3, max_new_tokens=4,
                gallery_size=1, judge_base_url=judge.url, judge_model="slow-judge", judge_timeout=0.5, judge_max_retries=2)
        took = time.time() - t0
        requests = judge.stats["requests"]
    assert requests == 3 * (1 + 2)                  # the retries reached the client ...
    assert took < 120                               # ... and the timeout did: a 20 s judge never answered
    rec = json.loads((run_dir / "eval.json").read_text())
    assert rec["parameters"]["judge_timeout"] == 0.5 and rec["parameters"]["judge_max_retries"] == 2
    assert rec["review_counts"]["failed"] == 3 and rec["review"]["all"]["failed"] == 3
    text, _ = outputs(out)
    assert "3 judge calls failed" in text and "judge_timeout" in text


def test_judge_timeout_must_be_positive(ckpts, tmp_path):
    with pytest.raises(PapermillExecutionError) as e:
        execute(tmp_path / "bad.ipynb", tmp_path, checkpoint=str(ckpts / "finetune-image"), judge_timeout=0.0)
    assert e.value.ename == "ConfigError" and "judge_timeout=0.0 must be more than 0" in e.value.evalue
