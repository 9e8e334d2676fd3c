"""Atlas regions: ranking of relevance maps by region, and the subcortical-vs-cortical statistics.

Atlases are read offline: the four bundled ones (:func:`bids_siamese.resources.atlas_paths`:
``harvard_oxford`` cortical + subcortical, probabilistic; ``aal`` with cerebellum; ``desikan_killiany``;
``neuromorphometrics`` with thalamus, brainstem, cerebellum, ventral diencephalon) or a user atlas: a
NIfTI in template space (3D labels, or 4D probabilities, one volume per label) with a label table
(TSV or CSV with ``index`` and ``name`` columns; optional ``hemisphere`` and ``structure_class``).
A probabilistic atlas is turned into labels by maximum probability among labels of at least 25 %
(the usual ``maxprob-thr25``).

Every label gets a ``region`` (its name without hemisphere), a ``hemisphere`` (``L``, ``R`` or
``bilateral``) and a ``structure_class`` (``cortical``, ``subcortical``, ``cerebellar``, ``brainstem``,
``white-matter``; ventricles, CSF, vessels and unknown labels are ``other`` and not ranked).

Importance of a region = mean of the 0..1 group relevance map over the region's voxels, divided by the
largest region mean (so the top region has importance 1).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, stats

from ..errors import NoInputError, UsageError

__all__ = [
    "STRUCTURE_CLASSES",
    "RANKING_COLUMNS",
    "STATISTICS_COLUMNS",
    "Atlas",
    "parse_label",
    "structure_class",
    "label_table",
    "load_atlas",
    "labels_on_grid",
    "region_means",
    "rank_regions",
    "subject_region_importance",
    "class_contrast",
]

STRUCTURE_CLASSES = ("cortical", "subcortical", "cerebellar", "brainstem", "white-matter")
RANKING_COLUMNS = ["region", "hemisphere", "structure_class", "importance", "rank", "label", "voxels",
                   "mean_relevance"]
STATISTICS_COLUMNS = ["level", "comparison", "n", "n_a", "n_b", "mean_a", "mean_b", "difference", "cohens_d",
                      "welch_t", "welch_df", "welch_p", "permutation_p", "n_permutations"]

PROBABILITY_THRESHOLD = 0.25

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
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    table: pd.DataFrame


def maxprob_labels(prob: np.ndarray, indices: Iterable[int], threshold: float = PROBABILITY_THRESHOLD) -> np.ndarray:
    """Discrete labels from a 4D probabilistic atlas: the most probable label where it reaches ``threshold``.

    Args:
        prob: ``(X, Y, Z, n)`` probabilities (0..1, or 0..100 percentages).
        indices: label value of each volume (must not contain 0 when 0 means background... they are shifted
            by one internally so that index 0 is allowed).
        threshold: minimum probability (fraction).

    Returns:
        ``int32`` labels: ``index + 1`` of the winning volume, 0 for background.

    Examples:
        >>> p = np.zeros((2, 1, 1, 2)); p[0, 0, 0] = [0.6, 0.3]; p[1, 0, 0] = [0.1, 0.2]
        >>> maxprob_labels(p, [0, 1])[:, 0, 0].tolist()
        [1, 0]
    """
    indices = np.asarray(list(indices), dtype=np.int32)
    scale = 100.0 if prob.max() > 1.0 + 1e-6 else 1.0
    best = np.zeros(prob.shape[:3], dtype=np.float32)
    winner = np.zeros(prob.shape[:3], dtype=np.int32)
    for k in range(prob.shape[3]):
        vol = np.asarray(prob[..., k], dtype=np.float32) / scale
        better = vol > best
        best[better] = vol[better]
        winner[better] = indices[k] + 1
    winner[best < threshold] = 0
    return winner


def _read_label_file(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        return pd.read_csv(path, sep=sep)
    except (OSError, ValueError) as err:
        raise NoInputError(f"cannot read atlas labels {path}: {err}; fix: give a TSV with index and name") from err


@lru_cache(maxsize=8)
def load_atlas(spec: str, labels: str | None = None) -> Atlas:
    """Load a bundled atlas by name, or a user atlas NIfTI with its label table.

    Args:
        spec: ``harvard_oxford``, ``aal``, ``desikan_killiany``, ``neuromorphometrics``, a NIfTI path, or
            ``IMAGE.nii.gz:LABELS.tsv``.
        labels: label table of a user atlas (default: the image's name with ``.tsv``, then ``.csv``).

    Raises:
        NoInputError: a file is missing or unreadable.
        UsageError: the label table lacks ``index``/``name``.
    """
    from ..resources import ATLASES, atlas_paths

    if spec in ATLASES:
        image_path, label_path, kind = atlas_paths(spec)
        name = spec
    else:
        image_text, _, label_text = str(spec).partition(".nii.gz:") if ".nii.gz:" in str(spec) else (str(spec), "", "")
        image_path = Path(image_text + (".nii.gz" if label_text else ""))
        if not image_path.is_file():
            raise NoInputError(f"atlas {spec}: {image_path} not found; fix: --atlas one of "
                               f"{', '.join(sorted(ATLASES))} or an existing NIfTI (with a label TSV beside it)")
        stem = image_path.name.split(".nii")[0]
        candidates = [Path(label_text)] if label_text else ([Path(labels)] if labels else [
            image_path.with_name(stem + ".tsv"), image_path.with_name(stem + ".csv")])
        label_path = next((c for c in candidates if c.is_file()), None)
        if label_path is None:
            raise NoInputError(f"atlas {image_path}: no label table ({', '.join(map(str, candidates))}); fix: "
                               "write a TSV with columns index and name beside the atlas")
        kind, name = "auto", stem
    img = nib.load(str(image_path))
    table = label_table(_read_label_file(Path(label_path)))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] > 1:
        if len(table) != data.shape[3]:
            raise UsageError(f"atlas {image_path}: {data.shape[3]} volumes but {len(table)} labels; fix: one label "
                             "row per volume (index = volume number)")
        vol = maxprob_labels(data, range(len(table)))
        table = table.assign(index=np.arange(1, len(table) + 1))  # volume k -> label k + 1
    else:
        vol = np.asarray(data.reshape(data.shape[:3]), dtype=np.int32)
    del kind
    return Atlas(name=name, labels=vol, affine=np.asarray(img.affine, dtype=float), table=table)


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


def region_means(values: np.ndarray, labels: np.ndarray, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` and voxel count per label index (NaN where a label has no voxel).

    Examples:
        >>> m, n = region_means(np.array([1.0, 3.0, 5.0]), np.array([1, 1, 2]), [1, 2, 3])
        >>> m.tolist()[:2], n.tolist()
        ([2.0, 5.0], [2, 1, 0])
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    flat_labels = np.asarray(labels).ravel().astype(np.int64)
    flat_values = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel())
    size = int(max(flat_labels.max(initial=0), indices.max(initial=0))) + 1
    sums = np.bincount(flat_labels, weights=flat_values, minlength=size)
    counts = np.bincount(flat_labels, minlength=size)
    n = counts[indices]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n > 0, sums[indices] / np.maximum(n, 1), np.nan)
    return means, n.astype(int)


def rank_regions(group_map: np.ndarray, grid_labels: np.ndarray, table: pd.DataFrame, min_voxels: int = 1) -> pd.DataFrame:
    """The region ranking of a 0..1 group relevance map.

    Args:
        group_map: group relevance on the grid (0..1).
        grid_labels: atlas labels on the same grid (:func:`labels_on_grid`).
        table: the atlas label table (:func:`label_table`).
        min_voxels: regions with fewer voxels on the grid are left out.

    Returns:
        :data:`RANKING_COLUMNS`, most important first; ``importance`` = region mean / largest region mean.

    Examples:
        >>> tab = label_table(pd.DataFrame({"index": [1, 2, 3], "name": ["Left_Thalamus", "Right_Thalamus",
        ...                                  "Left_Precentral"]}))
        >>> rank_regions(np.array([1.0, 0.5, 0.1, 0.0]), np.array([1, 2, 3, 0]), tab)[["region", "hemisphere",
        ...     "importance", "rank"]].values.tolist()
        [['Thalamus', 'L', 1.0, 1], ['Thalamus', 'R', 0.5, 2], ['Precentral', 'L', 0.1, 3]]
    """
    table = table[table["structure_class"] != "other"]
    means, counts = region_means(group_map, grid_labels, table["index"])
    out = pd.DataFrame({
        "region": table["region"].values,
        "hemisphere": table["hemisphere"].values,
        "structure_class": table["structure_class"].values,
        "label": table["name"].values,
        "voxels": counts,
        "mean_relevance": means,
    })
    out = out[(out["voxels"] >= min_voxels) & np.isfinite(out["mean_relevance"])].copy()
    top = out["mean_relevance"].max() if len(out) else 1.0
    out["importance"] = (out["mean_relevance"] / top if top > 0 else 0.0).round(4)
    out["mean_relevance"] = out["mean_relevance"].round(6)
    out = out.sort_values(["importance", "label"], ascending=[False, True], kind="stable").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out[RANKING_COLUMNS]


def subject_region_importance(maps: Mapping[str, np.ndarray], grid_labels: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Long table ``participant_id, label, region, hemisphere, structure_class, importance`` per subject map.

    Each subject's map (its scans' 0..1 relevance averaged) is ranked like the group map, so importance is
    relative to that subject's most important region.
    """
    rows = []
    for subject, vol in sorted(maps.items()):
        ranked = rank_regions(vol, grid_labels, table)
        ranked.insert(0, "participant_id", subject)
        rows.append(ranked[["participant_id", "label", "region", "hemisphere", "structure_class", "importance"]])
    cols = ["participant_id", "label", "region", "hemisphere", "structure_class", "importance"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)


def _cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2.0)
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan"), float("nan")
    res = stats.ttest_ind(a, b, equal_var=False)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if (va + vb) > 0 else float("nan")
    return float(res.statistic), float(df), float(res.pvalue)


def _sign_flip_p(diff: np.ndarray, n_permutations: int, rng: np.random.Generator) -> tuple[float, int]:
    """Two-sided p of the mean paired difference by flipping signs within subjects (exact when small)."""
    n = len(diff)
    observed = abs(diff.mean())
    if n == 0:
        return float("nan"), 0
    if 2 ** n <= n_permutations:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        null = np.abs((signs * diff).mean(axis=1))
        return float((null >= observed - 1e-12).sum() / len(null)), len(null)
    signs = rng.choice((1.0, -1.0), size=(n_permutations, n))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + n_permutations)), n_permutations


def _label_shuffle_p(a: np.ndarray, b: np.ndarray, n_permutations: int, rng: np.random.Generator) -> tuple[float, int]:
    pooled = np.concatenate([a, b])
    observed = abs(a.mean() - b.mean())
    hits = 0
    for _ in range(n_permutations):
        perm = rng.permutation(pooled)
        hits += abs(perm[: len(a)].mean() - perm[len(a):].mean()) >= observed - 1e-12
    return float((1 + hits) / (1 + n_permutations)), n_permutations


def class_contrast(per_subject: pd.DataFrame, ranking: pd.DataFrame, class_a: str = "subcortical",
                   class_b: str = "cortical", n_permutations: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Mean importance of ``class_a`` vs ``class_b`` regions: Cohen's d, Welch t-test, permutation p-value.

    Two rows:

    * ``subjects``: per subject, the mean importance of its ``class_a`` regions and of its ``class_b``
      regions (from :func:`subject_region_importance`); Cohen's d (pooled SD) and Welch's t-test between
      the two sets of subject means; permutation p-value by swapping the two means within subjects (sign
      flips of the paired differences, exact enumeration up to ``n_permutations``).
    * ``regions``: the group ranking's region importances of the two classes; Welch's t-test and a
      permutation p-value by shuffling the class labels over regions.

    Returns:
        :data:`STATISTICS_COLUMNS`; ``mean_a``/``mean_b`` are the ``class_a``/``class_b`` means.
    """
    rng = np.random.default_rng(seed)
    comparison = f"{class_a} vs {class_b}"
    rows = []
    if len(per_subject):
        means = per_subject.groupby(["participant_id", "structure_class"])["importance"].mean().unstack()
        if class_a in means and class_b in means:
            means = means[[class_a, class_b]].dropna()
            a, b = means[class_a].to_numpy(float), means[class_b].to_numpy(float)
            t, df, p = _welch(a, b)
            perm_p, n_perm = _sign_flip_p(a - b, n_permutations, rng)
            rows.append({"level": "subjects", "comparison": comparison, "n": len(a), "n_a": len(a), "n_b": len(b),
                         "mean_a": a.mean(), "mean_b": b.mean(), "difference": a.mean() - b.mean(),
                         "cohens_d": _cohens_d(a, b), "welch_t": t, "welch_df": df, "welch_p": p,
                         "permutation_p": perm_p, "n_permutations": n_perm})
    a = ranking.loc[ranking["structure_class"] == class_a, "importance"].to_numpy(float)
    b = ranking.loc[ranking["structure_class"] == class_b, "importance"].to_numpy(float)
    if len(a) and len(b):
        t, df, p = _welch(a, b)
        perm_p, n_perm = _label_shuffle_p(a, b, min(n_permutations, 5000), rng)
        rows.append({"level": "regions", "comparison": comparison, "n": len(a) + len(b), "n_a": len(a),
                     "n_b": len(b), "mean_a": a.mean(), "mean_b": b.mean(), "difference": a.mean() - b.mean(),
                     "cohens_d": _cohens_d(a, b), "welch_t": t, "welch_df": df, "welch_p": p,
                     "permutation_p": perm_p, "n_permutations": n_perm})
    table = pd.DataFrame(rows, columns=STATISTICS_COLUMNS)
    for col in ("mean_a", "mean_b", "difference", "cohens_d", "welch_t", "welch_df"):
        table[col] = table[col].astype(float).round(4)
    return table
