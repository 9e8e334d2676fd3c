"""Atlas regions: ranking of relevance maps by region, and the subcortical-vs-cortical statistics.

Atlases (bundled or user, their label tables, ``region``/``hemisphere``/``structure_class`` per label) are
read by :mod:`bids_siamese.atlas` (import the loader from there). Labels of class ``other`` (ventricles, CSF,
vessels, unknown) are not ranked.

Importance of a region = mean of the 0..1 group relevance map over the region's voxels, divided by the
largest region mean (so the top region has importance 1).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "RANKING_COLUMNS",
    "STATISTICS_COLUMNS",
    "region_means",
    "rank_regions",
    "subject_region_importance",
    "class_contrast",
]

RANKING_COLUMNS = ["region", "hemisphere", "structure_class", "importance", "rank", "label", "voxels",
                   "mean_relevance"]
STATISTICS_COLUMNS = ["level", "comparison", "n", "n_a", "n_b", "mean_a", "mean_b", "difference", "cohens_d",
                      "welch_t", "welch_df", "welch_p", "permutation_p", "n_permutations"]


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
        grid_labels: atlas labels on the same grid (:func:`bids_siamese.atlas.labels_on_grid`).
        table: the atlas label table (:func:`bids_siamese.atlas.label_table`).
        min_voxels: regions with fewer voxels on the grid are left out.

    Returns:
        :data:`RANKING_COLUMNS`, most important first; ``importance`` = region mean / largest region mean.

    Examples:
        >>> from bids_siamese.atlas import label_table
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
