"""Failure handling a cluster user can rely on (docs/reliability.md): one test per case, with fault injection.

The participant pipeline itself is not run here (bad scans fail at the first node; slow nodes are replaced by
a sleeping stand-in); the cases that need finished participant outputs are in test_participant.py, which
reuses its one demo run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bids_siamese.bids.derivatives import output_names, sweep_partial_files, write_json
from bids_siamese.bids.records import check_completion_record, write_completion_record
from bids_siamese.cli.parser import build_parser
from conftest import BROKEN_KINDS, add_broken_subject

ROOT = Path(__file__).parents[1]


def cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (this checkout first on the path)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "bids_siamese", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bids-siamese: error:")]


# ------------------------------------------------------------------------------------------------
# bad scans: one line each on the terminal, tracebacks only in the crash files; group level counts them
# ------------------------------------------------------------------------------------------------

def test_bad_scans_one_line_each_and_group_counts_them(mini_bids, tmp_path):
    add_broken_subject(mini_bids, "09")
    out, work = tmp_path / "out", tmp_path / "work"
    proc = cli(mini_bids, out, "participant", "--participant-label", "09", "--skip-bids-validation",
               "--nprocs", "2", "-w", work)
    assert proc.returncode == 65, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("bids-siamese: FAILED")]
    assert len(failed) == len(BROKEN_KINDS)
    assert "Traceback" not in proc.stderr + proc.stdout
    # nothing but our own lines: no nipype "Node ... failed" block, no nibabel header repair notice
    assert all(line.startswith("bids-siamese:") or "[bids_siamese" in line for line in proc.stderr.splitlines()), \
        proc.stderr
    by_kind = {kind: next(line for line in failed if f"ses-{kind}_T1w:" in line) for kind in BROKEN_KINDS}
    assert "voxel sizes are 0" in by_kind["pixdimzero"]
    assert "truncated" in by_kind["truncated"] and "not a 3D image" in by_kind["fourd"]
    assert "NaN" in by_kind["nan"] and "constant" in by_kind["constant"] and "absurd voxel size" in by_kind["hundredmm"]
    crashes = list((out / "logs").glob("*/crash/crash-*.txt"))
    assert len(crashes) == len(BROKEN_KINDS) and all("Traceback" in c.read_text() for c in crashes)
    assert len(error_lines(proc.stderr)) == 1 and "6 of 6 scan(s) failed" in proc.stderr
    assert "work dir" in proc.stderr  # where the intermediate files are, even after a failure
    assert "usable-scan gate: no scan reached it" in proc.stderr  # not "all scans usable"

    # group level: every selected scan has a row; none has results -> 66
    proc = cli(mini_bids, out, "group", "--skip-bids-validation")
    assert proc.returncode == 66, proc.stderr
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    assert len(table) == len(BROKEN_KINDS) + 3
    assert sorted(table["status"]) == ["failed"] * len(BROKEN_KINDS) + ["missing"] * 3
    pixdim = table[table["scan"] == "sub-09_ses-pixdimzero_T1w.nii.gz"].iloc[0]
    assert "voxel sizes are 0" in pixdim["reason"] and pd.isna(pixdim["lr_flip_probability"])
    assert "9 scans: 0 ok, 6 failed, 3 missing" in error_lines(proc.stderr)[0]
    assert "9 scans: 0 ok, 6 failed, 3 missing" in (out / "group.html").read_text()


def _fake_participant_outputs(out: Path, scan_entities: dict, status: str, reason: str | None = None) -> None:
    """The orientation record and completion record a participant run writes for one scan."""
    names = output_names(scan_entities, "2")
    files = []
    if status == "ok":
        ses = scan_entities.get("session")
        write_json(out / names["orientation"], {
            "participant_id": f"sub-{scan_entities['subject']}", "session_id": f"ses-{ses}" if ses else None,
            "scan": names["orientation"].name.replace("_desc-orientation_qc.json", "_T1w.nii.gz"),
            "lr_flip_probability": 0.1, "lr_flip_suspected": False, "header_checks": []})
        files = [str(names["orientation"])]
    write_completion_record(out, names["status"], status=status, scan="x", run_id="test", files=files, reason=reason)


def test_group_rows_for_ok_failed_missing_and_incomplete(run_cli, mini_bids, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "dataset_description.json").write_text("{}")
    _fake_participant_outputs(out, {"subject": "01", "session": "1"}, "ok")
    _fake_participant_outputs(out, {"subject": "01", "session": "2"}, "failed", "x.nii.gz: not a 3D image; fix: y")
    # sub-02 ses-1: never processed -> missing
    code, stdout, err = run_cli(mini_bids, out, "group", "--skip-bids-validation")
    assert code == 0, err
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t").set_index("scan")
    assert table.loc["sub-01_ses-1_T1w.nii.gz", "status"] == "ok"
    assert table.loc["sub-01_ses-1_T1w.nii.gz", "lr_flip_probability"] == pytest.approx(0.1)
    assert table.loc["sub-01_ses-2_T1w.nii.gz", "status"] == "failed"
    assert table.loc["sub-01_ses-2_T1w.nii.gz", "reason"] == "x.nii.gz: not a 3D image; fix: y"
    assert table.loc["sub-02_ses-1_T1w.nii.gz", "status"] == "missing"
    assert "rerun the participant level for sub-02" in table.loc["sub-02_ses-1_T1w.nii.gz", "reason"]
    assert "group level: 3 scans: 1 ok, 1 failed, 1 missing" in stdout
    assert "FAILED sub-01_ses-2_T1w: x.nii.gz: not a 3D image" in err and "MISSING sub-02_ses-1_T1w" in err
    assert "3 scans: 1 ok, 1 failed, 1 missing" in (out / "group.html").read_text()

    # a file listed in the completion record disappears (e.g. a killed rewrite): the scan is no longer counted
    (out / output_names({"subject": "01", "session": "1"}, "2")["orientation"]).unlink()
    code, _, err = run_cli(mini_bids, out, "group", "--skip-bids-validation")
    assert code == 66
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t").set_index("scan")
    assert table.loc["sub-01_ses-1_T1w.nii.gz", "status"] == "missing"
    assert "deleted after the participant run" in table.loc["sub-01_ses-1_T1w.nii.gz", "reason"]


def test_completion_record_detects_changed_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_completion_record(tmp_path, Path("rec.json"), status="ok", scan="s", run_id="r", files=["a.json"])
    assert check_completion_record(tmp_path, Path("rec.json")) == ("ok", None)
    (tmp_path / "a.json").write_text("{}")
    status, reason = check_completion_record(tmp_path, Path("rec.json"))
    assert status == "missing" and "a.json changed" in reason
    assert check_completion_record(tmp_path, Path("none.json"))[0] == "missing"


def test_stale_partial_files_are_swept_per_subject(tmp_path):
    out = tmp_path / "out"
    mine = out / "sub-01" / "anat" / ".sub-01_T1w.nii.gz.abc123.part.nii.gz"
    report = out / ".sub-01.html.xyz.part.html"
    other = out / "sub-02" / "anat" / ".sub-02_T1w.nii.gz.def456.part.nii.gz"  # another run may be writing it
    fresh_shared = out / ".dataset_description.json.q1.part.json"
    old_shared = out / ".README.md.q2.part.md"
    kept = out / "sub-01" / "anat" / "sub-01_T1w.json"
    for path in (mine, report, other, fresh_shared, old_shared, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    os.utime(old_shared, (time.time() - 3600, time.time() - 3600))
    removed = sweep_partial_files(out, ["01"])
    assert sorted(removed) == sorted([mine, report, old_shared])
    assert other.exists() and fresh_shared.exists() and kept.exists()


# ------------------------------------------------------------------------------------------------
# validation and selection
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_participant(monkeypatch):
    calls = []
    monkeypatch.setattr("bids_siamese.workflows.participant.run_participant",
                        lambda settings, scans: calls.append(scans) or [])
    return calls


def test_validation_errors_of_other_subjects_are_warnings(run_cli, mini_bids, tmp_path, fake_participant, caplog):
    (mini_bids / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_bogus.nii.gz").write_bytes(b"x")
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--participant-label", "01")
    assert code == 0, err
    assert [s.path.name for s in fake_participant[0]] == ["sub-01_ses-1_T1w.nii.gz", "sub-01_ses-2_T1w.nii.gz"]
    assert any("outside the selection (sub-02)" in r.getMessage() for r in caplog.records)
    code, _, err = run_cli(mini_bids, tmp_path / "out2", "participant", "--participant-label", "02")
    assert code == 16 and "sub-02_ses-1_bogus.nii.gz" in err


def test_selection_typo_reported_before_validation(run_cli, mini_bids, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("bids_siamese.bids.layout.run_validator", lambda dataset: calls.append(dataset) or [])
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--participant-label", "O1")
    assert code == 66 and "O1" in err and "existing: 01, 02" in err
    assert calls == []  # the (slow) validator never ran
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# --use-plugin and --help
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [
    ("plugin: [MultiProc\nplugin_args: {", "not valid YAML"),
    ("plugin: MultiProcc\n", "unknown nipype plugin 'MultiProcc'"),
    ("plugin: SLURM\nplugin_args: [a, b]\n", "'plugin_args' must be a mapping"),
    ("plugin: SLURM\nplugin_arg: {}\n", "unknown key(s) plugin_arg"),
    ("- MultiProc\n", "must be a mapping"),
    ("plugin: SGEGraph\n", "returns without waiting for them; fix: use 'plugin: SGE'"),
])
def test_bad_plugin_file_is_64_before_any_work(run_cli, mini_bids, tmp_path, content, words, fake_participant):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text(content)
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--use-plugin", plugin)
    assert code == 64
    lines = error_lines(err)
    assert len(lines) == 1 and words in lines[0] and str(plugin) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists() and fake_participant == []


def test_good_plugin_file_is_used(mini_bids, tmp_path):
    from bids_siamese.cli.parser import parse_args
    from bids_siamese.workflows.participant import plugin_settings

    plugin = tmp_path / "plugin.json"
    plugin.write_text(json.dumps({"plugin": "SLURMGraph", "plugin_args": {"sbatch_args": "--mem=4G"}}))
    settings = parse_args([str(mini_bids), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)])
    assert plugin_settings(settings) == ("SLURMGraph", {"sbatch_args": "--mem=4G"})


def test_help_is_clean_and_names_exit_codes():
    text = build_parser(prog="bids-siamese").format_help()
    assert "(default: [])" not in text and "(default: None)" not in text and "(default: False)" not in text
    for line in text.splitlines():
        assert line.count("(default") <= 1, line
    assert "(default: 2.0)" in text and "random seed (default: 0)" in text  # informative defaults still shown
    assert "docs/usage.md" in text and "143" in text and "130" in text and "  65  bad input data" in text
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and proc.stdout.startswith("usage: run.py ")
    assert cli("--help").stdout.startswith("usage: python -m bids_siamese ")


# ------------------------------------------------------------------------------------------------
# signals: SIGTERM / Ctrl-C stop the workers; a SIGKILLed main process leaves no orphan
# ------------------------------------------------------------------------------------------------

SLOW_DRIVER = """
import os, sys, time
from pathlib import Path
from bids_siamese.interfaces import preproc

marker = Path(sys.argv[1])

def slow(self, runtime):  # stands in for a long brain extraction
    (marker / str(os.getpid())).write_text("running")
    time.sleep(300)
    return runtime

# module level: a forkserver imports this file as __mp_main__, so its workers are patched too
preproc.CheckHeader._run_step = slow

if __name__ == "__main__":
    from bids_siamese.cli.main import entry
    entry(sys.argv[2:])
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _start_slow_run(mini_bids: Path, tmp_path: Path, *options: str) -> tuple[subprocess.Popen, list[int]]:
    marker = tmp_path / "running"
    marker.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_DRIVER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), str(mini_bids), str(tmp_path / "out"),
                             "participant", "--skip-bids-validation", "--nprocs", "2", "-w", str(tmp_path / "work"),
                             *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while len(list(marker.iterdir())) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)
    workers = [int(p.name) for p in marker.iterdir()]
    assert all(_alive(pid) and pid != proc.pid for pid in workers)
    return proc, workers


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_stops_workers_with_one_line(mini_bids, tmp_path, sig, code, name):
    proc, workers = _start_slow_run(mini_bids, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and f"stopped by {name}" in lines[0] and "rerun the same command" in lines[0]
    assert _wait_gone(workers, 5.0) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_main_process_is_killed(mini_bids, tmp_path):
    proc, workers = _start_slow_run(mini_bids, tmp_path)
    proc.kill()  # SIGKILL: no handler runs in the main process
    proc.communicate(timeout=30)
    assert _wait_gone(workers, 15.0) == []


# ------------------------------------------------------------------------------------------------
# two runs on the same subject
# ------------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from bids_siamese.bids.locks import subject_locks

with subject_locks(Path(sys.argv[1]), ["01"], "run-A"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_run_on_the_same_subject_exits_75_with_one_line(run_cli, mini_bids, tmp_path, fake_participant):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(mini_bids, out, "participant", "--participant-label", "01", "--skip-bids-validation")
        assert code == 75
        lines = error_lines(err)
        assert len(lines) == 1 and "sub-01" in lines[0] and "run-A" in lines[0] and f"pid {holder.pid}" in lines[0]
        assert fake_participant == []
        # another subject into the same folder is not blocked
        code, _, err = run_cli(mini_bids, out, "participant", "--participant-label", "02", "--skip-bids-validation")
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock of the killed holder: no stale lock
    code, _, err = run_cli(mini_bids, out, "participant", "--participant-label", "01", "--skip-bids-validation")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------
# work dir: named with its size; --clean-workdir
# ------------------------------------------------------------------------------------------------

def test_final_line_names_work_dir_and_clean_workdir(run_cli, mini_bids, tmp_path, fake_participant):
    work = tmp_path / "work"
    scan_dir = work / "bids_siamese_wf" / "scan_sub_01_ses_1_T1w_wf" / "node"
    scan_dir.mkdir(parents=True)
    (scan_dir / "result.pklz").write_bytes(b"x" * 2500)
    code, out, _ = run_cli(mini_bids, tmp_path / "out", "participant", "-w", work, "--skip-bids-validation")
    assert code == 0
    assert f"work dir {work} holds 2.5 kB" in out.strip().splitlines()[-1]
    other = work / "bids_siamese_wf" / "scan_sub_07_ses_1_T1w_wf"  # another run's scan: kept
    other.mkdir()
    code, out, _ = run_cli(mini_bids, tmp_path / "out", "participant", "-w", work, "--skip-bids-validation",
                           "--clean-workdir")
    assert code == 0 and not scan_dir.parent.exists() and other.is_dir()
    assert "other runs' folders kept" in out
    other.rmdir()
    code, out, _ = run_cli(mini_bids, tmp_path / "out", "participant", "-w", work, "--skip-bids-validation",
                           "--clean-workdir")
    assert code == 0 and not work.exists() and f"work dir {work} removed" in out


def test_lock_count_is_capped(tmp_path, monkeypatch, caplog):
    from bids_siamese.bids import locks

    monkeypatch.setattr(locks, "MAX_LOCKS", 2)
    with locks.subject_locks(tmp_path, ["03", "01", "02"], "run-B"):
        held = sorted(p.name for p in locks.lock_dir(tmp_path).glob("*.json"))
    assert held == ["sub-01.json", "sub-02.json"]
    assert any("only the first 2 are locked" in r.getMessage() for r in caplog.records)


def test_group_task_sees_only_subjects_with_complete_results(run_cli, mini_bids, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("bids_siamese.workflows.group.run_task",
                        lambda task, settings, subjects: calls.append(subjects) or [])
    monkeypatch.setattr("bids_siamese.workflows.group.run_explain", lambda settings, subjects: [])
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text("{}")
    _fake_participant_outputs(out, {"subject": "01", "session": "1"}, "ok")
    _fake_participant_outputs(out, {"subject": "02", "session": "1"}, "failed", "bad; fix: y")
    code, _, err = run_cli(mini_bids, out, "group", "--task", "twin", "--skip-bids-validation")
    assert code == 0, err
    assert calls == [["01"]]



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_forkserver_workers_exit_when_the_main_process_is_killed(mini_bids, tmp_path):
    """Workers started from a forkserver (the GPU path, or mp_context in --use-plugin) are not forked from the
    main process, so the fork hook never runs in them: the pool's initializer makes each watch the main process."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 2\n  mp_context: forkserver\n")
    proc, workers = _start_slow_run(mini_bids, tmp_path, "--use-plugin", str(plugin))
    parents = {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in workers}
    assert proc.pid not in parents  # started by the forkserver, not forked from the main process
    proc.kill()
    proc.communicate(timeout=30)
    assert _wait_gone(workers, 15.0) == []
