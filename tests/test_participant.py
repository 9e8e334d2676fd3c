"""End to end: the participant and group levels on the tiny demo dataset at a coarse grid."""
from __future__ import annotations

import fnmatch
import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_siamese.bids.derivatives import output_names
from bids_siamese.bids.layout import run_validator
from bids_siamese.cli.main import main

pytestmark = pytest.mark.slow
RES = "4"  # coarse model grid keeps the test quick


@pytest.fixture(scope="module")
def demo(tiny_demo) -> Path:
    return tiny_demo


@pytest.fixture(scope="module")
def truth(demo) -> pd.DataFrame:
    return pd.read_csv(demo / "sourcedata" / "truth" / "scans.tsv", sep="\t")


@pytest.fixture(scope="module")
def participant_run(demo, tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    out, work = base / "out", base / "work"
    code = main([str(demo), str(out), "participant", "-w", str(work), "--resolution", RES, "--nprocs", "2",
                 "--omp-nthreads", "1"])
    return code, out, work


def entities_of(path: str) -> dict[str, str]:
    name = Path(path).name.split(".")[0]
    ents = dict(part.split("-", 1) for part in name.split("_")[:-1])
    keys = {"sub": "subject", "ses": "session", "acq": "acquisition", "run": "run"}
    return {keys[k]: v for k, v in ents.items() if k in keys}


def test_participant_writes_every_output(participant_run, truth):
    code, out, _ = participant_run
    assert code == 0
    for path in truth["path"]:
        names = output_names(entities_of(path), RES)
        for key, rel in names.items():
            assert (out / rel).is_file(), rel
        preproc = nib.load(out / names["preproc"])
        mask = np.asanyarray(nib.load(out / names["grid_mask"]).dataobj) > 0
        data = preproc.get_fdata()
        assert preproc.shape == (42, 52, 44)
        assert np.allclose(preproc.affine[:3, :3], np.eye(3) * 4)
        assert 0.5 * 1.2e6 / 64 < mask.sum() < 2.0 * 1.2e6 / 64  # a brain-sized mask at 4 mm
        assert abs(np.median(data[mask])) < 0.1 and np.all(data[~mask] == 0)
        sidecar = json.loads((out / names["preproc"]).with_name(names["preproc"].name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SkullStripped"] is True and RES in sidecar["Resolution"]
        assert sidecar["Sources"][0].startswith("bids:raw:sub-")
        qc = json.loads((out / names["orientation"]).read_text())
        assert 0.0 <= qc["lr_flip_probability"] <= 1.0
        assert qc["qc_status"] in ("pass", "warn") and qc["usable"] is True, qc["qc_reasons"]
        assert qc["lr_flip_verdict"] in ("ok", "flipped") and qc["lr_flip_source"] == "image"
        assert qc["lr_flip_difference"] == pytest.approx(qc["lr_flip_statistic"] - qc["lr_flip_statistic_mirrored"],
                                                         abs=2e-5)
        assert {"name", "passed", "detail"} <= set(qc["header_checks"][0])
        assert qc["brain_volume_cm3"] > 900
        xfm = (out / names["xfm"]).read_text()
        assert xfm.startswith("#Insight Transform File V1.0")


def test_every_flipped_scan_flagged_and_no_other(participant_run, truth):
    _, out, _ = participant_run
    for _, row in truth.iterrows():
        qc = json.loads((out / output_names(entities_of(row["path"]), RES)["orientation"]).read_text())
        assert qc["lr_flip_suspected"] == bool(row["lr_flipped"]), (row["path"], qc["lr_flip_probability"])
        assert qc["lr_flip_verdict"] == ("flipped" if row["lr_flipped"] else "ok")


def test_output_passes_bids_validator(participant_run):
    _, out, _ = participant_run
    errors = [i for i in run_validator(out) if i.severity == "error"]
    assert errors == []


def test_subject_reports(participant_run, truth):
    _, out, _ = participant_run
    for subject in truth["participant_id"].unique():
        html = (out / f"{subject}.html").read_text()
        scans = truth.loc[truth["participant_id"] == subject, "path"]
        for path in scans:
            assert Path(path).name.replace(".nii.gz", "") in html
            for key, rel in output_names(entities_of(path), RES).items():
                if key.startswith("figure_"):
                    assert str(rel) in html
                    assert (out / rel).read_text().lstrip().startswith(("<?xml", "<svg"))


def test_group_collects_orientation(participant_run, demo, truth):
    _, out, work = participant_run
    code = main([str(demo), str(out), "group", "-w", str(work), "--skip-bids-validation"])
    assert code == 0
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    assert list(table.columns)[:9] == ["participant_id", "session_id", "qc_status", "usable", "qc_reasons",
                                       "lr_flip_verdict", "lr_flip_confidence", "lr_flip_probability",
                                       "lr_flip_suspected"]
    assert table["usable"].all() and set(table["qc_status"]) <= {"pass", "warn"}
    assert "header_checks_failed" in table.columns
    assert len(table) == len(truth)
    merged = table.merge(truth, left_on=["participant_id", "session_id"], right_on=["participant_id", "session_id"])
    assert (merged["lr_flip_suspected"] == merged["lr_flipped"].astype(bool)).all()
    report = (out / "group.html").read_text()  # the group report, with the orientation summary
    assert "Orientation and symmetry" in report
    n_failed = int((table["header_checks_failed"].notna() & (table["header_checks_failed"] != "n/a")).sum())
    assert (table["status"] == "ok").all() and table["reason"].isna().all()
    assert (f"{len(truth)} scans: {len(truth)} ok, 0 failed, 0 missing; "
            f"{int(truth['lr_flipped'].astype(bool).sum())} flagged as left-right flipped; "
            f"{n_failed} with failed header checks") in report
    assert "0 failed the usable-scan gate" in report
    assert [i for i in run_validator(out) if i.severity == "error"] == []


def test_rerun_reuses_work_and_is_deterministic(participant_run, demo, truth, tmp_path):
    code, out, work = participant_run
    subject = truth["participant_id"].iloc[0][4:]
    results = sorted(work.glob("**/brain_extraction/result_brain_extraction.pklz"))
    assert results
    before = {p: p.stat().st_mtime_ns for p in results}
    again = main([str(demo), str(out), "participant", "-w", str(work), "--resolution", RES, "--nprocs", "1",
                  "--skip-bids-validation", "--participant-label", subject])
    assert again == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # cached, not recomputed

    out2 = tmp_path / "out2"  # fresh work dir, Linear instead of MultiProc, 2 torch threads instead of 1
    code2 = main([str(demo), str(out2), "participant", "-w", str(tmp_path / "work2"), "--resolution", RES,
                  "--nprocs", "1", "--omp-nthreads", "2", "--skip-bids-validation", "--participant-label", subject])
    assert code2 == 0
    compared = 0
    for path in sorted(out2.glob(f"sub-{subject}/**/*")):
        if path.name.endswith("_desc-status_qc.json"):  # provenance (run id, time); the files it lists agree
            assert json.loads(path.read_text())["files"] == json.loads((out / path.relative_to(out2)).read_text())["files"]
        elif path.is_file():
            assert path.read_bytes() == (out / path.relative_to(out2)).read_bytes(), path.name
            compared += 1
    assert compared >= 14  # NIfTI, JSON, TSV, transform and the SVG figures


def test_bad_scan_fails_alone(demo, truth, tmp_path):
    """A truncated scan exits 65 with its name; the other scan finishes; existing outputs survive."""
    bids = tmp_path / "bids"
    keep = truth["participant_id"].unique()[:2].tolist()
    shutil.copytree(demo, bids, ignore=lambda d, names: [
        n for n in names if Path(d) == demo and n.startswith("sub-") and n not in keep])
    bad_path = bids / truth.loc[truth["participant_id"] == keep[1], "path"].iloc[0]
    raw = bad_path.read_bytes()
    bad_path.write_bytes(raw[: len(raw) // 3])
    out = tmp_path / "out"
    out.mkdir()
    sentinel = out / "group_orientation.tsv"
    sentinel.write_text("participant_id\nkept\n")
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"), "--resolution", RES,
                 "--skip-bids-validation", "--nprocs", "1"])
    assert code == 65
    assert sentinel.read_text() == "participant_id\nkept\n"
    good = truth.loc[truth["participant_id"] == keep[0], "path"]
    for path in good:
        assert (out / output_names(entities_of(path), RES)["orientation"]).is_file()
    assert not (out / output_names(entities_of(str(bad_path.relative_to(bids))), RES)["preproc"]).exists()
    crashes = list((out / "logs").glob("*/crash/crash-*.txt"))
    assert crashes
    # the FAILED line as data: the failed step, its error class, the one-line message and the exit code
    [failure] = json.loads(next((out / "logs").glob("*/failures.json")).read_text())
    assert failure["scan"] == bad_path.name.split(".")[0] and failure["exit_code"] == 65
    assert failure["node"] == "check_header" and failure["error"] == "BadDataError" and "fix:" in failure["message"]
    html = (out / f"{keep[1]}.html").read_text()
    assert "FAILED" in html.upper()


def test_fmriprep_derivatives_reused(demo, truth, tmp_path):
    """--derivatives fmriprep=PATH: fMRIPrep's mask is used instead of deepbet's."""
    row = truth[~truth["lr_flipped"].astype(bool)].iloc[0]
    sub = row["participant_id"]
    fmriprep = tmp_path / "fmriprep"
    anat = fmriprep / sub / "anat"
    anat.mkdir(parents=True)
    (fmriprep / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    src = nib.load(demo / row["path"])
    nib.save(src, anat / f"{sub}_desc-preproc_T1w.nii.gz")
    mask_file = demo / "sourcedata" / "truth" / "masks" / (Path(row["path"]).name.replace("_T1w.nii.gz", "_T1w_desc-brain_mask.nii.gz"))
    true_mask = nib.load(mask_file)
    nib.save(true_mask, anat / f"{sub}_desc-brain_mask.nii.gz")
    out = tmp_path / "out"
    code = main([str(demo), str(out), "participant", "-w", str(tmp_path / "work"), "--resolution", RES,
                 "--skip-bids-validation", "--participant-label", sub, "--session-label", str(row["session_id"]),
                 "--derivatives", f"fmriprep={fmriprep}", "--nprocs", "1"])
    assert code == 0
    names = output_names(entities_of(row["path"]), RES)
    sidecar = json.loads((out / str(names["preproc"]).replace(".nii.gz", ".json")).read_text())
    assert sidecar["BrainExtraction"] == "fmriprep"
    ours = nib.load(out / names["native_mask"])
    theirs = nib.as_closest_canonical(true_mask)
    assert (np.asanyarray(ours.dataobj) > 0).sum() == (np.asanyarray(theirs.dataobj) > 0).sum()


def test_output_tree_matches_listing(participant_run):
    """The file tree of the tiny run is listed in tests/data and diffed here (as fMRIPrep does in CI)."""
    _, out, _ = participant_run
    listed = (Path(__file__).parent / "data" / "tiny_participant_outputs.txt").read_text().split()
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.relative_to(out).parts[0] not in ("logs",)
                   and not p.name.startswith(("group_", "group.")))
    assert found == sorted(listed)


def test_sidecars_record_the_template_file_used(participant_run, truth):
    """SpatialReference names the template; SpatialReferenceFile the file this run read, with its sha256."""
    from bids_siamese.resources import template_brain

    _, out, _ = participant_run
    used = template_brain()
    names = output_names(entities_of(truth["path"][0]), RES)
    for key in ("preproc", "grid_mask"):
        sidecar = json.loads((out / names[key]).with_name(names[key].name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SpatialReference"] == used.uri
        assert sidecar["SpatialReferenceFile"] == {"Path": str(used.path), "Source": used.source,
                                                   "SHA256": used.sha256}
    (log_dir,) = [p for p in (out / "logs").iterdir() if (p / "templates.json").is_file()][:1]
    assert used.sha256 in (log_dir / "templates.json").read_text()


def _one_scan_subject(truth: pd.DataFrame) -> tuple[str, str]:
    counts = truth["participant_id"].value_counts()
    subject = sorted(counts[counts == 1].index)[0]
    return subject[4:], truth.loc[truth["participant_id"] == subject, "path"].iloc[0]


def test_output_unwritable_mid_run_is_73(participant_run, demo, truth, monkeypatch, capsys):
    """The output folder stops accepting writes while the scan's derivatives are written (a test hook stands in
    for a read-only remount, a full disk or a quota): exit 73, the existing outputs stay as they were."""
    import os

    _, out, work = participant_run
    subject, path = _one_scan_subject(truth)
    names = output_names(entities_of(path), RES)
    before = {rel: (out / rel).read_bytes() for key, rel in names.items() if key != "status"}
    real_replace = os.replace

    def read_only_subject_folder(src, dst, *args, **kwargs):
        if f"{os.sep}sub-{subject}{os.sep}" in str(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only_subject_folder)
    code = main([str(demo), str(out), "participant", "-w", str(work), "--resolution", RES, "--nprocs", "1",
                 "--skip-bids-validation", "--participant-label", subject])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 73, err
    assert f"FAILED sub-{subject}" in err and "cannot write" in err and "Permission denied" in err
    assert {rel: (out / rel).read_bytes() for rel in before} == before  # old outputs intact
    assert not (out / names["status"]).exists()  # not complete any more: the group level will say so
    assert list((out / f"sub-{subject}").rglob(".*.part*")) == []
    code = main([str(demo), str(out), "participant", "-w", str(work), "--resolution", RES, "--nprocs", "1",
                 "--skip-bids-validation", "--participant-label", subject])
    assert code == 0 and json.loads((out / names["status"]).read_text())["status"] == "ok"


KILL_AT_RENAME = """
import os, signal, sys
real_replace = os.replace
calls = []

def replace(src, dst, *args, **kwargs):
    if os.sep + "sub-" + sys.argv[1] + os.sep in str(dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # killed between writing the temporary file and renaming it
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from bids_siamese.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def test_kill_at_a_rename_then_rerun(participant_run, demo, truth, tmp_path):
    """SIGKILL in the middle of writing a scan's outputs: the scan is not counted by the group level; the next
    participant run sweeps the temporary files and completes it."""
    import os
    import subprocess
    import sys

    _, out, work = participant_run
    subject, path = _one_scan_subject(truth)
    names = output_names(entities_of(path), RES)
    root = Path(__file__).parents[1]
    args = [str(demo), str(out), "participant", "-w", str(work), "--resolution", RES, "--nprocs", "1",
            "--skip-bids-validation", "--participant-label", subject]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, subject, "4", *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = list((out / f"sub-{subject}").rglob(".*.part*"))
    assert len(partial) == 1
    assert not (out / names["status"]).exists()

    assert main([str(demo), str(out), "group", "--skip-bids-validation"]) == 0
    table = pd.read_csv(out / "group_orientation.tsv", sep="\t")
    row = table[table["participant_id"] == f"sub-{subject}"].iloc[0]
    assert row["status"] == "missing" and "interrupted" in row["reason"]
    assert (table["status"] == "ok").sum() == len(truth) - 1

    assert main(args) == 0
    assert not partial[0].exists() and list((out / f"sub-{subject}").rglob(".*.part*")) == []
    assert json.loads((out / names["status"]).read_text())["status"] == "ok"
    assert main([str(demo), str(out), "group", "--skip-bids-validation"]) == 0
    assert (pd.read_csv(out / "group_orientation.tsv", sep="\t")["status"] == "ok").all()


# --------------------------------------------------------------------------------------------------
# Names and grids: docs/outputs.md's tables against what the tiny demo wrote, res- against TemplateFlow
# --------------------------------------------------------------------------------------------------

DOCS = Path(__file__).parents[1] / "docs" / "outputs.md"
#: Sections whose tables list what every participant + group run writes (checked both ways).
EVERY_RUN_SECTIONS = ("Dataset level", "Participant level, per T1w scan", "Group level (top of `OUTPUT_DIR`)")
ANAT = r"sub-[A-Za-z0-9]+/(?:ses-[A-Za-z0-9]+/)?anat/"
SOURCE = (r"sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?(?:_acq-[A-Za-z0-9]+)?(?:_ce-[A-Za-z0-9]+)?"
          r"(?:_rec-[A-Za-z0-9]+)?(?:_run-[0-9]+)?")


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row (a ``|`` inside backticks or escaped does not split)."""
    cells, cell, code, prev = [], "", False, ""
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code and prev != "\\":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        prev = ch
    return cells + [cell.strip()]


def _pattern(name: str) -> re.Pattern:
    """A documented file name (``<source>``, ``<label>``, ``{a,b}``, ``<a|b>``, ``[optional]``, ``*``, ``…``) as a
    regex over paths relative to OUTPUT_DIR; a bare ``<source>_…`` name lives in the scan's anat folder."""
    out, i = "", 0
    while i < len(name):
        ch = name[i]
        if name.startswith("<source>", i):
            out, i = out + SOURCE, i + len("<source>")
            continue
        if ch == "<":
            end = name.index(">", i)
            inner = name[i + 1:end]
            out += f"(?:{'|'.join(map(re.escape, inner.split('|')))})" if "|" in inner else "[^/]+"
            i = end + 1
            continue
        if ch == "{":
            end = name.index("}", i)
            out += "(?:" + "|".join(map(re.escape, name[i + 1:end].split(","))) + ")"
            i = end + 1
            continue
        out += {"[": "(?:", "]": ")?", "*": "[^/]*", "…": "[^/]*"}.get(ch, re.escape(ch))
        i += 1
    if name.endswith("/"):
        out += ".+"
    if "/" not in name.rstrip("/") and name.startswith(("<source>", "…")):
        out = ANAT + out
    return re.compile(out)


def documented_rows(text: str) -> list[dict]:
    """Every table row of docs/outputs.md whose first cell names files: ``section``, ``patterns``, ``keys`` (None
    without a keys column or for ``—``), ``conditional`` (the content starts with "only")."""
    rows, section, header = [], "", None
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line) <= set("|- ") or header[0] not in ("file",):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        keys = None
        if "keys" in header and cells[header.index("keys")] not in ("—", ""):
            keys = set(re.findall(r"`([^`]+)`", cells[header.index("keys")]))
        content = cells[-1]
        rows.append({"section": section, "names": names, "patterns": [_pattern(n) for n in names], "keys": keys,
                     "conditional": content.lower().startswith("only")})
    return rows


def _written(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _with_group_outputs(participant_run, demo) -> Path:
    """The tiny run's OUTPUT_DIR with the group level's outputs (run here unless an earlier test ran it)."""
    _, out, work = participant_run
    if not (out / "group_orientation.tsv").is_file():  # the group run of test_group_collects_orientation
        assert main([str(demo), str(out), "group", "-w", str(work), "--skip-bids-validation"]) == 0
    return out


def test_written_tree_and_sidecar_keys_match_docs_tables(participant_run, demo):
    """Both ways: every file the tiny demo's participant + group runs wrote is in a table of docs/outputs.md, and
    every row of the every-run tables matches a written file whose JSON keys are the documented ones."""
    out = _with_group_outputs(participant_run, demo)
    rows = documented_rows(DOCS.read_text())
    written = _written(out)
    undocumented = [f for f in written if not any(p.fullmatch(f) for r in rows for p in r["patterns"])]
    assert undocumented == [], "written but not in docs/outputs.md"
    every_run = [r for r in rows if r["section"].startswith(EVERY_RUN_SECTIONS) and not r["conditional"]]
    assert len(every_run) > 20
    for row in every_run:
        for name, pattern in zip(row["names"], row["patterns"]):
            matches = [f for f in written if pattern.fullmatch(f)]
            assert matches, f"docs/outputs.md lists {name}, the tiny demo did not write it"
            if row["keys"] is not None:
                for rel in matches:
                    assert set(json.loads((out / rel).read_text())) == row["keys"], rel


def test_bidsignore_is_the_documented_one_and_the_output_validates(participant_run, demo, tmp_path):
    from bids_siamese.bids.derivatives import BIDSIGNORE

    out = _with_group_outputs(participant_run, demo)
    assert (out / ".bidsignore").read_text().split() == BIDSIGNORE
    text = DOCS.read_text()
    table = text[text.index("| pattern | why |"):].split("\n\n")[0]
    documented = [re.findall(r"`([^`]+)`", _cells(line)[0])[0] for line in table.splitlines()[2:]]
    assert documented == BIDSIGNORE
    # the validated part is not empty: the T1w images, masks and sidecars of every scan
    hidden = re.compile("|".join(fnmatch.translate(p.strip("/")) for p in BIDSIGNORE if "*" in p))
    visible = [f for f in _written(out) if not hidden.match(Path(f).name) and not f.startswith(
        ("logs/", "group")) and "/figures/" not in f]
    assert sum(f.endswith(("_desc-preproc_T1w.nii.gz", "_mask.nii.gz")) for f in visible) >= 3 * 7
    assert [i for i in run_validator(out) if i.severity == "error"] == []
    # no pattern is there for nothing: without it, the files it hides are errors (models, relevance maps and
    # embeddings are not written here; tests/test_explain.py checks the first two)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for pattern in [p for p in BIDSIGNORE if p not in ("models", "*_relevance.*", "*_embedding.tsv")]:
        (copy / ".bidsignore").write_text("\n".join(p for p in BIDSIGNORE if p != pattern) + "\n")
        assert [i for i in run_validator(copy) if i.severity == "error"], f"{pattern} hides nothing"


def test_res_entity_means_templateflow_grid(participant_run):
    """Every written ``space-MNI152NLin2009cAsym`` image with ``res-R`` has TemplateFlow's header for R; the
    model-grid images carry no ``res-``."""
    from bids_siamese.bids.grids import TEMPLATEFLOW_GRIDS, templateflow_grid
    from bids_siamese.resources import model_grid, template_brain_path

    _, out, _ = participant_run
    tf1 = nib.load(template_brain_path())  # TemplateFlow's tpl-MNI152NLin2009cAsym_res-01 header
    assert tf1.shape == templateflow_grid("1").shape and np.allclose(tf1.affine, templateflow_grid("1").affine)
    images = [p for p in out.rglob("*_space-MNI152NLin2009cAsym_*.nii*")]
    with_res = [p for p in images if "_res-" in p.name]
    assert len(with_res) >= 7  # one asymmetry map per scan
    for path in with_res:
        label = re.search(r"_res-([A-Za-z0-9]+)_", path.name).group(1)
        assert label in TEMPLATEFLOW_GRIDS, path.name
        img, grid = nib.load(path), templateflow_grid(label)
        assert img.shape == grid.shape and np.allclose(img.affine, grid.affine), path.name
        assert np.allclose(img.header.get_sform(), grid.affine) and np.allclose(img.header.get_qform(), grid.affine)
    for path in set(images) - set(with_res):
        img = nib.load(path)
        assert img.shape == model_grid(float(RES)).shape and np.allclose(img.affine, model_grid(float(RES)).affine)
