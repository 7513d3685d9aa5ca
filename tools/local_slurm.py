"""A one-node Slurm cluster on 127.0.0.1 for the tests: Debian's `slurm-wlm` and `munge`, run as root.

`python tools/local_slurm.py start DIR` writes DIR/slurm.conf, starts munged, slurmctld and slurmd over a scratch state
folder and waits until the node takes jobs; clients then need `SLURM_CONF=DIR/slurm.conf` (printed). `stop DIR` ends
them. Nothing under /etc is changed: the munge key, socket and every Slurm file live in DIR.
Written by hand because no library starts a throwaway Slurm (containers are what people use; none run here).
"""
import os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path

NODE = socket.gethostname()  # the real host name: jobs resolve it (MASTER_ADDR comes from the node list)
PARTITION = "debug"
TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")

def missing_tools() -> list[str]:
    "The Slurm / munge programs this machine lacks (empty: a cluster can start)."
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in TOOLS if not shutil.which(t, path=sbin)]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def slurm_conf(d:Path, cpus:int, mem_mb:int) -> str:
    "slurm.conf for one node with `cpus` CPUs (more than the machine has is allowed: config_overrides)."
    ctld, slurmd = free_port(), free_port()
    return f"""ClusterName=qllava-test
SlurmctldHost={NODE}(127.0.0.1)
MailProg=/bin/true
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=86400
KillWait=5
InactiveLimit=0
MaxArraySize=1000
EnforcePartLimits=ALL
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=12:00:00 State=UP OverSubscribe=NO
"""

def _run(cmd:list, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

def start_munge(d:Path, env:dict):
    "munged with its own key and socket in d/munge."
    m = d / "munge"; m.mkdir(parents=True, exist_ok=True); os.chmod(m, 0o700)
    key = m / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024)); os.chmod(key, 0o400)
    _run(["munged", "--force", f"--key-file={key}", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
          f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], env=env)

def wait_idle(env:dict, timeout:float=60) -> None:
    "Wait until the node is idle (it takes jobs); raise with the daemons' logs otherwise."
    t0, out = time.time(), ""
    while time.time() - t0 < timeout:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
        out = (p.stdout + p.stderr).strip()
        if p.returncode == 0 and out.startswith("idle"): return
        time.sleep(0.5)
    logs = "".join(f"\n--- {f}:\n" + Path(env["SLURM_CONF"]).with_name(f).read_text()[-2000:]
                   for f in ("slurmctld.log", "slurmd.log") if Path(env["SLURM_CONF"]).with_name(f).exists())
    raise RuntimeError(f"the local Slurm node did not become idle in {timeout:.0f} s (sinfo: {out!r}){logs}")

def start(d, cpus:int=4, mem_mb:int=16000) -> dict:
    "Start the cluster in folder `d`; returns the environment its clients need (SLURM_CONF)."
    d = Path(d).resolve()
    for sub in ("state", "spool"): (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "slurm.conf"; conf.write_text(slurm_conf(d, cpus, mem_mb))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    start_munge(d, env)
    _run(["slurmctld", "-c", "-f", str(conf)], env=env)  # -c: a clean state, no jobs of an earlier cluster
    _run(["slurmd", "-f", str(conf), "-N", NODE], env=env)
    wait_idle(env)
    return {"SLURM_CONF": str(conf)}

def _kill(pidfile:Path):
    try: os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError): pass

def stop(d):
    "Stop the daemons of the cluster in folder `d` (jobs still running are killed with it)."
    d = Path(d).resolve()
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    for f in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"): _kill(d / f)
    time.sleep(1)

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"): sys.exit("usage: local_slurm.py start|stop DIR")
    if sys.argv[1] == "start":
        if (m := missing_tools()): sys.exit(f"missing {', '.join(m)}: apt-get install slurm-wlm munge")
        print(f"export SLURM_CONF={start(sys.argv[2])['SLURM_CONF']}")
    else: stop(sys.argv[2])
