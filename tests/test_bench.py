"""`qllava bench` end to end (issue 20): each published benchmark loaded by hub id, offline, through `datasets` from a
hub-layout cache holding stand-ins in the real schemas (`qllava make-bench-cache`), answered by a checkpoint, scored
with 95 % intervals beside the paper's numbers; every data problem reported before a model loads; interrupted answers
resumed; two runs compared with paired tests; Quilt-LLaVA's published GPT-review inputs replayed against an OpenAI-
compatible judge; hub dataset ids accepted as `data_path`. The checkpoint is a tiny random model: these tests prove
the pipeline, and the statistics are checked against closed forms in nbs/41_stats.ipynb."""

import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
from PIL import Image

from qllava.evaluation.benchmarks import BENCHMARKS, Benchmark, register_benchmark, write_benchmark_cache
from qllava.workflows.bench import BenchConfig, prepare_benchmarks
from qllava.core import DataError, resolve_records_path
from qllava.evaluation.metrics import evaluate_files
from qllava.data.presets import demo_paths

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "quilt_gpt"
ALL = ",".join(BENCHMARKS)


def qllava(args, env, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "qllava.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    "A hub cache of the benchmarks' stand-ins, a tiny checkpoint, and the environment of an offline machine using them."
    from qllava.modeling.model import build_model
    from qllava.modeling.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("bench")
    r = subprocess.run(
        [sys.executable, "-m", "qllava.cli", "make-bench-cache", d / "hub", "--rows", "24"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    model, tok = build_model(seed=0)
    save_checkpoint(model, d / "ckpt", tokenizer=tok)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(d / "hub"),
        "HF_DATASETS_CACHE": str(d / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return d, env


@pytest.fixture(scope="module")
def run1(bed):
    d, env = bed
    r = qllava(
        ["bench", "--model-path", d / "ckpt", "--benchmarks", ALL, "--out", d / "run1", "--max-new-tokens", "12"], env
    )
    assert r.returncode == 0, r.stderr
    return d / "run1", r


def test_every_benchmark_loads_answers_scores_and_prints_its_table(run1):
    out, r = run1
    for name, n in (("quilt_vqa", 23), ("quilt_vqa_red", 23), ("path_vqa", 24), ("pmc_vqa", 24)):
        assert f"{name} (n={n})" in r.stdout, r.stdout  # one closed stand-in answer has no yes / no verdict
        res = json.loads((out / name / "result.json").read_text())
        assert res["n"] == n and len((out / name / "scores.jsonl").read_text().splitlines()) == n
        for k in res["headline"]:
            iv = res["metrics"][k]
            assert iv["low"] <= iv["value"] <= iv["high"] and iv["level"] == 0.95, (name, k, iv)
        assert (out / name / "images").is_dir() and len(list((out / name / "images").iterdir())) == 24
    assert "no paper numbers transcribed yet" in r.stdout and "were not scored" in r.stdout
    rec = json.loads((out / "bench.json").read_text())
    assert rec["kind"] == "bench" and sorted(rec["results"]) == sorted(BENCHMARKS) and rec["fingerprint"]
    quilt = json.loads((out / "quilt_vqa" / "result.json").read_text())
    assert quilt["unscored"][0]["answer"] == "It is hard to say from one tile." and set(quilt["by_category"]) == {
        "closed",
        "open",
    }


def test_scores_are_the_published_metrics_to_the_last_bit(run1):
    "What `qllava metrics` (bit-parity with the reference evaluation) gives on the same files."
    out, _ = run1
    pv = json.loads((out / "path_vqa" / "result.json").read_text())["metrics"]
    m = evaluate_files(out / "path_vqa" / "gt.json", out / "path_vqa" / "answers.jsonl", quilt=True)
    assert pv["recall"]["value"] == m["recall"] and pv["yes_no_accuracy"]["value"] == m["yes_no_accuracy"]
    pmc = json.loads((out / "pmc_vqa" / "result.json").read_text())["metrics"]
    assert (
        pmc["choice_accuracy"]["value"]
        == evaluate_files(out / "pmc_vqa" / "gt.json", out / "pmc_vqa" / "answers.jsonl")["choice_accuracy"]
    )
    q = [json.loads(l) for l in (out / "path_vqa" / "questions.jsonl").read_text().splitlines()]
    closed = [x for x in q if x["category"] == "closed"]
    assert closed and all(x["text"].endswith("Please choose from the following two options: [yes, no]") for x in closed)


def test_interrupted_answers_resume_without_recomputing(bed, run1):
    d, env = bed
    out, _ = run1
    again = d / "resumed"
    shutil.copytree(out, again)
    ans = (again / "quilt_vqa" / "answers.jsonl").read_text().splitlines()
    (again / "quilt_vqa" / "answers.jsonl").write_text("\n".join(ans[:10]) + "\n")  # as a run killed after 10 answers
    r = qllava(
        ["bench", "--model-path", d / "ckpt", "--benchmarks", "quilt_vqa", "--out", again, "--max-new-tokens", "12"],
        env,
    )
    assert r.returncode == 0, r.stderr
    assert "quilt_vqa: 14 answered now, 10 already there" in r.stderr
    texts = lambda p: {x["question_id"]: x["text"] for x in map(json.loads, p.read_text().splitlines())}
    assert texts(again / "quilt_vqa" / "answers.jsonl") == texts(out / "quilt_vqa" / "answers.jsonl")
    assert (
        json.loads((again / "quilt_vqa" / "result.json").read_text())["metrics"]
        == json.loads((out / "quilt_vqa" / "result.json").read_text())["metrics"]
    )


def test_a_missing_cache_is_one_clear_error_before_any_model_loads(bed, tmp_path):
    d, env = bed
    r = qllava(
        ["bench", "--model-path", d / "ckpt", "--benchmarks", "path_vqa", "--out", tmp_path / "o"],
        {**env, "HF_HUB_CACHE": str(tmp_path / "empty")},
    )
    assert r.returncode == 2
    assert "benchmark path_vqa: dataset flaviagiammarino/path-vqa is not in the Hugging Face cache" in r.stderr
    assert "hf download --repo-type dataset flaviagiammarino/path-vqa" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "o").rglob("answers.jsonl"))
    r = qllava(["bench", "--model-path", d / "ckpt", "--benchmarks", "vqa_rad"], env)
    assert r.returncode == 2 and "unknown benchmark 'vqa_rad'. Fix: use one of quilt_vqa" in r.stderr


@pytest.mark.parametrize(
    "bench, message",
    [
        (
            Benchmark("t_split", "wisdomik/Quilt_VQA", "test", ("image", "question"), lambda r, i: {}),
            "benchmark t_split: dataset wisdomik/Quilt_VQA has no split 'test'",
        ),
        (
            Benchmark(
                "t_column", "flaviagiammarino/path-vqa", "test", ("image", "question", "answer_type"), lambda r, i: {}
            ),
            "benchmark t_column: dataset flaviagiammarino/path-vqa has no column 'answer_type' "
            "(it has image, question, answer)",
        ),
    ],
)
def test_a_wrong_split_or_column_names_the_dataset_and_the_fix(bed, tmp_path, monkeypatch, bench, message):
    d, env = bed
    for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(k, env[k])
    register_benchmark(bench)
    try:
        with pytest.raises(DataError, match="Fix: the cache holds another version") as e:
            prepare_benchmarks(BenchConfig(model_path=str(d / "ckpt"), benchmarks=(bench.name,), out_dir=str(tmp_path)))
        assert message in str(e.value)
        assert not list(tmp_path.rglob("*.jsonl"))
    finally:
        BENCHMARKS.pop(bench.name)


def test_two_runs_compare_with_paired_tests(bed, run1):
    d, env = bed
    out, _ = run1
    r = qllava(
        [
            "bench",
            "--model-path",
            d / "ckpt",
            "--benchmarks",
            "quilt_vqa,pmc_vqa",
            "--out",
            d / "run2",
            "--max-new-tokens",
            "12",
            "--yes-no-prompt",
        ],
        env,
    )
    assert r.returncode == 0, r.stderr
    r = qllava(["bench", "--compare", out, d / "run2", "--json"], env)
    assert r.returncode == 0, r.stderr
    cmp = json.loads(r.stdout)
    assert sorted(cmp) == ["pmc_vqa", "quilt_vqa"]  # the benchmarks both runs hold
    yn = cmp["quilt_vqa"]["yes_no_accuracy"]
    assert yn["test"] == "McNemar exact" and 0 <= yn["p_value"] <= 1 and yn["diff"]["n"] == 15
    assert abs(yn["diff"]["value"] - (yn["mean_b"] - yn["mean_a"])) < 1e-9
    assert cmp["quilt_vqa"]["recall"]["test"] == "paired bootstrap"
    same = json.loads(qllava(["bench", "--compare", out, out, "--json"], env).stdout)
    assert all(m["diff"]["value"] == 0 and m["p_value"] == 1.0 for b in same.values() for m in b.values())
    table = qllava(["bench", "--compare", out, d / "run2"], env).stdout
    assert "run2 - run1 [95 % CI]" in table and "McNemar exact" in table


def test_the_eval_notebook_runs_benchmarks_with_a_forest_plot(bed, tmp_path):
    d, env = bed
    out = tmp_path / "eval.ipynb"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            REPO / "nbs" / "eval.ipynb",
            out,
            "-p",
            "checkpoint",
            d / "ckpt",
            "-p",
            "benchmarks",
            "quilt_vqa,pmc_vqa",
            "-p",
            "run_dir",
            tmp_path / "ev",
            "-p",
            "max_new_tokens",
            "8",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = json.dumps(outputs)
    assert (
        "quilt_vqa (n=23)" in text
        and "pmc_vqa (n=24)" in text
        and "Only the published benchmarks are evaluated" in text
    )
    assert sorted(json.loads((tmp_path / "ev" / "bench" / "bench.json").read_text())["results"]) == [
        "pmc_vqa",
        "quilt_vqa",
    ]
    assert not (tmp_path / "ev" / "answers.jsonl").exists()  # the demo questions were not answered


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the published Quilt-LLaVA review tables are not at {SHARED}")
def test_the_published_gpt_review_replays_against_an_openai_compatible_judge(bed, tmp_path):
    from qllava.evaluation.review import LocalJudge
    from qllava.workflows.evalrun import reference_overlap_judge

    d, env = bed
    qs = [json.loads(l) for l in (SHARED / "questions.jsonl").read_text().splitlines()][:12]
    (tmp_path / "img").mkdir()
    for q in qs:
        Image.new("RGB", (40, 40), (200, 120, 160)).save(tmp_path / "img" / q["image"])
    review = ["bench", "--model-path", d / "ckpt", "--review", "--review-tables", SHARED, "--image-folder", tmp_path / "img",
              "--limit", "12", "--max-new-tokens", "12", "--out", tmp_path / "o"]
    with LocalJudge(reply=reference_overlap_judge) as judge:
        r = qllava([*review, "--judge-base-url", judge.url, "--json"], env)
        assert r.returncode == 0, r.stderr
        assert judge.stats["requests"] == 12
    res = json.loads(r.stdout)
    assert res["n"] == 12 and "127.0.0.1" in res["judge"] and res["summary"]["all"]["n"] == 12
    assert res["summary"]["all"]["failed"] == 0 and res["summary"]["all"]["score1"] == 100.0
    pub = res["published"]["Quilt-LLaVA 7B"]["all"]
    assert pub["n"] == 12 and 0 < pub["relative"]  # the published reviews of the same 12 questions
    assert set(res["published"]) == {"Quilt-LLaVA 7B", "Quilt-LLaVA 7B (40k)", "LLaVA-1.5 7B", "LLaVA-Med 7B"}
    table = qllava([*review, "--judge-base-url", "local"], env).stdout
    assert "Quilt-LLaVA 7B (published)" in table and "LLaVA-Med 7B (published)" in table


def test_a_hub_dataset_id_is_a_data_path(bed, monkeypatch):
    d, env = bed
    for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.setenv(k, env[k])
    dp = demo_paths("pathology")
    p = resolve_records_path("wisdomik/QUILT-LLaVA-Instruct-107K")
    assert p.name == "quilt_instruct_107k.json" and "datasets--wisdomik--QUILT-LLaVA-Instruct-107K" in str(p)
    assert p.read_bytes() == dp["finetune"].read_bytes()
    from qllava.workflows.runs import check_train_files

    check_train_files(
        {"data_path": "wisdomik/Quilt-LLaVA-Pretrain", "eval_data_path": "wisdomik/QUILT-LLaVA-Instruct-107K"}
    )
    with pytest.raises(DataError, match="is neither a file here .* nor a hub dataset in the cache"):
        check_train_files({"data_path": "wisdomik/Quilt-LLaVA-Pretrain-typo"})
    r = qllava(
        ["validate-data", "wisdomik/Quilt-LLaVA-Pretrain", "--media-folder", dp["media_folder"], "--template", "plain"],
        env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "quilt_pretrain.json" in r.stdout
