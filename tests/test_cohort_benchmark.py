"""The cohort-scale benchmark (``benchmarks/cohort.py``, issue 27) and the memory-mapped training stacks it
measures (``train/data.py``: :func:`~bids_siamese.train.data.stack_array`)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_siamese.resources import model_grid
from bids_siamese.train import data

COHORT = Path(__file__).resolve().parents[1] / "benchmarks" / "cohort.py"


def write_grid_volumes(folder: Path, n: int, resolution: float = 8.0) -> list[Path]:
    """``n`` random model-grid volumes at ``resolution`` with a brain mask next to each."""
    grid = model_grid(resolution)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        vol = rng.normal(1.0, 0.3, grid.shape).astype(np.float32)
        vol[: grid.shape[0] // 4] = 0
        path = folder / f"sub-{i:02d}_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
        nib.Nifti1Image(vol, grid.affine).to_filename(path)
        nib.Nifti1Image((vol != 0).astype(np.uint8), grid.affine).to_filename(data.mask_path_for(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_large_stacks_are_memory_mapped_with_the_same_values(tmp_path, monkeypatch, dtype):
    paths = write_grid_volumes(tmp_path, 3)
    grid = model_grid(8.0)
    in_memory = data.load_volume_cache(paths, grid, dtype)
    masks = data.load_masks(paths, grid)
    monkeypatch.setattr(data, "SPILL_BYTES", 0)
    mapped = data.load_volume_cache(paths, grid, dtype)
    mapped_masks = data.load_masks(paths, grid)
    stored = mapped.array if dtype == "float16" else mapped
    assert isinstance(stored, np.memmap) and isinstance(mapped_masks, np.memmap)
    assert not isinstance(in_memory.array if dtype == "float16" else in_memory, np.memmap)
    np.testing.assert_array_equal(mapped[np.arange(3)], in_memory[np.arange(3)])
    np.testing.assert_array_equal(mapped_masks, masks)
    assert mapped[1].dtype == np.float32 and mapped_masks.dtype == bool


def test_the_temporary_file_of_a_mapped_stack_is_not_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SPILL_BYTES", 0)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(data.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    stack = data.stack_array((4, 5), np.float16)
    stack[:] = 2.0
    assert float(stack.sum()) == 40.0
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: its space goes with the array


@pytest.mark.slow
def test_cohort_benchmark_runs_every_group_step_at_a_tiny_cohort(tmp_path, tiny_demo):
    """12 subjects from the tiny demo at 4 mm: the participant level on the demo's 7 scans, the cohort, the six
    group steps through the CLI; the JSON has every step with its figures, and every step succeeded. (At 8 mm the
    seed's orientation model cannot train: a batch of one reaches a BatchNorm at 1x1x1 voxels; see issue 27.)"""
    out = tmp_path / "n12.json"
    cohort = runpy.run_path(str(COHORT), run_name="cohort_benchmark")
    code = cohort["main"](["--subjects", "12", "--json", str(out), "--work", str(tmp_path / "work"),
                           "--resolution", "4", "--demo", str(tiny_demo)])
    report = json.loads(out.read_text())
    assert set(report["steps"]) == set(cohort["STEPS"])
    for name, step in report["steps"].items():
        assert {"wall_s", "cpu_s", "peak_rss_gb", "disk_gb", "ok"} <= set(step), name
        assert step["ok"] is True, (name, (tmp_path / "work" / f"cohort-12-{name}.log").read_text()[-2000:])
        assert step["wall_s"] > 0 and step["cpu_s"] > 0 and step["peak_rss_gb"] > 0.05, name
    assert code == 0
    assert report["cohort"]["subjects"] == 12 and report["cohort"]["scans"] > 12
    assert report["cohort"]["twin_pairs"] >= 3
    assert not (tmp_path / "work" / "cohort-12").exists()  # removed without --keep
