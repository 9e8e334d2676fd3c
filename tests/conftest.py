"""Shared fixtures: a minimal hand-made BIDS dataset and helpers to run the CLI."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_siamese.cli.main import main

# The tests run the app's console scripts and tools (bids-siamese, bids-validator-deno, hadolint) from the
# environment that runs pytest, also when it is not activated (`.venv/bin/python -m pytest`).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def write_t1w(path: Path, shape=(20, 24, 20), zooms=(2.0, 2.0, 2.0), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 10, size=shape).astype(np.int16)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -np.array(shape) * np.array(zooms) / 2
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(path)
    return path


def make_mini_bids(root: Path) -> Path:
    """Two subjects: sub-01 with sessions 1 and 2, sub-02 with session 1."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "mini", "BIDSVersion": "1.10.0", "DatasetType": "raw", "Authors": ["a", "b"]})
    )
    (root / "README").write_text("A minimal dataset for bids-siamese tests.\n")
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\n")
    for sub, ses in [("01", "1"), ("01", "2"), ("02", "1")]:
        anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
        write_t1w(anat / f"sub-{sub}_ses-{ses}_T1w.nii.gz", seed=int(sub + ses))
        (anat / f"sub-{sub}_ses-{ses}_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    return root


@pytest.fixture
def mini_bids(tmp_path: Path) -> Path:
    return make_mini_bids(tmp_path / "bids")


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime)
    return out


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""

    def _run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


def raw_nifti_with_zero_pixdim(path: Path, shape=(20, 24, 20), seed=0) -> Path:
    """A NIfTI whose raw header has pixdim 0 and no qform/sform (nibabel would read 1 mm voxels)."""
    import gzip
    import struct

    data = np.random.default_rng(seed).normal(100, 10, size=shape).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(None, 0)
    img.set_sform(None, 0)
    raw = bytearray(img.to_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4], after the 76-byte offset and pixdim[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


#: Ways a T1w file can be unusable, by session label of :func:`add_broken_subject`.
BROKEN_KINDS = ("truncated", "fourd", "nan", "constant", "hundredmm", "pixdimzero")


def add_broken_subject(root: Path, label: str = "09") -> dict[str, Path]:
    """``sub-<label>`` with one session per :data:`BROKEN_KINDS` entry, each scan broken that way."""
    paths = {}
    for kind in BROKEN_KINDS:
        path = root / f"sub-{label}" / f"ses-{kind}" / "anat" / f"sub-{label}_ses-{kind}_T1w.nii.gz"
        if kind == "pixdimzero":
            raw_nifti_with_zero_pixdim(path)
        else:
            write_t1w(path, zooms=(100.0, 100.0, 100.0) if kind == "hundredmm" else (2.0, 2.0, 2.0))
            img = nib.load(path)
            data = np.asanyarray(img.dataobj).astype(np.float32)
            if kind == "truncated":
                raw = path.read_bytes()
                path.write_bytes(raw[: len(raw) // 3])
            elif kind == "fourd":
                nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine).to_filename(path)
            elif kind == "nan":
                data[3, 3, 3] = np.nan
                nib.Nifti1Image(data, img.affine).to_filename(path)
            elif kind == "constant":
                nib.Nifti1Image(np.full_like(data, 7.0), img.affine).to_filename(path)
        paths[kind] = path
    return paths


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The tiny demo dataset (``bids-siamese-demo DIR --size tiny``, seed 0), made once per session; read only."""
    from bids_siamese.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_demo") / "bids"
    generate(root, size="tiny", seed=0)
    return root


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored afterwards): reproducible CPU results, no oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
