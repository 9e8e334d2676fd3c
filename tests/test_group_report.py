"""The group level's record of what each step wrote (``group_outputs.json``) and the report built from it."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bids_siamese.bids.derivatives import (
    GROUP_RECORD,
    LONGITUDINAL_FILES,
    ORIENTATION_MODEL_FILES,
    REGION_WEIGHTS,
    SYMMETRY_FILES,
    TWIN_FILES,
    model_folder,
    read_group_record,
    write_group_record,
    write_text,
    write_tsv,
)
from bids_siamese.config import Settings
from bids_siamese.reports.group import recorded_steps, write_group_report

SVG = '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><title>{}</title></svg>\n'


def _settings(out: Path, **kw) -> Settings:
    return Settings(bids_dir=out, output_dir=out, analysis_level="group", work_dir=out / "work", **kw)


def _metrics(value: float) -> pd.DataFrame:
    return pd.DataFrame({"metric": ["accuracy", "auc_roc"], "mean": [value, value], "std": [0.01, 0.02],
                         "n_runs": [2, 2]})


def _longitudinal_outputs(out: Path) -> list[Path]:
    folder = model_folder(out, "longitudinal", "regional")
    return [
        write_tsv(out / LONGITUDINAL_FILES["metrics"], _metrics(0.8125)),
        write_tsv(out / LONGITUDINAL_FILES["predictions"], pd.DataFrame({
            "participant_id": ["sub-07"], "session_a": ["ses-1"], "session_b": ["ses-2"], "label": ["decline"],
            "p_decline": [0.9731], "predicted": ["decline"]})),
        write_text(out / LONGITUDINAL_FILES["roc_figure"], SVG.format("longitudinal-roc")),
        write_tsv(folder / REGION_WEIGHTS, pd.DataFrame({
            "region": ["Hippocampus"], "hemisphere": ["L"], "structure_class": ["subcortical"], "label": [17],
            "voxels": [40], "weight": [-0.4321], "rank": [1]})),
        write_text(folder / "model_card.json", "{}"),
    ]


def _symmetry_outputs(out: Path) -> list[Path]:
    return [
        write_tsv(out / SYMMETRY_FILES["table"], pd.DataFrame({"participant_id": ["sub-01", "sub-02"],
                                                               "asymmetry_score": [0.5, 3.25]})),
        write_tsv(out / SYMMETRY_FILES["evaluation"], pd.DataFrame({"scorer": ["siamese_probability"],
                                                                    "bin_mm3": ["500-1000"], "auc": [0.9377]})),
        write_text(out / SYMMETRY_FILES["detection_figure"], SVG.format("symmetry-detection")),
    ]


def test_record_keeps_one_entry_per_step_with_the_roles_of_its_files(tmp_path):
    settings = _settings(tmp_path, task="longitudinal", backbone="regional")
    written = _longitudinal_outputs(tmp_path)
    write_group_record(tmp_path, "longitudinal", written, settings)
    write_group_record(tmp_path, "symmetry", _symmetry_outputs(tmp_path), settings)
    entry = read_group_record(tmp_path)["steps"]["longitudinal"]
    assert entry["files"] == {"metrics": LONGITUDINAL_FILES["metrics"],
                              "predictions": LONGITUDINAL_FILES["predictions"],
                              "roc_figure": LONGITUDINAL_FILES["roc_figure"]}
    assert entry["model"] == "models/longitudinal_regional" and entry["other"] == []
    assert entry["run_id"] == settings.run_id and entry["mode"] == "train" and entry["backbone"] == "regional"
    # a later run of one step replaces its entry and keeps the others
    applied = _settings(tmp_path, task="longitudinal", mode="apply", model=tmp_path / "models" / "x" / "model.pt")
    write_group_record(tmp_path, "longitudinal", written[:1], applied)
    steps = json.loads((tmp_path / GROUP_RECORD).read_text())["steps"]
    assert set(steps) == {"longitudinal", "symmetry"}
    assert steps["longitudinal"]["files"] == {"metrics": LONGITUDINAL_FILES["metrics"]}
    assert steps["longitudinal"]["model"] == "models/x" and steps["longitudinal"]["run_id"] == applied.run_id


def test_report_has_a_section_for_every_recorded_task(tmp_path):
    settings = _settings(tmp_path, task="longitudinal", backbone="regional")
    write_group_record(tmp_path, "longitudinal", _longitudinal_outputs(tmp_path), settings)
    write_group_record(tmp_path, "symmetry", _symmetry_outputs(tmp_path), _settings(tmp_path, task="symmetry"))
    write_group_record(tmp_path, "orientation", [
        write_tsv(tmp_path / ORIENTATION_MODEL_FILES["table"], pd.DataFrame({
            "participant_id": ["sub-01"], "p_flipped": [0.97], "fold": [0], "lr_flip_suspected": [True],
            "scan": ["sub-01_T1w.nii.gz"]})),
        write_tsv(tmp_path / ORIENTATION_MODEL_FILES["metrics"], pd.DataFrame({
            "metric": ["auc_mirrored_copies"], "value": ["0.9912"]}))], _settings(tmp_path, task="orientation"))
    html = write_group_report(settings).read_text()
    assert "<h2>Longitudinal model</h2>" in html and "0.8125" in html and "0.9731" in html
    assert "<title>longitudinal-roc</title>" in html
    assert "Hippocampus" in html and "-0.4321" in html  # the longitudinal model's own region weights
    assert "<h2>Orientation model</h2>" in html and "0.9912" in html and "sub-01_T1w.nii.gz" in html
    assert "Planted lesions" in html and "0.9377" in html and "<title>symmetry-detection</title>" in html
    assert "<h2>Tasks</h2>" in html and settings.run_id in html
    assert "<h2>Twin model</h2>" not in html  # no twin step ran
    assert f'href="{LONGITUDINAL_FILES["predictions"]}"' in html and 'href="models/longitudinal_regional"' in html


def test_report_follows_the_record_not_older_files(tmp_path):
    """A twin run in apply mode without family data writes only the relatives: the metrics of an earlier run
    left in the folder are not reported as this model's."""
    write_tsv(tmp_path / TWIN_FILES["metrics"], _metrics(0.6789))
    assert recorded_steps(tmp_path)["twin"]["files"] == {"metrics": TWIN_FILES["metrics"]}  # no record: the files
    html = write_group_report(_settings(tmp_path)).read_text()
    assert "<h2>Twin model</h2>" in html and "0.6789" in html
    relatives = write_tsv(tmp_path / TWIN_FILES["relatives"], pd.DataFrame({"participant_id": ["sub-01"]}))
    write_group_record(tmp_path, "twin", [relatives], _settings(tmp_path, task="twin", mode="apply"))
    html = write_group_report(_settings(tmp_path)).read_text()
    assert "0.6789" not in html and TWIN_FILES["relatives"] in html


def test_run_group_records_each_step_for_the_report(tmp_path, monkeypatch):
    from bids_siamese.workflows import group

    def fake_longitudinal(settings, subjects):
        return _longitudinal_outputs(settings.output_dir)[:3]

    monkeypatch.setattr(group, "run_task", lambda task, settings, subjects: fake_longitudinal(settings, subjects))
    monkeypatch.setattr(group, "find_orientation_records", lambda out, subjects: [
        {"participant_id": "sub-01", "session_id": None, "scan": "sub-01_T1w.nii.gz", "lr_flip_suspected": False,
         "header_checks": []}])
    settings = _settings(tmp_path, task="longitudinal")
    written = group.run_group(settings, ["01"])
    assert written[-1] == tmp_path / "group.html" and tmp_path / LONGITUDINAL_FILES["metrics"] in written
    steps = read_group_record(tmp_path)["steps"]
    assert set(steps) == {"qc", "longitudinal"}
    assert steps["qc"]["files"] == {"orientation": "group_orientation.tsv"}
    assert all(entry["run_id"] == settings.run_id for entry in steps.values())
    html = (tmp_path / "group.html").read_text()
    assert "<h2>Longitudinal model</h2>" in html and "1 scans: 1 ok, 0 failed, 0 missing" in html
