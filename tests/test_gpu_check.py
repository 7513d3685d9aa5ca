"""The prepared GPU check (bench/gpu_check.py) keeps working: its --smoke run (the same phases on CPU at a tiny
shape, float32) finishes and writes every row, so the script is ready whenever a GPU machine is at hand."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, json.loads((out / "gpu_smoke.json").read_text()), time.time() - t, p.stdout


def rows(res, phase):
    return [r for r in res["rows"] if r["phase"] == phase]


def test_files_and_environment(smoke):
    out, res, seconds, stdout = smoke
    assert (out / "gpu_smoke.md").exists() and not (out / "gpu.json").exists() and not (out / "gpu.md").exists()
    assert res["mode"] == "smoke" and res["env"]["device"] == "cpu" and res["dtype"] == "float32"
    assert res["env"]["versions"]["torch"] and res["env"]["versions"]["transformers"] and res["env"]["versions"]["peft"]
    assert res["peak"]["flops"] > 0 and res["peak"]["n"] == 512
    assert res["param_counts"]["llm_matmul"] > 0 and res["param_counts"]["image_tokens"] == 16
    assert {"stage1", "lora", "full", "qlora", "terms"} <= set(res["formulas"])
    print(f"gpu_check --smoke: {seconds:.1f} s")


@pytest.mark.parametrize("phase", ["stage1", "lora", "full"])
def test_training_rows(smoke, phase):
    _, res, _, _ = smoke
    (r,) = rows(res, phase)
    assert r["status"] == "ok", r
    assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["steps"] >= 1
    assert r["model_flops_per_token"] > 0 and 0 < r["mfu"] <= r["hfu"] and r["peak_mem_gb"] > 0
    assert 0 <= r["padding_share"] < 0.5 and r["mean_len"] > res["param_counts"]["image_tokens"]
    pc = res["param_counts"]
    if phase == "full":    # 6 x matmul weights per token, plus attention, projector and encoder terms
        assert r["model_flops_per_token"] >= 6 * pc["llm_matmul"] and r["gradient_checkpointing"]
        assert r["trainable_params"] >= pc["llm_total"]
    if phase == "lora":    # frozen base (4x) + adapters (6x)
        assert r["lora_params"] > 0 and r["model_flops_per_token"] >= 4 * pc["llm_matmul"] + 6 * r["lora_params"]
        assert r["model_flops_per_token"] < 6 * pc["llm_matmul"] and r["hfu"] > r["mfu"]
    if phase == "stage1":  # projector only, no recompute
        assert r["lora_params"] == 0 and r["trainable_params"] == pc["projector"] + 2 * res["shapes"]["llm"]["hidden_size"]
        assert r["hfu"] == r["mfu"]


def test_packed_row_trains_the_same_samples_in_fewer_rows(smoke):
    "full_packed: the same batches as full, packed; the same model FLOPs per token (padding is not model work)."
    _, res, _, _ = smoke
    (full,), (packed,) = rows(res, "full"), rows(res, "full_packed")
    assert packed["status"] == "ok" and packed["packed"] and not full["packed"], packed
    assert packed["tokens_per_step"] == full["tokens_per_step"] and packed["model_flops_per_token"] == full["model_flops_per_token"]
    assert packed["rows_per_step"] < full["rows_per_step"] == full["batch"]   # sdpa here: rows of max_length
    assert packed["padding_share"] < full["padding_share"]


def test_answers_identical(smoke):
    _, res, _, _ = smoke
    (r,) = rows(res, "answers")
    assert r["status"] == "ok", r
    assert r["identical_answers"] and r["n_different"] == 0 and r["compared"] == r["prompts"] == 8
    assert r["batch1_answers_per_s"] > 0 and r["batched_answers_per_s"] > 0


def test_optional_phases_and_markdown(smoke):
    out, res, _, _ = smoke
    (q,) = rows(res, "qlora")
    assert q["status"] == "skipped" and "CUDA" in q["reason"]  # recorded, not crashed
    md = (out / "gpu_smoke.md").read_text()
    for word in ("MFU", "HFU", "peak memory", "samples/s", "tokens/s", "identical answers", "stage 1 >= 50 samples/s",
                 "skipped: QLoRA needs CUDA"):
        assert word in md, word
    assert [t["what"] for t in res["targets"]] == ["stage 1 >= 50 samples/s", "stage-2 LoRA >= 40 % MFU", "full stage 2 >= 35 % MFU"]
