"""The default T1w selection lists the subjects' folders (``walk_t1w``) instead of pybids' index (issue 27): both
must select the same scans with the same entities."""
from __future__ import annotations

from pathlib import Path

import pytest

from bids_siamese.bids.layout import collect_t1w, query_t1w, walk_t1w
from bids_siamese.errors import EmptySelectionError

FILES = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-01/anat/sub-01_acq-mprage_run-02_T1w.nii.gz",
    "sub-01/anat/sub-01_rec-norm_T1w.nii",
    "sub-01/anat/sub-01_T2w.nii.gz",
    "sub-01/anat/sub-01_T1w.json",
    "sub-01/anat/.sub-01_T1w.nii.gz",
    "sub-01/func/sub-01_task-rest_bold.nii.gz",
    "sub-01/sub-01_T1w.nii.gz",
    "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
    "sub-02/ses-1/anat/sub-02_ses-1_ce-gad_T1w.nii.gz",
    "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii.gz",
    "sub-02/ses-2/func/sub-02_ses-2_task-rest_bold.nii.gz",
    "sub-02/ses-3/sub-02_ses-3_scans.tsv",
    "sub-03/anat/sub-03_T1w.nii.gz",
    "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz",
    "sourcedata/sub-01/anat/sub-01_T1w.nii.gz",
]


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for name in FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    return root


def _selection(scans):
    return [(str(s.path), s.entities) for s in scans]


@pytest.mark.parametrize("subjects, sessions", [(["01", "02", "03"], None), (["02"], ["2"]), (["01", "03"], None),
                                                (["02"], ["1", "3"])])
def test_walk_selects_what_pybids_selects(dataset, subjects, sessions):
    walked = walk_t1w(dataset, subjects, sessions)
    assert _selection(walked) == _selection(query_t1w(dataset, subjects, sessions, {}))
    assert walked, "the cases select scans"
    if subjects == ["01", "02", "03"]:
        assert {s.path.name for s in walked} == {
            "sub-01_T1w.nii.gz", "sub-01_acq-mprage_run-02_T1w.nii.gz", "sub-01_rec-norm_T1w.nii",
            "sub-02_ses-1_T1w.nii.gz", "sub-02_ses-1_ce-gad_T1w.nii.gz", "sub-02_ses-2_run-1_T1w.nii.gz",
            "sub-03_T1w.nii.gz"}
        run = next(s for s in walked if "mprage" in s.path.name)
        assert run.entities == {"subject": "01", "acquisition": "mprage", "run": "02"}


def test_filter_file_query_still_uses_pybids(dataset):
    scans = collect_t1w(dataset, ["01", "02"], None, {"t1w": {"acquisition": "mprage"}})
    assert [s.path.name for s in scans] == ["sub-01_acq-mprage_run-02_T1w.nii.gz"]
    with pytest.raises(EmptySelectionError):
        collect_t1w(dataset, ["02"], ["9"])
