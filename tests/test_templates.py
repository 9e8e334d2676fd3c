"""Template files: a user's TemplateFlow cache is honoured and recorded, an empty one falls back loudly."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from bids_siamese import resources
from bids_siamese.bids.derivatives import template_reference
from test_cli import fake_participant  # noqa: F401 - fixture

BUNDLED_BRAIN = resources.BUNDLED_TEMPLATEFLOW / f"tpl-{resources.TEMPLATE}" / resources.TEMPLATE_BRAIN


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def skeleton(home: Path, filled: tuple[str, ...] = ()) -> Path:
    """A TemplateFlow home as the templateflow package installs it: every name present, each empty, except
    the ``filled`` names (as if downloaded)."""
    for used in resources.templates_used():
        path = home / f"tpl-{used['Template']}" / used["Name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if used["Name"] in filled:
            shutil.copyfile(used["Path"], path)
        else:
            path.write_bytes(b"")
    return home


def test_bundled_copy_without_a_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "no-cache-here"))
    used = resources.template_brain()
    assert used.source == "bundled" and used.path == BUNDLED_BRAIN
    assert used.sha256 == sha256(BUNDLED_BRAIN) and used.fallback_reason == ""
    assert used.uri.endswith(f"tpl-{resources.TEMPLATE}/{resources.TEMPLATE_BRAIN}")


def test_cache_with_the_file_is_used(monkeypatch, tmp_path):
    home = skeleton(tmp_path / "tf", filled=(resources.TEMPLATE_BRAIN,))
    cached = home / f"tpl-{resources.TEMPLATE}" / resources.TEMPLATE_BRAIN
    cached.write_bytes(cached.read_bytes() + b"\0")  # a different file than the bundled one: its hash proves which
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    used = resources.template_brain()
    assert used.source == "templateflow" and used.path == cached and used.sha256 == sha256(cached)
    assert used.sha256 != sha256(BUNDLED_BRAIN)
    ref = template_reference()
    assert ref["SpatialReferenceFile"] == {"Path": str(cached), "Source": "templateflow", "SHA256": used.sha256}
    assert ref["SpatialReference"].startswith("https://templateflow.s3.amazonaws.com/tpl-MNI152NLin2009cAsym/")


def test_empty_skeleton_falls_back_with_a_reason(monkeypatch, tmp_path):
    home = skeleton(tmp_path / "tf")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    used = resources.fslr_file("L", "midthickness")
    assert used.source == "bundled" and used.path.is_relative_to(resources.BUNDLED_TEMPLATEFLOW)
    assert "empty placeholder" in used.fallback_reason and str(home) in used.fallback_reason


def test_fsaverage_falls_back_to_nilearn(monkeypatch, tmp_path):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "none"))
    used = resources.fsaverage5_file("R", "pial")
    assert used.source == "bundled" and "nilearn" in str(used.path) and used.path.is_file()


def test_run_records_templates_and_warns_once(run_cli, mini_bids, tmp_path, fake_participant, monkeypatch,
                                              caplog):
    home = skeleton(tmp_path / "tf", filled=(resources.TEMPLATE_BRAIN,))
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="bids_siamese"):
        code, _, err = run_cli(mini_bids, out, "participant", "--skip-bids-validation")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "TemplateFlow cache" in r.getMessage()]
    assert len(warnings) == 1 and "lacks 12 of 13" in warnings[0] and "using the bundled copies" in warnings[0]
    (log_dir,) = [p for p in (out / "logs").iterdir() if (p / "settings.json").is_file()]
    recorded = {entry["Name"]: entry for entry in json.loads((log_dir / "templates.json").read_text())}
    brain = recorded[resources.TEMPLATE_BRAIN]
    assert brain["Source"] == "templateflow" and Path(brain["Path"]).is_relative_to(home)
    assert brain["SHA256"] == sha256(Path(brain["Path"]))
    surface = recorded["tpl-fsLR_den-32k_hemi-L_midthickness.surf.gii"]
    assert surface["Source"] == "bundled" and surface["SHA256"] == sha256(Path(surface["Path"]))


def test_no_warning_without_a_cache(run_cli, mini_bids, tmp_path, fake_participant, monkeypatch, caplog):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "absent"))
    with caplog.at_level(logging.INFO, logger="bids_siamese"):
        code, _, err = run_cli(mini_bids, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 0, err
    assert not [r for r in caplog.records if "TemplateFlow cache" in r.getMessage()]
    (log_dir,) = [p for p in (tmp_path / "out" / "logs").iterdir() if (p / "settings.json").is_file()]
    assert {e["Source"] for e in json.loads((log_dir / "templates.json").read_text())} == {"bundled"}
