"""scripts/hpc/ on a real SLURM scheduler: a one-node cluster (tests/slurm_cluster.py) runs the documented job
array, the group job after it, a cancelled and resubmitted task, a subject submitted twice, and nipype's
SLURMGraph plugin, all on the tiny demo at a coarse grid. The app runs as the installed entry point
(``--runner venv``) with this checkout first on PYTHONPATH; the jobs inherit that environment. Quick tests
without a cluster: submit.sh's argument errors, and the SLURMGraph wait with stand-ins for squeue and scancel.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from bids_siamese.workflows.plugin import wait_for_slurm_graph
from slurm_cluster import Cluster, missing_reason, start_cluster

ROOT = Path(__file__).parents[1]
SUBMIT = ROOT / "scripts" / "hpc" / "submit.sh"
RES = "4"  # the coarsest grid the app allows keeps the jobs quick
APP = ["--resolution", RES, "--skip-bids-validation"]
JOB = ["--runner", "venv", "--cpus", "1", "--mem-gb", "2", "--time", "00:30:00"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    cluster.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def demo(tiny_demo) -> Path:
    return tiny_demo  # shared with test_participant.py


def submit(cluster: Cluster, demo: Path, out: Path, work: Path, *args: str) -> dict[str, str]:
    """scripts/hpc/submit.sh; returns its job ids by kind ('participant array', 'group')."""
    proc = cluster.run("bash", str(SUBMIT), str(demo), str(out), *JOB, "--work-dir", str(work), *args)
    ids = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    return {kind: value.split()[0] for kind, value in ids.items()}


def exit_code(job: dict[str, str]) -> int:
    return int(job["ExitCode"].split(":")[0])


def seconds(job: dict[str, str]) -> float:
    def stamp(value: str) -> float:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))

    return stamp(job["EndTime"]) - stamp(job["StartTime"])


def node_results(work: Path, node: str = "*") -> list[Path]:
    """The result files of the scan workflows' finished nodes (``node``: one node's name)."""
    return sorted(work.glob(f"bids_siamese_wf/scan_*/*_wf/{node}/result_{node}.pklz"))


def same_outputs(subject: str, out: Path, reference: Path) -> int:
    """Assert that ``out`` holds the subject's files of ``reference`` byte for byte; return how many."""
    compared = 0
    for path in sorted((reference / f"sub-{subject}").rglob("*")):
        mine = out / path.relative_to(reference)
        if path.name.endswith("_desc-status_qc.json"):  # provenance (run id, time); the files it lists agree
            assert json.loads(mine.read_text())["files"] == json.loads(path.read_text())["files"]
        elif path.is_file():
            assert mine.read_bytes() == path.read_bytes(), mine
            compared += 1
    return compared


@pytest.fixture(scope="module")
def array_run(slurm, demo, tmp_path_factory):
    """The documented submission: every participant as an array task, then ``group --task orientation``."""
    base = tmp_path_factory.mktemp("slurm_array")
    out = base / "out"
    ids = submit(slurm, demo, out, base / "work", "--", *APP, "--task", "orientation")
    dependency = slurm.job(ids["group"])["Dependency"]  # shown until it is satisfied
    slurm.wait(ids["participant array"], ids["group"])
    return ids, out, dependency


@pytest.mark.slow
@pytest.mark.slurm
def test_array_then_group(slurm, demo, array_run):
    ids, out, dependency = array_run
    subjects = sorted(p.name[4:] for p in demo.glob("sub-*"))
    tasks = slurm.array_tasks(ids["participant array"])
    assert sorted(tasks) == list(range(len(subjects)))  # one task per participant
    logs = {i: (out / "logs" / "slurm" / f"participant_{ids['participant array']}_{i}.out").read_text()
            for i in tasks}
    assert sorted(next(line for line in logs[i].splitlines() if line.startswith("siamese: task")).split()[6][4:]
                  for i in tasks) == subjects
    assert all(exit_code(task) == 0 for task in tasks.values()), logs
    group = slurm.job(ids["group"])
    assert dependency.startswith(f"afterany:{ids['participant array']}_*"), dependency
    assert exit_code(group) == 0, (out / "logs" / "slurm" / f"group_{ids['group']}.out").read_text()
    assert all(group["StartTime"] >= task["EndTime"] for task in tasks.values())  # after every task
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    truth = pd.read_csv(demo / "sourcedata" / "truth" / "scans.tsv", sep="\t")
    assert len(table) == len(truth) and (table["status"] == "ok").all()
    assert (out / "models").is_dir()  # --task orientation reached the group level and trained
    print(f"\nSLURM array: {len(tasks)} tasks, " + ", ".join(f"{seconds(t):.0f} s" for t in tasks.values()) +
          f"; group --task orientation {seconds(group):.0f} s")


@pytest.mark.slow
@pytest.mark.slurm
def test_cancelled_task_resumes_and_double_submission_is_locked(slurm, demo, array_run, tmp_path):
    """The same subject submitted twice at once: one task exits 75 (the subject's lock). The other is cancelled
    mid-run (scancel), resubmitted, resumes from its work dir and ends byte-identical to the array's run; the
    group job of the resubmission lists every scan of the dataset."""
    _, reference, _ = array_run
    subject = "002"  # one scan
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--no-group", "--", *APP, "--participant-label", subject]
    first = submit(slurm, demo, out, work, *args)["participant array"]
    second = submit(slurm, demo, out, work, *args)["participant array"]
    # cancelled as soon as its first nodes are done: brain extraction and the rest (several seconds) still to run,
    # whatever the machine's speed (a cancel after brain extraction raced the scan's end on an idle machine)
    end, states = time.monotonic() + 900, {}
    while time.monotonic() < end:
        states = {job: slurm.job(f"{job}_0") for job in (first, second)}  # both started at once, on a CPU each
        ended = [job for job, info in states.items() if info["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING")]
        if ended and node_results(work, "conform"):
            break
        time.sleep(0.1)
    assert node_results(work, "conform"), f"the first nodes never finished: {states}"
    running = [job for job, info in states.items() if info["JobState"] == "RUNNING"]
    assert len(running) == 1, states
    running = running[0]
    extracted = {p: p.stat().st_mtime_ns for p in node_results(work)}  # finished; the node running now is not
    slurm.run("scancel", running)
    locked = next(job for job in states if job != running)
    assert exit_code(slurm.job(f"{locked}_0")) == 75, states
    log = (out / "logs" / "slurm" / f"participant_{locked}_0.out").read_text()
    assert f"sub-{subject} in {out}" in log and "being processed by" in log

    slurm.wait(running)
    assert slurm.job(f"{running}_0")["JobState"] == "CANCELLED"
    records = list(out.glob(f"sub-{subject}/**/*_desc-status_qc.json"))
    assert not records, (states, [r.read_text() for r in records],  # did not finish
                         (out / "logs" / "slurm" / f"participant_{running}_0.out").read_text()[-3000:])
    assert node_results(work, "conform")[0] in extracted

    ids = submit(slurm, demo, out, work, *args[1:])  # resubmitted, with the group job this time
    again = ids["participant array"]
    slurm.wait(again, ids["group"])
    assert exit_code(slurm.job(f"{again}_0")) == 0, (out / "logs" / "slurm" / f"participant_{again}_0.out").read_text()
    assert {p: p.stat().st_mtime_ns for p in extracted} == extracted  # the nodes done before the cancel: reused
    assert same_outputs(subject, out, reference) >= 14
    # the group job covers the whole dataset (it drops --participant-label): the others are listed as missing
    assert exit_code(slurm.job(ids["group"])) == 0
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    assert len(table) == len(pd.read_csv(demo / "sourcedata" / "truth" / "scans.tsv", sep="\t"))
    assert set(table.loc[table["participant_id"] == f"sub-{subject}", "status"]) == {"ok"}
    assert set(table.loc[table["participant_id"] != f"sub-{subject}", "status"]) == {"missing"}


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_graph_plugin_runs_the_nodes_as_jobs(slurm, demo, array_run, tmp_path):
    """--use-plugin with nipype's SLURMGraph: every node of one participant's graph is a job; the app waits for
    them and writes the same files as the array's MultiProc run."""
    _, reference, _ = array_run
    subject = "003"
    plugin = tmp_path / "plugin.yml"
    plugin.write_text('plugin: SLURMGraph\nplugin_args:\n  dont_resubmit_completed_jobs: true\n'
                      '  sbatch_args: "--cpus-per-task=1 --mem=2G"\n')
    out, work = tmp_path / "out", tmp_path / "work"
    start = time.monotonic()
    proc = slurm.run("bids-siamese", str(demo), str(out), "participant", "--participant-label", subject, "-w",
                     str(work), *APP, "--omp-nthreads", "1", "--use-plugin", str(plugin), check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLURMGraph: waiting for" in proc.stderr
    batch = work / "bids_siamese_wf" / "batch"
    job_logs = sorted(batch.glob("batchscript_*.sh.o"))
    assert len(job_logs) >= 10  # one job per node of the scan's graph
    print(f"\nSLURMGraph: {len(job_logs)} node jobs, participant run {time.monotonic() - start:.0f} s")
    assert same_outputs(subject, out, reference) >= 14
    status = next(out.glob(f"sub-{subject}/**/*_desc-status_qc.json"))
    assert json.loads(status.read_text())["status"] == "ok"


FAKE_SQUEUE = """#!/bin/sh
# first call: three jobs (one stuck behind a failed node, one of another run); then an empty queue
if [ -f "$0.called" ]; then exit 0; fi
touch "$0.called"
echo "11|RUNNING|None|BATCH/batchscript_a.sh"
echo "12|PENDING|DependencyNeverSatisfied|BATCH/batchscript_b.sh"
echo "13|PENDING|Dependency|/elsewhere/batch/batchscript_c.sh"
"""


def test_slurm_graph_wait_cancels_jobs_stuck_behind_a_failed_node(tmp_path, monkeypatch):
    """wait_for_slurm_graph with stand-ins for squeue and scancel: it waits for its own jobs only (their script
    is in its batch folder), cancels the one whose dependency can never be met, and returns when none is left."""
    batch, bin_dir = tmp_path / "batch", tmp_path / "bin"
    batch.mkdir()
    bin_dir.mkdir()
    (batch / "submit_jobs.sh").write_text("#!/usr/bin/env bash\n" + "".join(
        f"j{i}_{n}=$(sbatch -o x -J j{i}_{n} {batch}/batchscript_{n}.sh | awk '{{print $4}}')\n"
        for i, n in enumerate("abc")))
    (bin_dir / "squeue").write_text(FAKE_SQUEUE.replace("BATCH", str(batch)))
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "cancelled"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert wait_for_slurm_graph(batch, since=time.time() + 60) == 0  # an older graph's script: nothing to wait for
    assert not (bin_dir / "squeue.called").exists()
    assert wait_for_slurm_graph(batch, since=0, poll=0.01) == 3
    assert (tmp_path / "cancelled").read_text().split() == ["12"]


@pytest.mark.parametrize("args, code, words", [
    ([], 64, "BIDS_DIR and OUTPUT_DIR are required"),
    (["--runner", "venv"], 64, "BIDS_DIR and OUTPUT_DIR come first"),
    (["BIDS", "OUT", "--runner", "singularity"], 64, "--runner 'singularity' is not one of"),
    (["BIDS", "OUT", "--cpus", "0"], 64, "--cpus '0' is not a positive integer"),
    (["BIDS", "OUT", "--time", "soon"], 64, "--time 'soon' is not a SLURM time"),
    (["BIDS", "OUT", "--resolution", "4"], 64, "unknown option '--resolution'; fix: put the app's options after '--'"),
    (["BIDS", "OUT", "--image"], 64, "--image needs a value"),
    (["BIDS/missing", "OUT"], 66, "BIDS_DIR"),
    (["BIDS", "OUT", "--runner", "apptainer", "--image", "none.sif"], 66, "needs --image FILE.sif (none.sif not found)"),
])
def test_submit_bad_arguments_one_line(mini_bids, tmp_path, args, code, words):
    """scripts/hpc/submit.sh: a bad argument is one line naming the fix and a documented exit code; nothing is
    submitted or created."""
    args = [a.replace("BIDS", str(mini_bids)).replace("OUT", str(tmp_path / "out")) for a in args]
    proc = subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit.sh: error: ") and words in lines[0] and "fix:" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "out").exists()
