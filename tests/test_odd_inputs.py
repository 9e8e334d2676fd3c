"""Odd inputs and options end in one line and a documented exit code (docs/reliability.md): --nprocs beyond the
CPUs, unsafe checkpoints, BIDS TSV quoting, duplicate participants, a locked subject, the TemplateFlow warning,
the usable-scan gate's line. Quick: the pipeline itself is not run (``fake_participant``)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from bids_siamese.bids.layout import bids_relative, read_bids_tsv
from bids_siamese.errors import BadDataError
from bids_siamese.qc.gate import qc_summary_line
from test_reliability import _fake_participant_outputs, error_lines, fake_participant  # noqa: F401 - fixture


# ------------------------------------------------------------------------------------------------
# --nprocs, --mem-gb
# ------------------------------------------------------------------------------------------------

def test_nprocs_is_capped_at_usable_cpus_with_one_warning(mini_bids, tmp_path, capsys):
    from bids_siamese.cli.parser import parse_args
    from bids_siamese.config import available_cpus

    settings = parse_args([str(mini_bids), str(tmp_path / "out"), "participant", "--nprocs", "1000"])
    assert settings.nprocs == available_cpus() == len(os.sched_getaffinity(0))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nprocs 1000 is more than the" in err and f"using {available_cpus()}" in err


@pytest.mark.parametrize("option, value", [("--nprocs", "0"), ("--nprocs", "-1"), ("--n-cpus", "0"),
                                           ("--mem-gb", "0"), ("--omp-nthreads", "0")])
def test_bad_resource_options_carry_a_fix(run_cli, mini_bids, tmp_path, option, value, fake_participant):  # noqa: F811
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", option, value)
    assert code == 64
    lines = error_lines(err)
    assert len(lines) == 1 and "; fix: " in lines[0] and fake_participant == []


# ------------------------------------------------------------------------------------------------
# checkpoints: loaded safely, and before any scan is processed
# ------------------------------------------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bids-siamese-pwned",))


def _checkpoint_with_weights(tmp_path: Path, data: bytes) -> Path:
    """A checkpoint folder of a real model whose model.pt is replaced by ``data`` (the checksums updated)."""
    from test_models import _save

    _, folder, _ = _save(tmp_path)
    (folder / "model.pt").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (folder / "model.pt.sha256").write_text(f"{digest}  model.pt\n")
    card = json.loads((folder / "model_card.json").read_text())
    card["weights"].update(sha256=digest, bytes=len(data))
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("kind", ["pickle_with_code", "random_bytes"])
def test_unsafe_or_damaged_checkpoint_is_one_line_65_before_any_scan(run_cli, mini_bids, tmp_path, kind,
                                                                     fake_participant):  # noqa: F811
    import io

    import torch

    if kind == "pickle_with_code":
        buffer = io.BytesIO()
        torch.save({"weight": RunsCode()}, buffer)  # a zip-format torch file whose pickle calls os.system
        data = buffer.getvalue()
    else:
        data = os.urandom(4096)
    folder = _checkpoint_with_weights(tmp_path, data)
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--skip-bids-validation", "--model", folder)
    assert code == 65, err
    lines = error_lines(err)
    assert len(lines) == 1 and "model.pt is not a PyTorch tensor file" in lines[0] and "fix:" in lines[0]
    assert "weights_only" not in err and "Traceback" not in err
    assert fake_participant == []  # checked before any scan is processed
    assert not Path("/tmp/bids-siamese-pwned").exists()


# ------------------------------------------------------------------------------------------------
# BIDS TSV, duplicate participants, symlinked scans
# ------------------------------------------------------------------------------------------------

def test_bids_tsv_is_read_without_quoting(tmp_path):
    path = tmp_path / "participants.tsv"
    path.write_text('participant_id\tnote\tage\nsub-01\t"quoted start\t30\nsub-02\tn/a\t40\n')
    table = read_bids_tsv(path)
    assert table["note"].tolist() == ['"quoted start', "n/a"] and table["age"].tolist() == ["30", "40"]
    path.write_text("participant_id\tage\nsub-01\t30\textra\n")
    with pytest.raises(BadDataError, match="not a valid BIDS TSV.*fix:"):
        read_bids_tsv(path)


def _twin_group_run(run_cli, mini_bids, tmp_path):
    """``group --task twin`` over two subjects' fake participant outputs: (exit code, stdout, stderr)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text("{}")
    for sub in ("01", "02"):
        _fake_participant_outputs(out, {"subject": sub, "session": "1"}, "ok")
    return run_cli(mini_bids, out, "group", "--task", "twin", "--skip-bids-validation")


def test_group_level_reads_a_quoted_participants_value(run_cli, mini_bids, tmp_path, monkeypatch):
    """A value starting with ``"`` (valid BIDS) made pandas' default reader fail at the group level."""
    (mini_bids / "participants.tsv").write_text(
        'participant_id\tfamily_id\tzygosity\tnote\nsub-01\tf1\tMZ\t"twin A\nsub-02\tf1\tMZ\tok\n')
    seen = []
    monkeypatch.setattr("bids_siamese.workflows.group.run_task",
                        lambda task, settings, subjects: seen.append(__import__("bids_siamese.train.run", fromlist=["x"])
                                                                     .load_relations(settings, subjects)) or [])
    monkeypatch.setattr("bids_siamese.workflows.group.run_explain", lambda settings, subjects: [])
    code, _, err = _twin_group_run(run_cli, mini_bids, tmp_path)
    assert code == 0, err
    assert seen and seen[0].relation("sub-01", "sub-02") == "MZ"


def test_duplicate_participant_ids_are_one_line_naming_them(run_cli, mini_bids, tmp_path):
    (mini_bids / "participants.tsv").write_text(
        "participant_id\tfamily_id\tzygosity\nsub-01\tf1\tMZ\nsub-02\tf1\tMZ\n01\tf2\tDZ\n")
    code, _, err = _twin_group_run(run_cli, mini_bids, tmp_path)
    assert code == 65, err
    lines = error_lines(err)
    assert len(lines) == 1 and "participant(s) sub-01 more than once" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in err


def test_symlinked_scan_keeps_its_dataset_path(tmp_path):
    outside = tmp_path / "store" / "scan.nii.gz"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    link = tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    assert bids_relative(link, tmp_path / "ds") == Path("sub-01/anat/sub-01_T1w.nii.gz")


# ------------------------------------------------------------------------------------------------
# exit 75 writes only the lock files; the TemplateFlow warning; the gate's line
# ------------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from bids_siamese.bids.locks import subject_locks

with subject_locks(Path(sys.argv[1]), ["01"], "run-A"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_locked_subject_writes_nothing_but_the_lock_files(run_cli, mini_bids, tmp_path, fake_participant):  # noqa: F811
    import subprocess
    import sys

    from test_reliability import ROOT

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        code, _, err = run_cli(mini_bids, out, "participant", "--participant-label", "01", "--skip-bids-validation")
        assert code == 75, err
        after = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    finally:
        holder.kill()
        holder.wait()
    assert after == before and all(p.startswith("logs/locks") or p == "logs" for p in after), after


def test_templateflow_warning_is_one_short_line_once_per_cache_state(run_cli, mini_bids, tmp_path, monkeypatch,
                                                                     caplog, fake_participant):  # noqa: F811
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty_cache"))
    (tmp_path / "empty_cache").mkdir()
    out = tmp_path / "out"

    def warnings():
        found = [r.getMessage() for r in caplog.records if "TemplateFlow cache" in r.getMessage()
                 and r.levelno >= logging.WARNING]
        caplog.clear()
        return found

    with caplog.at_level(logging.INFO):
        assert run_cli(mini_bids, out, "participant", "--skip-bids-validation")[0] == 0
        first = warnings()
        assert run_cli(mini_bids, out, "participant", "--skip-bids-validation")[0] == 0
        second = warnings()
        monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "other_cache"))
        (tmp_path / "other_cache").mkdir()
        assert run_cli(mini_bids, out, "participant", "--skip-bids-validation")[0] == 0
        third = warnings()
    assert len(first) == 1 and "lacks 13 of 13" in first[0] and len(first[0]) < 200
    assert second == []  # the same cache state: not again
    assert len(third) == 1  # another cache: once more


def test_gate_line_counts_only_scans_that_reached_it():
    assert "all scans usable" not in qc_summary_line([], checked=0)
    assert qc_summary_line([], checked=0).startswith("usable-scan gate: no scan reached it")
    assert qc_summary_line([], checked=3) == "usable-scan gate: all 3 scan(s) that reached it usable"



def test_usage_doc_names_every_option_and_alias():
    from bids_siamese.cli.parser import build_parser

    text = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    options = [o for action in build_parser()._actions for o in action.option_strings]
    assert {"--n-cpus", "--participant_label", "--verbose"} <= set(options)
    import re

    missing = [o for o in options if o not in ("-h", "--help") and not re.search(rf"(?<![\w-]){o}(?![\w-])", text)]
    assert missing == []


def test_output_unwritable_after_the_scans_is_73_one_line(run_cli, mini_bids, tmp_path, monkeypatch):
    """The main process's own writes after the workflow (subject reports, completion records) hit a read-only
    OUTPUT_DIR: one line naming it, not a traceback."""
    import errno

    from bids_siamese.workflows import participant

    class NoWork:
        config: dict = {}

        def run(self, **kwargs):
            return None

    def read_only(*args, out_path, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out_path))

    monkeypatch.setattr(participant, "init_participant_wf", lambda scans, settings: NoWork())
    monkeypatch.setattr(participant, "render_subject_report", read_only)
    out = tmp_path / "out"
    code, _, err = run_cli(mini_bids, out, "participant", "--skip-bids-validation", "--nprocs", "1",
                           "--participant-label", "01")
    assert code == 73, err
    lines = error_lines(err)
    assert len(lines) == 1 and f"cannot write OUTPUT_DIR {out}" in lines[0] and "Read-only file system" in lines[0]
    assert "Traceback" not in err
