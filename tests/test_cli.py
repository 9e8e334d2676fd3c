"""Command line: arguments, refusals and every documented exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_siamese import __version__
from bids_siamese.cli.parser import parse_args
from bids_siamese.errors import EXIT_CODES
from conftest import snapshot


@pytest.fixture
def fake_participant(monkeypatch):
    """Replace the (slow) participant workflow with a recorder; the CLI logic around it stays real."""
    calls = []

    def _run(settings, scans):
        calls.append((settings, scans))
        return []

    monkeypatch.setattr("bids_siamese.workflows.participant.run_participant", _run)
    return calls


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("bids-siamese: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0
    assert out.strip() == f"bids-siamese {__version__}"
    assert __version__ == (Path(__file__).parents[1] / "version").read_text().strip()


def test_run_py_and_console_script_agree(tmp_path):
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, str(root / "run.py"), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bids-siamese {__version__}"


def test_bad_analysis_level_is_17(run_cli, mini_bids, tmp_path):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "subject")
    assert code == 17
    assert "participant or group" in one_error_line(err)


def test_unknown_option_is_usage_error(run_cli, mini_bids, tmp_path):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--no-such-flag")
    assert code == 64
    one_error_line(err)


def test_missing_bids_dir_is_66(run_cli, tmp_path):
    code, _, err = run_cli(tmp_path / "nope", tmp_path / "out", "participant")
    assert code == 66
    assert "nope" in one_error_line(err)


@pytest.mark.parametrize("label", ["../x", "a b", "sub-0_1", "01/..", ""])
def test_invalid_labels_are_usage_errors(run_cli, mini_bids, tmp_path, label):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--participant-label", label,
                           "--skip-bids-validation")
    assert code == 64
    assert "letters and digits" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_unknown_participant_names_missing_and_existing(run_cli, mini_bids, tmp_path, fake_participant):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--participant-label", "01", "sub-99",
                           "--skip-bids-validation")
    assert code == 66
    line = one_error_line(err)
    assert "99" in line and "existing: 01, 02" in line
    assert fake_participant == []


def test_labels_with_and_without_prefix(run_cli, mini_bids, tmp_path, fake_participant):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--participant-label", "sub-01",
                           "--session-label", "ses-2", "--skip-bids-validation")
    assert code == 0, err
    (settings, scans), = fake_participant
    assert settings.participant_label == ["01"] and settings.session_label == ["2"]
    assert [s.path.name for s in scans] == ["sub-01_ses-2_T1w.nii.gz"]
    assert scans[0].entities == {"subject": "01", "session": "2"}


def test_filter_file_selects_and_empty_selection_is_18(run_cli, mini_bids, tmp_path, fake_participant):
    good = tmp_path / "filter.json"
    good.write_text(json.dumps({"t1w": {"session": "1", "acquisition": None}}))
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--bids-filter-file", good,
                           "--skip-bids-validation")
    assert code == 0, err
    assert sorted(s.path.name for s in fake_participant[0][1]) == ["sub-01_ses-1_T1w.nii.gz", "sub-02_ses-1_T1w.nii.gz"]

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"t1w": {"session": "7"}}))
    code, _, err = run_cli(mini_bids, tmp_path / "out2", "participant", "--bids-filter-file", empty,
                           "--skip-bids-validation")
    assert code == 18
    assert "no T1w scan" in one_error_line(err)


@pytest.mark.parametrize(
    "content, code",
    [("{not json", 64), (json.dumps({"bold": {"task": "rest"}}), 64), (json.dumps({"t1w": {"nonsense": "x"}}), 64)],
)
def test_bad_filter_files(run_cli, mini_bids, tmp_path, content, code):
    path = tmp_path / "filter.json"
    path.write_text(content)
    got, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--bids-filter-file", path,
                          "--skip-bids-validation")
    assert got == code
    assert str(path) in one_error_line(err) or "filter" in one_error_line(err)


def test_missing_filter_file_is_66(run_cli, mini_bids, tmp_path):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--bids-filter-file", tmp_path / "x.json")
    assert code == 66
    one_error_line(err)


def test_output_inside_bids_refused(run_cli, mini_bids):
    for out in [mini_bids, mini_bids / "results", mini_bids / "derivatives"]:
        code, _, err = run_cli(mini_bids, out, "participant", "--skip-bids-validation")
        assert code == 64
        assert "inside BIDS_DIR" in one_error_line(err)
    assert not (mini_bids / "results").exists()


def test_output_under_derivatives_allowed(run_cli, mini_bids, fake_participant):
    code, _, err = run_cli(mini_bids, mini_bids / "derivatives" / "siamese", "participant", "--skip-bids-validation",
                           "-w", mini_bids.parent / "work")
    assert code == 0, err
    assert (mini_bids / "derivatives" / "siamese" / "dataset_description.json").is_file()


def test_work_dir_inside_bids_refused(run_cli, mini_bids, tmp_path):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "-w", mini_bids / "work")
    assert code == 64
    assert "work dir" in one_error_line(err)


def test_default_work_dir_outside_bids(mini_bids, tmp_path):
    settings = parse_args([str(mini_bids), str(tmp_path / "out"), "participant"])
    assert mini_bids not in settings.work_dir.parents
    assert settings.work_dir == parse_args([str(mini_bids), str(tmp_path / "out"), "participant"]).work_dir


def test_cannot_create_output_is_73(run_cli, mini_bids, tmp_path, fake_participant):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli(mini_bids, blocker / "out", "participant", "--skip-bids-validation")
    assert code == 73
    assert "fix:" in one_error_line(err)


def test_validation_failure_is_16_and_lists_codes(run_cli, mini_bids, tmp_path, fake_participant):
    (mini_bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_bogus.nii.gz").write_bytes(b"x")
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant")
    assert code == 16
    line = one_error_line(err)
    assert "NOT_INCLUDED" in line or "FILENAME" in line or "ERROR" in line.upper()
    assert "sub-01_ses-1_bogus.nii.gz" in line
    assert fake_participant == []


def test_valid_input_passes_validation(run_cli, mini_bids, tmp_path, fake_participant):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant")
    assert code == 0, err
    assert len(fake_participant) == 1


@pytest.mark.parametrize(
    "args, code",
    [
        (["--derivatives", "fmriprep"], 64),
        (["--derivatives", "freesurfer=/tmp"], 64),
        (["--derivatives", "fmriprep=/definitely/not/here"], 66),
        (["--device", "tpu"], 64),
        (["--nprocs", "0"], 64),
        (["--resolution", "-1"], 64),
        (["--use-plugin", "/no/such/plugin.yml"], 66),
    ],
)
def test_option_errors(run_cli, mini_bids, tmp_path, args, code):
    got, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--skip-bids-validation", *args)
    assert got == code
    one_error_line(err)


def test_derivatives_option_parsed(mini_bids, tmp_path):
    fmriprep = tmp_path / "fmriprep"
    fmriprep.mkdir()
    (fmriprep / "dataset_description.json").write_text(json.dumps(
        {"Name": "f", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}]}))
    settings = parse_args([str(mini_bids), str(tmp_path / "out"), "participant", "--derivatives", f"fmriprep={fmriprep}"])
    assert (settings.derivatives["fmriprep"].path, settings.derivatives["fmriprep"].version) == \
        (fmriprep.resolve(), "24.1.1")


def test_cuda_request_without_gpu_is_refused(run_cli, mini_bids, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--device", "cuda:0", "--skip-bids-validation")
    assert code == 64
    assert "--device cpu" in one_error_line(err)


def test_input_untouched_and_outputs_described(run_cli, mini_bids, tmp_path, fake_participant):
    before = snapshot(mini_bids)
    mini_bids.chmod(0o555)
    try:
        code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "-v")
    finally:
        mini_bids.chmod(0o755)
    assert code == 0, err
    assert snapshot(mini_bids) == before
    out = tmp_path / "out"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "bids-siamese" and gen["Version"] == __version__ and gen["CodeURL"].startswith("https://")
    assert desc["SourceDatasets"][0]["URL"] == mini_bids.resolve().as_uri()
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "*.html" in ignore and "logs" not in ignore  # logs/ is a BIDS directory (opaque)
    runs = [p for p in (out / "logs").iterdir() if p.is_dir() and p.name != "locks"]  # logs/locks: one lock per subject
    assert len(runs) == 1
    assert sorted(p.name for p in (out / "logs" / "locks").glob("*.lock")) == ["sub-01.lock", "sub-02.lock"]
    saved = json.loads((runs[0] / "settings.json").read_text())
    assert saved["run_id"] == runs[0].name and saved["bids_dir"] == str(mini_bids.resolve())
    assert (runs[0] / "command.txt").read_text().startswith("bids-siamese ")


def test_container_recorded_from_environment(run_cli, mini_bids, tmp_path, fake_participant, monkeypatch):
    monkeypatch.setenv("BIDS_SIAMESE_CONTAINER", "docker://bids/siamese:1.2.3")
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 0, err
    desc = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "bids/siamese:1.2.3"}


def test_group_before_participant_is_66(run_cli, mini_bids, tmp_path):
    code, _, err = run_cli(mini_bids, tmp_path / "out", "group", "--skip-bids-validation")
    assert code == 66
    assert "participant level first" in one_error_line(err)


def test_participant_failures_give_65(run_cli, mini_bids, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "bids_siamese.workflows.participant.run_participant",
        lambda settings, scans: [(scans[0].name, "file is truncated; fix: re-export the scan")],
    )
    code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 65
    assert "1 of 3 scan(s) failed" in one_error_line(err)
    assert "FAILED sub-01_ses-1_T1w: file is truncated" in err


def test_every_exit_code_documented():
    usage = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in usage


def test_every_group_option_is_settable_and_saved(mini_bids, tmp_path):
    """Options that used to be read with getattr and defaults in the code are CLI options, saved with the run."""
    from dataclasses import fields

    from bids_siamese.cli.parser import LRP_RULE_SETS, SYMMETRY_FUSIONS
    from bids_siamese.config import Settings
    from bids_siamese.explain.rules import RULE_SETS
    from bids_siamese.symmetry.model import FUSIONS

    assert LRP_RULE_SETS == RULE_SETS and SYMMETRY_FUSIONS == FUSIONS
    labels = tmp_path / "labels.tsv"
    labels.write_text("index\tname\n1\tA\n")
    s = parse_args([str(mini_bids), str(tmp_path / "out"), "group", "--task", "symmetry", "--lrp-rules", "epsilon",
                    "--report-subjects", "--atlas-labels", str(labels), "--symmetry-fusion", "cross_attention",
                    "--symmetry-fwhm", "4", "--orientation-folds", "4", "--symmetry-components", "3"])
    assert (s.lrp_rules, s.report_subjects, s.atlas_labels, s.symmetry_fusion, s.symmetry_fwhm,
            s.orientation_folds, s.symmetry_components) == ("epsilon", True, labels.resolve(), "cross_attention",
                                                            4.0, 4, 3)
    saved = s.to_dict()
    assert {f.name for f in fields(Settings)} == set(saved)
    assert saved["symmetry_fusion"] == "cross_attention" and saved["atlas_labels"] == str(labels.resolve())
    defaults = parse_args([str(mini_bids), str(tmp_path / "out"), "group"])
    assert (defaults.lrp_rules, defaults.symmetry_fusion, defaults.symmetry_fwhm, defaults.orientation_folds,
            defaults.symmetry_components) == ("epsilon_plus", "difference", 6.0, 5, 10)


@pytest.mark.parametrize("args, code", [
    (["--orientation-folds", "2"], 64), (["--symmetry-fwhm", "-1"], 64), (["--symmetry-fusion", "sum"], 64),
    (["--symmetry-components", "-1"], 64),
    (["--atlas-labels", "/nonexistent/labels.tsv"], 66),
])
def test_group_option_errors(run_cli, mini_bids, tmp_path, args, code):
    got, _, err = run_cli(mini_bids, tmp_path / "out", "group", *args)
    assert got == code
    one_error_line(err)
