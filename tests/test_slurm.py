"""Slurm for real: a one-node cluster (Debian's slurm-wlm + munge, started by tools/local_slurm.py) takes a 2-rank
training job through srun, a preempted job that requeues itself and resumes, the sweep notebook's job array, and the
ways a submission goes wrong. Skipped, saying why, where the packages are missing or we are not root (slurmd must be).
"""
import importlib.util, json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qllava.core import LaunchError
from qllava.cluster.launch import LaunchSpec, SlurmSpec, launch
from qllava.cluster.slurm import wait_job
from test_train import data, flags  # the tiny red / blue tile data set and the train flags of test_train

pytestmark = pytest.mark.timeout(1500)
ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("local_slurm", ROOT / "tools" / "local_slurm.py")
local_slurm = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(local_slurm)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    "A one-node Slurm cluster for the module; SLURM_CONF points every client (and submitted job) at it."
    if (missing := local_slurm.missing_tools()):
        pytest.skip(f"no local Slurm: {', '.join(missing)} missing (.ci/run installs slurm-wlm and munge)")
    if os.geteuid() != 0: pytest.skip("the local Slurm runs its daemons as root (as CI does); not root here")
    d = tmp_path_factory.mktemp("slurm")
    env = local_slurm.start(d, cpus=4)
    old = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update(env, PATH=os.environ["PATH"] + ":/usr/sbin")
    yield d
    local_slurm.stop(d)
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


SRUN = LaunchSpec(launcher="srun", gpus_per_node=0, cpu_ranks=2)
TRAIN = dict(num_train_epochs=10, per_device_train_batch_size=4)


def train_job(data, out, **kw):
    "A 2-rank training job (one srun task per rank) that requeues itself when signalled."
    return launch(["-m", "qllava.training.train", *flags(data, out, **TRAIN)], out, spec=SRUN,
                  slurm=SlurmSpec(job_name=out.name, time="00:30:00", requeue=True), **kw)


@pytest.fixture(scope="module")
def whole(cluster, data, tmp_path_factory):
    "An uninterrupted 2-rank job, followed to its end."
    out = tmp_path_factory.mktemp("whole") / "run"
    return train_job(data, out, timeout=900), out


def test_two_rank_job_through_srun_trains_and_streams_its_log(whole, capsys):
    job, out = whole
    assert [t.state for t in job.tasks] == ["COMPLETED"] and job.tasks[0].exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and (out / "model.safetensors").is_file()
    script = (out / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--export=ALL,QLLAVA_RANKS=slurm" in script
    assert "--resume_from_checkpoint last" in script  # a requeued job resumes


def metrics_steps(out):
    f = out / "metrics.jsonl"
    return [r["step"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r] if f.is_file() else []


def test_preempted_job_requeues_itself_and_ends_with_the_same_weights(whole, data, tmp_path):
    _, ref = whole
    out = tmp_path / "preempted"
    job = train_job(data, out, wait=False)
    t0 = time.time()
    while not metrics_steps(out) or max(metrics_steps(out)) < 2:
        assert time.time() - t0 < 600, "the job never reached step 2"
        time.sleep(0.05)
    # what Slurm sends signal_s seconds before the time limit (--signal=USR1@120)
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    tasks = wait_job(job.job_id, timeout=900)
    log = Path(tasks[0].log).read_text()
    assert tasks[0].ok and tasks[0].restarts == 1, (tasks, log[-3000:])
    assert "requeueing job" in log and "resumed from" in log
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), f"{k} differs after the requeue"
    assert metrics_steps(out) == metrics_steps(ref)  # every step logged once


def test_sweep_notebook_runs_a_four_task_array_and_ranks_the_runs(cluster, tmp_path):
    "The sweep notebook with launcher slurm: a stage-1 job, then a 4-task array (two tasks fail in training)."
    import papermill as pm
    from test_sweep import sweep_values
    values = sweep_values(tmp_path, "", launcher="slurm", slurm_time="00:30:00", slurm_parallel=2)
    pm.execute_notebook(str(ROOT / "nbs" / "sweep.ipynb"), str(tmp_path / "sweep.ipynb"), parameters=values,
                        progress_bar=False, cwd=str(tmp_path))
    rec = json.loads((tmp_path / "imu-lr" / "sweep.json").read_text())
    status = {(r["parameters"]["learning_rate"], r["parameters"]["model_max_length"]): r["status"] for r in rec["runs"]}
    want = {(2e-3, 512): "finished", (1e-3, 512): "finished", (2e-3, 16): "failed", (1e-3, 16): "failed"}
    assert status == want, status
    for r in rec["runs"]:  # each run with its array task's end, as Slurm saw it
        assert r["slurm"].startswith(f"{rec['slurm']['array_job']}_{r['index']} ")
        assert ("COMPLETED" in r["slurm"]) == (r["status"] == "finished"), r["slurm"]
    text = json.dumps(json.loads((tmp_path / "sweep.ipynb").read_text())["cells"])
    assert "submitted the stage-1 Slurm job" in text and "executing the train notebook" in text  # logs streamed in
    assert "open_accuracy" in text and "rank" in text


def test_a_task_that_fails_is_named_with_its_log(cluster, tmp_path):
    with pytest.raises(LaunchError) as e:
        entry = ["-m", "qllava.training.train", "--data_path", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "o")]
        launch(entry, tmp_path, spec=SRUN, slurm=SlurmSpec(time="00:05:00"), timeout=300)
    msg = str(e.value)
    assert "FAILED" in msg and "exit code" in msg and str(tmp_path / "slurm-") in msg and "missing.json" in msg, msg


def test_a_rejected_submission_says_what_sbatch_said(cluster, tmp_path):
    for slurm, words in [(SlurmSpec(partition="nope"), "invalid partition"),
                         (SlurmSpec(time="1-00:00:00"), "time limit"),
                         (SlurmSpec(cpus_per_task=64), "more processors requested than permitted")]:
        with pytest.raises(LaunchError, match="sbatch refused") as e:
            launch(["-m", "qllava.training.train"], tmp_path, spec=SRUN, slurm=slurm)
        assert words in str(e.value).lower() and "job.sbatch" in str(e.value), str(e.value)


def test_a_job_that_can_never_start_or_runs_too_long_ends_the_wait(cluster, tmp_path):
    script = tmp_path / "sleep.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/sleep-%j.out\n#SBATCH --time=00:05:00\nsleep 120\n")
    from qllava.cluster.slurm import submit
    job = submit(script)
    t0 = time.time()
    with pytest.raises(LaunchError, match=f"Slurm job {job} had not ended after 3 s") as e:
        wait_job(job, timeout=3, poll=0.5)
    assert f"scancel {job}" in str(e.value) and time.time() - t0 < 30
    subprocess.run(["scancel", job], check=True)
    fail = tmp_path / "fail.sbatch"
    fail.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/fail-%j.out\n#SBATCH --time=00:05:00\nexit 3\n")
    first = submit(fail)
    after = submit(script, [f"--dependency=afterok:{first}"])  # waits on a job that fails: pending for ever
    with pytest.raises(LaunchError, match=f"will never start job {after} PENDING \\(DependencyNeverSatisfied\\)"):
        wait_job(after, timeout=600, poll=0.5)
    subprocess.run(["scancel", after], check=True)


def test_without_sbatch_the_error_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm command on it
    with pytest.raises(LaunchError, match="sbatch is not on PATH") as e:
        launch(["-m", "qllava.training.train"], tmp_path, spec=SRUN, slurm=SlurmSpec())
    assert str(tmp_path / "job.sbatch") in str(e.value)
