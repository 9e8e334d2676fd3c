"""A one-node SLURM cluster for the tests, from Debian's ``slurm-wlm`` and ``munge``, in a temporary folder.

:func:`start_cluster` writes a ``slurm.conf`` (this host as the only node, with its CPUs and memory; no cgroups:
``proctrack/linuxproc``, ``task/none``), starts ``munged``, ``slurmctld`` and ``slurmd`` on free ports with every
state, spool, socket, log and pid file in that folder, and waits until the node is idle. :meth:`Cluster.stop`
cancels the jobs left, stops the daemons by their pid files and removes the folder. Where the packages are
missing they are installed with ``apt-get`` (root only); :func:`missing_reason` says why the cluster cannot be had.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
PACKAGES = ("slurm-wlm", "munge")


def _missing_programs() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=path) is None]


def missing_reason() -> str | None:
    """None when the programs are there (after installing them with apt-get as root), else why not."""
    if not _missing_programs():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"SLURM test cluster needs {', '.join(_missing_programs())} (Debian: apt-get install "
                f"{' '.join(PACKAGES)}); not root or no apt-get here, so they cannot be installed")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:  # no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or _missing_programs():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or name


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict[str, str]
    pid_files: list[Path] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, check=check, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of one job (or array task, ``ID_TASK``) as a dict."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def array_tasks(self, array_id: str) -> dict[int, dict[str, str]]:
        out = self.run("scontrol", "show", "job", "--oneliner", array_id).stdout
        tasks = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]
        return {int(t["ArrayTaskId"]): t for t in tasks if t.get("ArrayTaskId", "").isdigit()}  # not "3-4": pending

    def wait(self, *job_ids: str, timeout: float = 1200) -> None:
        """Until none of the jobs (array tasks included; no ids: no job at all) is in the queue any more."""
        end = time.monotonic() + timeout
        left: list[str] = []
        while time.monotonic() < end:
            out = self.run("squeue", "--noheader", "--format", "%i", check=False).stdout
            left = [job for job in out.split() if not job_ids or job.split("_")[0] in job_ids]
            if not left:
                return
            time.sleep(1)
        raise TimeoutError(f"jobs {job_ids} still queued after {timeout} s: {left}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"{log.name}: " + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Cancel every job, stop the daemons (SIGTERM, then SIGKILL), remove the folder."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.run("scancel", "--user", str(os.getuid()), check=False, timeout=20)
            self.wait(timeout=60)
        for pid_file in reversed(self.pid_files):  # slurmd, slurmctld, munged
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(root: Path) -> Cluster:
    """Configure and start the cluster in ``root``; stop it (:meth:`Cluster.stop`) whatever happens next."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o700)
    sock = root / "munge.sock"
    host = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    user = pwd.getpwuid(os.getuid()).pw_name  # the account, whatever $USER says
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=siamesetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
KillWait=10
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SBATCH_PARTITION", "SBATCH_ACCOUNT"):
        env.pop(name, None)  # a CI job that itself runs under SLURM must not leak its job into ours
    cluster = Cluster(root, conf, env, [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"])
    try:
        subprocess.run([_sbin("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                        f"--seed-file={root / 'munge' / 'seed'}"], check=True, capture_output=True, env=env)
        for daemon in ("slurmctld", "slurmd"):
            proc = subprocess.run([_sbin(daemon)], capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:  # say why: the daemon's own words and its log, before stop() removes it
                raise RuntimeError(f"{daemon} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}\n"
                                   f"{cluster.log_tail()}")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            state = cluster.run("sinfo", "--noheader", "--format", "%T", check=False).stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is '{state}', not idle, after 60 s:\n{cluster.log_tail()}")
    except BaseException:
        cluster.stop()
        raise
