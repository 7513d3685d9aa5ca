"""Hyperparameter sweeps end to end: real papermill executing nbs/sweep.ipynb and nbs/train.ipynb, the real DeepSpeed
launcher with 2 CPU ranks, nothing mocked.

Kept cheap: the IMU demo, one epoch per run, one stage-1 projector made once for the module (the way a sweep makes
it), no blank-media control. One of the four combinations carries a learning rate the train notebook refuses, so
the sweep has to report it and finish the other three.
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

from qllava.workflows import runs, sweep
from qllava.core import LaunchError
from qllava.cluster.launch import SlurmSpec

pytestmark = pytest.mark.timeout(1200)
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
LRS = [2e-3, 1e-3]
MAX_LENGTHS = [512, 16]  # 16 leaves no answer token in any record: those runs fail in training (validation refuses the data)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    "The shared stage-1 IMU projector, made once for the module by the sweep's own stage-1 step."
    d = tmp_path_factory.mktemp("stage1")
    rec = sweep.plan_sweep({"runs_dir": str(d), "modality": ["sensor"]})
    adapters = sweep.ensure_stage1(rec)
    assert Path(adapters["sensor"]).is_file()
    return adapters["sensor"]


def sweep_values(runs_dir, adapter, **kw):
    return {"learning_rate": LRS, "num_train_epochs": [1.0], "modality": ["sensor"], "stage": ["finetune"],
            "pretrain_mm_mlp_adapter": adapter, "metric": "open_accuracy", "runs_dir": str(runs_dir),
            "train_parameters": {"model_max_length": MAX_LENGTHS}, "sweep_name": "imu-lr", **kw}


@pytest.fixture(scope="module")
def swept(stage1, tmp_path_factory, keep_for_docs):
    "The sweep notebook executed by papermill: 4 combinations, two of them failing in training."
    import papermill as pm
    d = tmp_path_factory.mktemp("sweeps")
    t0 = time.time()
    pm.execute_notebook(str(ROOT / "nbs" / "sweep.ipynb"), str(d / "sweep.ipynb"), parameters=sweep_values(d, stage1),
                        progress_bar=False, cwd=str(d))
    keep_for_docs(d / "sweep.ipynb", "run-sweep.ipynb")
    return d, d / "imu-lr", time.time() - t0


def test_four_run_sweep_ranks_the_finished_runs_and_reports_the_failed_ones(swept):
    d, sd, seconds = swept
    rec = json.loads((sd / "sweep.json").read_text())
    status = {(r["parameters"]["learning_rate"], r["parameters"]["model_max_length"]): r["status"] for r in rec["runs"]}
    assert status == {(2e-3, 512): "finished", (1e-3, 512): "finished", (2e-3, 16): "failed", (1e-3, 16): "failed"}, status
    for failed in (r for r in rec["runs"] if r["status"] == "failed"):   # each with its last lines: the data it refused
        assert any("skip_bad_records" in l or "no supervised token" in l for l in failed["error"]), failed["error"]
    for r in rec["runs"]:
        if r["status"] != "finished": continue
        run_dir = sd / r["name"]
        assert sweep.run_finished(run_dir, r["parameters"])  # executed notebook + run.json for these parameters
        assert r["metrics"]["open_accuracy"] is not None and r["metrics"]["final_loss"] > 0
        assert json.loads((run_dir / "run.json").read_text())["parameters"]["blank_media_control"] is False
        assert [s["name"] for s in json.loads((run_dir / "run.json").read_text())["stages"]] == ["finetune"]  # stage 1 shared
    table = sweep.results_table(rec)
    done = table[table.status == "finished"]
    ranked = list(zip(-done["open_accuracy"], done["final_loss"]))  # best accuracy first, ties by lower final loss
    assert ranked == sorted(ranked) and list(table["status"])[2:] == ["failed", "failed"]
    assert (sd / "metric.png").stat().st_size > 1000 and (sd / "tasks.tsv").read_text().count("\n") == 5
    nb = json.loads((d / "sweep.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outs)  # the metric plot (and the IMU sample plot)
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for o in outs)
    assert "open_accuracy" in html and "final_loss" in html and "rank" in html
    text = "".join("".join(o.get("text", "")) for o in outs) + "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in outs)
    assert "skip_bad_records" in text or "no supervised token" in text  # the failed runs' last lines, in the notebook
    for r in done["run"]: assert (sd / r / "heldout_scores.jsonl").is_file()   # per question, for paired tests
    assert "Against the best run" in text and "McNemar p" in html                 # the runner-up against the winner
    print(f"4-run sweep (2 runs + 2 failing) took {seconds:.0f} s")


def test_rerun_runs_nothing_new(swept, stage1):
    d, sd, _ = swept
    before = {p: p.stat().st_mtime for p in sd.glob("*/train.ipynb")}
    t0 = time.time()
    rec = sweep.run_sweep(sweep_values(d, stage1, retry_failed=False))
    assert rec["executed"] == [] and time.time() - t0 < 30
    assert {p: p.stat().st_mtime for p in sd.glob("*/train.ipynb")} == before
    assert [r["status"] for r in rec["runs"]].count("finished") == 2
    # the same through the array task entry point: a finished combination is skipped at once
    p = subprocess.run([sys.executable, "-m", "qllava.workflows.sweep", "task", str(sd), "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {p: p.stat().st_mtime for p in sd.glob("*/train.ipynb")} == before


def test_runs_lists_and_compares_the_sweep_runs(swept):
    d, sd, _ = swept
    df = runs.list_runs(sd)
    assert len(df) == 2 and set(df["modality"]) == {"sensor"} and df["open_accuracy"].notna().all()
    p = subprocess.run([sys.executable, "-m", "qllava.workflows.sweep", "status", str(sd)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "failed" in p.stdout and "finetune-sensor-lr0.002-plr0.002-ep1" in p.stdout


def test_a_bad_combination_stops_the_whole_sweep_before_anything_runs(tmp_path):
    "A negative rate in one combination: the sweep refuses at once, naming the run and the parameter; no folder is made."
    t0 = time.time()
    with pytest.raises(sweep.ConfigError) as e:
        sweep.run_sweep({"learning_rate": [1e-3, -1.0], "modality": ["sensor"], "runs_dir": str(tmp_path), "sweep_name": "bad"})
    assert time.time() - t0 < 10 and "run finetune-sensor-lr-1-plr-1-ep120 would be refused" in str(e.value)
    assert "learning_rate=-1.0 is negative" in str(e.value) and not (tmp_path / "bad").exists()


EXPECTED_ARRAY = """#!/bin/bash
#SBATCH --job-name=qllava-imu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --time=02:00:00
#SBATCH --partition=gpu
#SBATCH --output=/scratch/sweeps/imu/slurm-%A_%a.out
#SBATCH --array=0-3%2
# written by qllava.workflows.sweep: task i runs combination i of tasks.tsv
set -euo pipefail
module load cuda/12.4
source .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
python -m qllava.workflows.sweep task /scratch/sweeps/imu "$SLURM_ARRAY_TASK_ID"
"""


def test_slurm_array_script_matches_expected_text():
    s = sweep.sweep_array_script("/scratch/sweeps/imu", 4, SlurmSpec(job_name="qllava-imu", time="02:00:00", partition="gpu",
                                 array_parallel=2, setup=["module load cuda/12.4", "source .venv/bin/activate"]), gpus_per_node=4)
    assert s == EXPECTED_ARRAY


def test_slurm_launcher_without_sbatch_writes_the_scripts_and_says_how_to_submit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm command on it (tests/test_slurm.py submits for real)
    v = {"learning_rate": [1e-3, 2e-3], "modality": ["sensor"], "launcher": "slurm", "runs_dir": str(tmp_path),
         "sweep_name": "s", "slurm_gpus": 2, "slurm_partition": "gpu"}
    with pytest.raises(LaunchError, match="sbatch is not on PATH here") as e: sweep.run_sweep(v)
    sd = tmp_path / "s"
    array = (sd / "sweep_array.sbatch").read_text()
    assert "#SBATCH --array=0-1" in array and "#SBATCH --gpus-per-node=2" in array and "#SBATCH --partition=gpu" in array
    assert "qllava.workflows.sweep stage1" in (sd / "stage1.sbatch").read_text()  # no projector yet: stage 1 is its own job
    assert f"jid=$(sbatch --parsable {sd}/stage1.sbatch) && sbatch --dependency=afterok:$jid {sd}/sweep_array.sbatch" in str(e.value)
    assert (sd / "tasks.tsv").read_text().splitlines()[2].startswith("1\tfinetune-sensor-lr0.002-plr0.002-ep120\t")
