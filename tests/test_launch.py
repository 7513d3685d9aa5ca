"""End-to-end tests of qllava.cluster.launch with real launchers and real processes (no mocks).

deepspeed on 2 CPU ranks (gloo), deepspeed and torchrun node launchers on loopback standing in for two machines,
the generated Slurm script and hostfile command, a failing child and a hung rank.
The first deepspeed launch on a fresh machine also compiles DeepSpeed's shared-memory comm op (~40 s, cached in
~/.cache/torch_extensions afterwards)."""
import json, os, sys, textwrap, threading, time
from pathlib import Path

import pytest

from qllava.core import ConfigError, LaunchError
from qllava.cluster.launch import (LaunchSpec, SlurmSpec, build_command, free_port, gpu_count, hostfile_text, launch, read_heartbeats,
                           resolve_spec, sbatch_script, shell_join)

pytestmark = pytest.mark.timeout(600)  # generous: a first DeepSpeed comm-op build under load takes minutes

# One script for every rank: joins the group (deepspeed.init_distributed or plain torch), all_reduces rank+1,
# writes what it saw to OUT/rank{R}.json, reports progress and heartbeats as the trainer will.
RANK_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from qllava.cluster.launch import heartbeat, report_progress, dist_backend
    heartbeat("startup")
    out, how = Path(sys.argv[1]), sys.argv[2]
    import torch, torch.distributed as dist
    heartbeat("init_distributed")
    if how == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend=dist_backend())
    else:
        dist.init_process_group(dist_backend())
    heartbeat("all_reduce", 1)
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    report_progress(1, 1, loss=0.25)
    rec = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(),
           "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "QLLAVA_DIST_BACKEND")},
           "argv": sys.argv[1:]}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(rec))
    dist.barrier()
    heartbeat("done", 1)
    dist.destroy_process_group()
''')


def _ranks(out: Path):
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])


def _script(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_deepspeed_two_cpu_ranks_all_reduce(tmp_path):
    "The CPU fallback: deepspeed starts 2 ranks that see WORLD_SIZE=2, RANK 0/1 and all_reduce over gloo."
    script, out = _script(tmp_path, "rank.py", RANK_SCRIPT), tmp_path / "out"
    out.mkdir()
    spec = resolve_spec(LaunchSpec(launcher="deepspeed", gpus_per_node=0 if gpu_count() else None))  # no GPU: 2 CPU ranks
    assert spec.gpus_per_node == 0 and spec.world_size == 2
    assert build_command(spec, [script])[3:7] == ["deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"]
    run_dir = launch([script, str(out), "deepspeed", "--flag=x y"], tmp_path / "run", spec, hang_timeout=600, echo=False)
    ranks = _ranks(out)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["sum"] == 3.0
        assert r["env"]["RANK"] == str(r["rank"]) and r["env"]["WORLD_SIZE"] == "2"
        assert r["env"]["QLLAVA_DIST_BACKEND"] == "gloo"
        assert r["argv"] == [str(out), "deepspeed", "--flag=x y"]  # entry arguments pass through, no --local_rank
    progress = [json.loads(l) for l in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [(p["step"], p["total"], p["loss"]) for p in progress] == [(1, 1, 0.25)]  # rank 0 only
    assert {b["phase"] for b in read_heartbeats(run_dir).values()} == {"done"}
    rec = json.loads((run_dir / "launch.json").read_text())
    assert rec["exit_code"] == 0 and rec["spec"]["launcher"] == "deepspeed"


def _two_nodes(specs, entry, run_dirs):
    "Start one launch per 'machine' at once, as two hosts would; return the errors (None where it succeeded)."
    errors = [None, None]
    def go(i):
        try: launch(entry, run_dirs[i], specs[i], echo=False)
        except Exception as e: errors[i] = e
    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=180)
    return errors


def test_torchrun_two_node_launchers_on_loopback(tmp_path):
    "Two torchrun node launchers (nnodes=2) meet at a c10d rendezvous on 127.0.0.1 and form one group."
    script, out = _script(tmp_path, "rank.py", RANK_SCRIPT), tmp_path / "out"
    out.mkdir()
    port = free_port()
    specs = [LaunchSpec(launcher="torchrun", nodes=2, gpus_per_node=0, cpu_ranks=1, master_addr="127.0.0.1",
                        master_port=port, rdzv_id=f"test-{os.getpid()}", node_rank=i) for i in range(2)]
    assert build_command(specs[0], ["x.py"]) == build_command(specs[1], ["x.py"])  # c10d: the same command on every node
    run_dir = tmp_path / "run"  # shared by both nodes, as on a cluster file system
    errors = _two_nodes(specs, [script, str(out), "torch"], [run_dir, run_dir])
    assert errors == [None, None], errors
    assert (run_dir / "launch.node0.log").exists() and (run_dir / "launch.node1.log").exists()
    ranks = _ranks(out)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in ranks)
    assert sorted(r["env"]["GROUP_RANK"] for r in ranks) == ["0", "1"]  # one rank on each node


def test_deepspeed_hostfile_two_node_launchers_on_loopback(tmp_path):
    "Many-node deepspeed from a hostfile, one launcher per node (--no_ssh), on loopback."
    script, out = _script(tmp_path, "rank.py", RANK_SCRIPT), tmp_path / "out"
    out.mkdir()
    port = free_port()
    specs = [LaunchSpec(launcher="deepspeed", nodes=2, gpus_per_node=0, cpu_ranks=1, hosts=["node0", "node1"],
                        ssh=False, node_rank=i, master_addr="127.0.0.1", master_port=port) for i in range(2)]
    errors = _two_nodes(specs, [script, str(out), "deepspeed"], [tmp_path / "run", tmp_path / "run"])
    assert errors == [None, None], errors
    assert (tmp_path / "run" / "hostfile").read_text() == "node0 slots=1\nnode1 slots=1\n"
    ranks = _ranks(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 and r["sum"] == 3.0 for r in ranks)


ENTRY = ["-m", "qllava.training.train", "--stage", "finetune", "--output_dir", "runs/ft 1"]

EXPECTED_HOSTFILE_COMMAND = (
    "python -u -m deepspeed.launcher.runner --hostfile /runs/ft/hostfile --master_addr 10.1.0.5 --master_port 29500 "
    "--no_local_rank --module qllava.training.train --stage finetune --output_dir 'runs/ft 1'")

EXPECTED_SBATCH = '''\
#!/bin/bash
#SBATCH --job-name=qllava-finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --partition=a100
#SBATCH --output=/runs/ft/slurm-%j.out
# written by qllava.cluster.launch
set -euo pipefail
module load cuda/12.4
export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
export HF_HUB_OFFLINE=1
export QLLAVA_RUN_DIR=/runs/ft
# from the submitting environment, values not written here: WANDB_API_KEY
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=4/" > "/runs/ft/hostfile.$SLURM_JOB_ID"
srun --kill-on-bad-exit=1 bash -c 'python -u -m deepspeed.launcher.runner --hostfile "/runs/ft/hostfile.$SLURM_JOB_ID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_ssh --node_rank "$SLURM_NODEID" --no_local_rank --module qllava.training.train --stage finetune --output_dir '"'"'runs/ft 1'"'"''
'''

EXPECTED_ARRAY = '''\
#!/bin/bash
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=2
#SBATCH --time=24:00:00
#SBATCH --output=/runs/sweep/slurm-%A_%a.out
#SBATCH --array=0-1%1
# written by qllava.cluster.launch
set -euo pipefail
export QLLAVA_RUN_DIR=/runs/sweep
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
case "$SLURM_ARRAY_TASK_ID" in
  0) srun --kill-on-bad-exit=1 python -u -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" -m qllava.training.train --learning_rate 0.0001 ;;
  1) srun --kill-on-bad-exit=1 python -u -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" -m qllava.training.train --learning_rate 0.0002 ;;
  *) echo "no command for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
'''


def test_hostfile_command_and_sbatch_text():
    "The generated hostfile, deepspeed many-node command and Slurm scripts equal the expected text."
    assert hostfile_text(["gpu-a", "gpu-b"], 4) == "gpu-a slots=4\ngpu-b slots=4\n"
    spec = LaunchSpec(nodes=2, gpus_per_node=4, hosts=["gpu-a", "gpu-b"], hostfile="/runs/ft/hostfile",
                      master_addr="10.1.0.5", master_port=29500, python="python")
    assert shell_join(build_command(spec, ENTRY)) == EXPECTED_HOSTFILE_COMMAND
    slurm = SlurmSpec(job_name="qllava-finetune", partition="a100", time="08:00:00", cpus_per_task=32,
                      setup=["module load cuda/12.4"])
    spec = LaunchSpec(nodes=2, gpus_per_node=4, python="python", env={"HF_HUB_OFFLINE": "1", "WANDB_API_KEY": "abc123secret"})
    assert sbatch_script(spec, slurm, [ENTRY], "/runs/ft") == EXPECTED_SBATCH
    sweep = [["-m", "qllava.training.train", "--learning_rate", str(lr)] for lr in (1e-4, 2e-4)]
    text = sbatch_script(LaunchSpec(launcher="torchrun", gpus_per_node=2, python="python"),
                         SlurmSpec(job_name="sweep", array_parallel=1), sweep, "/runs/sweep")
    assert text == EXPECTED_ARRAY


def test_slurm_script_is_valid_bash_and_submission_is_explained(tmp_path, capsys):
    "Not submitted (a dry run), launch writes the script (valid bash) and prints the exact command to submit it."
    import subprocess
    job = launch(ENTRY, tmp_path, LaunchSpec(launcher="torchrun", nodes=2, gpus_per_node=8),
                 slurm=SlurmSpec(partition="gpu"), submit=False)
    assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0
    assert job.job_id is None and job.command == ["sbatch", str(job.script)]
    assert f"sbatch {job.script}" in capsys.readouterr().out


def test_requeueing_srun_script_is_valid_bash_and_requeues_on_the_preempted_exit_code(tmp_path):
    import subprocess
    job = launch(["-m", "qllava.training.train", "--stage", "lora"], tmp_path, LaunchSpec(launcher="srun", gpus_per_node=4),
                 slurm=SlurmSpec(requeue=True, signal_s=300), submit=False)
    text = job.script.read_text()
    assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0
    for line in ["#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --requeue", "#SBATCH --signal=USR1@300",
                 "#SBATCH --open-mode=append", 'if [ "$rc" -eq 75 ]; then', '  scontrol requeue "$SLURM_JOB_ID"']:
        assert line in text.splitlines(), line
    assert "srun --kill-on-bad-exit=1 --export=ALL,QLLAVA_RANKS=slurm" in text and "--resume_from_checkpoint last || rc=$?" in text
    with pytest.raises(ConfigError, match="requeue needs launcher 'srun'"):
        launch(ENTRY, tmp_path, LaunchSpec(launcher="deepspeed", gpus_per_node=4), slurm=SlurmSpec(requeue=True), submit=False)
    with pytest.raises(ConfigError, match="inside a Slurm job"): launch(ENTRY, tmp_path, LaunchSpec(launcher="srun"))


def test_failing_child_surfaces_last_lines_and_exit_code(tmp_path):
    "A child that fails: LaunchError carries its exit code and last 40 lines, and the log holds everything."
    script = _script(tmp_path, "fail.py", "import sys\nfor i in range(100): print('step', i)\n"
                                          "print('ValueError: bad record 17', file=sys.stderr)\nsys.exit(7)\n")
    with pytest.raises(LaunchError) as ei:
        launch([script], tmp_path / "run", LaunchSpec(launcher="python"), echo=False)
    e = ei.value
    assert e.exit_code == 7 and len(e.tail) == 40
    assert e.tail[-1] == "ValueError: bad record 17" and e.tail[0] == "step 61"
    assert "exit code 7" in str(e) and "bad record 17" in str(e) and "step 60\n" not in str(e)
    assert "step 0\n" in (tmp_path / "run" / "launch.log").read_text()


def test_failing_rank_under_torchrun(tmp_path):
    "One of 2 torchrun ranks raises: the launch fails with a nonzero exit code and the rank's error in the message."
    script = _script(tmp_path, "fail_rank.py", "import os\nif os.environ['RANK'] == '1': raise ValueError('bad record 17 on rank 1')\n"
                                               "import time; time.sleep(1)\n")
    with pytest.raises(LaunchError) as ei:
        launch([script], tmp_path / "run", LaunchSpec(launcher="torchrun", gpus_per_node=0), echo=False)
    assert ei.value.exit_code != 0 and "ValueError: bad record 17 on rank 1" in str(ei.value)
    assert ei.value.first_error[-1] == "ValueError: bad record 17 on rank 1"  # torchrun's own report came after it
    assert str(ei.value).startswith("the launch failed: rank 1") and "failed first: it exited with exit code 1" in str(ei.value)


HANG_SCRIPT = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from qllava.cluster.launch import heartbeat
    rank = int(os.environ["RANK"])
    (Path(sys.argv[1]) / f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1:
        heartbeat("load_batch", 3)
        time.sleep(3600)             # hung: no heartbeat ever again
    while True:                      # rank 0 stays alive and keeps reporting
        heartbeat("all_reduce", 3)
        time.sleep(0.3)
''')


def test_hung_rank_is_named_with_its_phase_and_killed(tmp_path):
    "A rank silent for hang_timeout is reported with its rank and phase, and every process of the launch is gone."
    import psutil
    script, out = _script(tmp_path, "hang.py", HANG_SCRIPT), tmp_path / "out"
    out.mkdir()
    t0 = time.time()
    with pytest.raises(LaunchError) as ei:
        launch([script, str(out)], tmp_path / "run", LaunchSpec(launcher="torchrun", gpus_per_node=0),
               hang_timeout=4, echo=False, grace=3)
    took = time.time() - t0
    msg = str(ei.value)
    assert "rank 1 is hung" in msg and "'load_batch' at step 3" in msg, msg
    assert "rank 0 in 'all_reduce' step 3" in msg and "rank 0 is hung" not in msg
    assert took < 30, took
    pids = [int((out / f"pid{r}").read_text()) for r in (0, 1)]
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert json.loads((tmp_path / "run" / "launch.json").read_text())["hung"].startswith("rank 1 is hung")


def test_secrets_are_named_never_logged(tmp_path):
    "Environment values never reach the log: names are listed, secret values masked in the child's output."
    script = _script(tmp_path, "leak.py", "import os\nprint('token', os.environ['HF_TOKEN'])\n")
    run_dir = launch([script], tmp_path / "run", LaunchSpec(launcher="python", env={"HF_TOKEN": "hf_supersecret42"}), echo=False)
    log = (run_dir / "launch.log").read_text()
    assert "hf_supersecret42" not in log and "token ***" in log and "HF_TOKEN" in log
    assert "hf_supersecret42" not in (run_dir / "launch.json").read_text()


KILL_SCRIPT = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from qllava.cluster.launch import dist_backend, heartbeat
    out = Path(sys.argv[1])
    dist.init_process_group(dist_backend())
    rank = dist.get_rank()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    t = torch.ones(1)
    for step in range(100000):      # both ranks all_reduce until one of them is killed
        heartbeat("all_reduce", step)
        dist.all_reduce(t)
        if step == 3: (out / f"ready{rank}").write_text("1")
        time.sleep(0.05)
''')


def test_rank_killed_by_a_signal_is_named_with_the_signal(tmp_path):
    "deepspeed, 2 CPU ranks: rank 1 gets SIGKILL (as from the OOM killer): the error names rank 1 and SIGKILL, not 'exit code 247'."
    import signal
    script, out = _script(tmp_path, "kill.py", KILL_SCRIPT), tmp_path / "out"
    out.mkdir()
    def kill_rank1():
        for _ in range(1200):
            if (out / "ready0").exists() and (out / "ready1").exists(): break
            time.sleep(0.1)
        os.kill(int((out / "pid1").read_text()), signal.SIGKILL)
    killer = threading.Thread(target=kill_rank1, daemon=True)
    killer.start()
    with pytest.raises(LaunchError) as ei:
        launch([script, str(out)], tmp_path / "run", LaunchSpec(launcher="deepspeed", gpus_per_node=0), hang_timeout=300, echo=False)
    killer.join(5)
    e, pid1 = ei.value, int((out / "pid1").read_text())
    head = str(e).splitlines()[0]
    assert head.startswith(f"the launch failed: rank 1 (pid {pid1}) was killed by SIGKILL (signal 9)"), head
    assert "exit code" not in head and "247" not in head and "out-of-memory killer" in str(e)
    assert e.failed_rank["rank"] == 1 and e.failed_rank["status"] == {"signal": 9}
    assert e.exit_code != 0 and "--- first error printed ---" not in str(e)   # rank 0's gloo error is not offered as the cause
    rec = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert rec["failed_rank"]["rank"] == 1 and rec["failed_rank"]["pid"] == pid1
