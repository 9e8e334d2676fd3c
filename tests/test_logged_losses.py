"""An error the app continues after is logged at WARNING with what was lost; any other error propagates (issue 25)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bids_siamese.config import Settings
from bids_siamese.explain import run as explain_run
from bids_siamese.reports.group import dataset_name
from bids_siamese.train.pairs import read_families


def _settings(tmp_path: Path) -> Settings:
    return Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="group",
                    work_dir=tmp_path / "work")


def test_explanations_without_family_information_warn(tmp_path, caplog):
    (tmp_path / "bids").mkdir()  # no participants.tsv: a user error of load_relations
    with caplog.at_level(logging.INFO, logger="bids_siamese"):
        families = explain_run._families(_settings(tmp_path), ["sub-01", "sub-02"])
    assert families == {"sub-01": "sub-01", "sub-02": "sub-02"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "own family" in warnings[0].getMessage() and "participants.tsv" in warnings[0].getMessage()


def test_explanations_do_not_hide_a_bug_as_missing_families(tmp_path, monkeypatch):
    def broken(settings, subjects):
        raise KeyError("a bug, not a user's missing file")

    monkeypatch.setattr(explain_run, "load_relations", broken)
    with pytest.raises(KeyError):
        explain_run._families(_settings(tmp_path), ["sub-01"])


def test_group_report_warns_on_an_unreadable_dataset_description(tmp_path, caplog):
    (tmp_path / "dataset_description.json").write_text('{"Name": "twins"')  # truncated JSON
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        assert dataset_name(tmp_path) == ""
    assert any("dataset_description.json" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    (tmp_path / "dataset_description.json").write_text('{"Name": "twins", "BIDSVersion": "1.10.0"}')
    assert dataset_name(tmp_path) == "twins"


def test_unreadable_participants_table_warns_that_families_are_dropped(tmp_path, caplog):
    (tmp_path / "participants.tsv").write_text("subject\tfamily_id\nsub-01\tF1\nsub-02\tF1\n")  # no participant_id
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        assert read_families(tmp_path) == {}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "participants.tsv" in messages[0] and "own family" in messages[0]
    (tmp_path / "participants.tsv").write_text("participant_id\tfamily_id\nsub-01\tF1\nsub-02\tF1\n")
    assert read_families(tmp_path) == {"sub-01": "F1", "sub-02": "F1"}


def test_group_report_without_surface_files_warns_and_keeps_the_slices(monkeypatch, caplog):
    from bids_siamese.errors import NoInputError
    from bids_siamese.reports import group

    def missing(*args, **kwargs):
        raise NoInputError("tpl-fsLR_hemi-L_den-32k_inflated.surf.gii not found; fix: ...")

    monkeypatch.setattr(group, "surface_figure", missing)
    monkeypatch.setattr(group, "slices_figure", lambda *args: "<svg/>")
    with caplog.at_level(logging.WARNING, logger="bids_siamese"):
        context = group.build_group_context("ds", relevance=(np.zeros((4, 4, 4)), np.eye(4), None))
    assert context["slices_svg"] == "<svg/>" and context["surface_svg"] is None
    assert any("surface views" in r.getMessage() and "fsLR" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(group, "surface_figure", lambda *args: 1 / 0)  # a bug is not a missing file
    with pytest.raises(ZeroDivisionError):
        group.build_group_context("ds", relevance=(np.zeros((4, 4, 4)), np.eye(4), None))
