"""Evaluation: thresholds chosen on validation, metrics over random draws, the voxel-correlation baseline, figures.

Scores are "higher means positive" (for twins: minus the embedding distance, or the voxel correlation).
The decision threshold is always chosen on validation pairs (maximum Youden's J = TPR - FPR) and then
applied unchanged to the test pairs; test metrics are the mean and standard deviation over ``n_draws``
random draws of as many non-twin test pairs as there are twin test pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from ..bids.derivatives import atomic_path
from ..reports.figures import SVG_HASHSALT
from .data import release_pages

METRICS = ("accuracy", "precision", "recall", "f1", "auc_roc")
#: Fewer positive validation pairs than this place a decision threshold by chance (Youden's J on a handful of
#: positives jumps from one gap to the next): the twin and longitudinal tasks then say so in one warning line and
#: record ``threshold_reliable`` 0 in their metrics.
MIN_THRESHOLD_POSITIVES = 10
#: A threshold that calls more than this share of the held-out negative pairs (unrelated, stable) positive is
#: reported in one warning line.
MAX_NEGATIVE_POSITIVE_RATE = 0.5


def safe_auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """ROC AUC, NaN when only one class is present.

    Examples:
        >>> safe_auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3]), safe_auc([1, 1], [0.2, 0.3])
        (1.0, nan)
    """
    labels = np.asarray(labels, dtype=float)
    if len(np.unique(labels[~np.isnan(labels)])) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def binary_metrics(labels: Sequence[float], scores: Sequence[float], threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (predicted positive: score >= threshold) and AUC-ROC.

    Examples:
        >>> m = binary_metrics([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], threshold=0.5)
        >>> {k: round(v, 2) for k, v in m.items()}
        {'accuracy': 0.5, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'auc_roc': 0.75}
    """
    y = np.asarray(labels, dtype=float) == 1
    pred = np.asarray(scores, dtype=float) >= threshold
    tp, fp, fn = float((pred & y).sum()), float((pred & ~y).sum()), float((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc_roc": safe_auc(y.astype(float), scores),
    }


def choose_threshold(labels: Sequence[float], scores: Sequence[float]) -> float:
    """The threshold with the largest Youden's J (TPR - FPR) on these (validation) pairs.

    Candidates are the midpoints between consecutive distinct scores; among equally good candidates the middle
    one is taken (the threshold then sits in the middle of the widest gap between the classes).

    Examples:
        >>> choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.8])
        0.4
    """
    y = np.asarray(labels, dtype=float) == 1
    s = np.asarray(scores, dtype=float)
    if not y.any() or y.all():
        raise ValueError("choosing a threshold needs positive and negative validation pairs")
    values = np.unique(s)
    cands = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    tpr = np.array([(s[y] >= c).mean() for c in cands])
    fpr = np.array([(s[~y] >= c).mean() for c in cands])
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(round(cands[best[len(best) // 2]], 12))


def fit_probability_scale(labels: Sequence[float], scores: Sequence[float], threshold: float) -> float:
    """Scale ``s`` of ``p = sigmoid((score - threshold) / s)`` minimising the log loss on these (validation)
    pairs; p = 0.5 stays at the threshold. Searched on a log grid relative to the score spread.

    Examples:
        >>> s = fit_probability_scale([0, 0, 1, 1, 0, 1], [0.1, 0.45, 0.6, 0.9, 0.55, 0.4], 0.5)
        >>> 0.0 < s < 1.0
        True
    """
    y = np.asarray(labels, dtype=float)
    s = np.asarray(scores, dtype=float) - threshold
    spread = float(np.std(s)) or 1.0
    grid = spread * np.logspace(-2, 1, 61)
    best, best_loss = grid[-1], np.inf
    for scale in grid:
        p = np.clip(1.0 / (1.0 + np.exp(-s / scale)), 1e-6, 1 - 1e-6)
        loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        if loss < best_loss - 1e-12:
            best, best_loss = scale, loss
    return float(best)


def probability(scores: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """``sigmoid((scores - threshold) / scale)``.

    Examples:
        >>> probability(np.array([0.5, 1.5]), 0.5, 1.0).round(3).tolist()
        [0.5, 0.731]
    """
    z = np.clip((np.asarray(scores, dtype=float) - threshold) / scale, -50, 50)
    return 1.0 / (1.0 + np.exp(-z))


def draw_metrics(pos_scores: Sequence[float], neg_scores: Sequence[float], threshold: float, n_draws: int,
                 seed: int = 0) -> pd.DataFrame:
    """Metrics over ``n_draws`` draws of ``len(pos_scores)`` negatives (without replacement when the pool is
    large enough) together with all positives; one row per draw.

    The same ``seed`` draws the same negatives (by position), so two scorings of the same pairs (the model
    and the baseline) are compared on identical draws.

    Examples:
        >>> d = draw_metrics([0.9, 0.8], [0.1, 0.2, 0.7, 0.3], threshold=0.5, n_draws=3)
        >>> list(d.columns), len(d)
        (['draw', 'accuracy', 'precision', 'recall', 'f1', 'auc_roc'], 3)
    """
    pos = np.asarray(pos_scores, dtype=float)
    neg = np.asarray(neg_scores, dtype=float)
    rows = []
    if len(pos) == 0 or len(neg) == 0:
        return pd.DataFrame(columns=["draw", *METRICS])
    rng = np.random.default_rng(seed)
    for draw in range(n_draws):
        pick = rng.choice(len(neg), size=len(pos), replace=len(neg) < len(pos))
        labels = np.r_[np.ones(len(pos)), np.zeros(len(pos))]
        rows.append({"draw": draw, **binary_metrics(labels, np.r_[pos, neg[pick]], threshold)})
    return pd.DataFrame(rows)


def summarise(draws: pd.DataFrame, prefix: str = "", metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """``metric, mean, std, n_runs`` from a table with one row per run (std: sample standard deviation).

    Examples:
        >>> summarise(pd.DataFrame({"accuracy": [0.5, 1.0]}), "dz_", ["accuracy"]).values.tolist()
        [['dz_accuracy', 0.75, 0.3536, 2]]
    """
    rows = []
    for m in metrics:
        values = draws[m].astype(float).dropna().to_numpy() if m in draws else np.zeros(0)
        rows.append({
            "metric": f"{prefix}{m}",
            "mean": round(float(values.mean()), 4) if len(values) else float("nan"),
            "std": round(float(values.std(ddof=1)), 4) if len(values) > 1 else (0.0 if len(values) else float("nan")),
            "n_runs": int(len(values)),
        })
    return pd.DataFrame(rows, columns=["metric", "mean", "std", "n_runs"])


def scalar_rows(values: Mapping[str, float]) -> pd.DataFrame:
    """Single-valued rows (``std`` 0, ``n_runs`` 1) for the metrics table, e.g. thresholds and pair counts."""
    return pd.DataFrame([{"metric": k, "mean": v, "std": 0.0, "n_runs": 1} for k, v in values.items()],
                        columns=["metric", "mean", "std", "n_runs"])


#: :func:`voxel_correlation` lets go of the pages of memory-mapped stacks after this many pairs.
RELEASE_EVERY_PAIRS = 128


def voxel_correlation(volumes: np.ndarray, masks: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """The model-free baseline: Pearson correlation of two registered brains inside both brain masks.

    One pair's two volumes are converted to float64 at a time; the pages of memory-mapped stacks are let go every
    :data:`RELEASE_EVERY_PAIRS` pairs, so memory does not grow with the stack.

    Args:
        volumes: ``(N, X, Y, Z)`` or ``(N, 1, X, Y, Z)`` model-grid volumes (an array, or a
            :class:`~bids_siamese.train.data.VolumeCache`, whose stored values are read without a float32 copy).
        masks: ``(N, X, Y, Z)`` bool brain masks.
        pairs: index pairs.

    Returns:
        ``(len(pairs),)`` correlations (NaN where the masks do not overlap).

    Examples:
        >>> v = np.random.default_rng(0).normal(size=(3, 4, 4, 4)); v[2] = 2 * v[0] + 1
        >>> voxel_correlation(v, np.ones((3, 4, 4, 4), bool), [(0, 2), (0, 1)]).round(2)[0]
        np.float64(1.0)
    """
    stored = volumes.array if hasattr(volumes, "array") else np.asarray(volumes)
    vols = stored.reshape(len(stored), -1)
    flat = masks.reshape(len(masks), -1)
    out = np.full(len(pairs), np.nan)
    for k, (i, j) in enumerate(pairs):
        if k % RELEASE_EVERY_PAIRS == RELEASE_EVERY_PAIRS - 1:  # memory-mapped stacks: keep few pages resident
            release_pages(stored)
            release_pages(masks)
        m = flat[i] & flat[j]
        if m.sum() < 3:
            continue
        a, b = vols[i, m].astype(np.float64), vols[j, m].astype(np.float64)
        a -= a.mean()
        b -= b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        out[k] = float((a * b).sum() / denom) if denom > 0 else np.nan
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def plot_history(history: pd.DataFrame, title: str, distance_columns: Sequence[str] = ()):
    """Training and validation loss per epoch (left) and, when given, distance/metric columns (right).

    Returns:
        A matplotlib Figure.
    """
    cols = [c for c in distance_columns if c in history]
    fig = Figure(figsize=(10 if cols else 5.5, 3.8))
    axes = fig.subplots(1, 2 if cols else 1, squeeze=False)
    ax = axes[0, 0]
    ax.plot(history["epoch"], history["train_loss"], "o-", label="training loss", ms=3)
    if "val_loss" in history:
        ax.plot(history["epoch"], history["val_loss"], "s-", label="validation loss", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    if cols:
        ax2 = axes[0, 1]
        for c in cols:
            ax2.plot(history["epoch"], history[c], "o-", ms=3, label=c.replace("val_", "validation ").replace("_", " "))
        ax2.set_xlabel("epoch")
        ax2.legend()
        ax2.set_title("validation")
    fig.tight_layout()
    return fig


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str):
    """ROC curves, one per ``name: (labels, scores)``, with their AUC in the legend.

    Returns:
        A matplotlib Figure.
    """
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.subplots()
    for name, (labels, scores) in curves.items():
        labels = np.asarray(labels, dtype=float)
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=float))
        ax.plot(fpr, tpr, label=f"{name} (AUC {safe_auc(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a figure (a :class:`matplotlib.figure.Figure`, not held by pyplot) atomically, format from the
    suffix; an SVG has no date and a fixed
    ``svg.hashsalt`` (matplotlib salts its element ids with a random uuid otherwise), so reruns write the same
    bytes."""
    path = Path(path)
    with atomic_path(path) as tmp, matplotlib.rc_context({"svg.hashsalt": SVG_HASHSALT}):
        fig.savefig(tmp, format=path.suffix.lstrip("."), metadata={"Date": None} if path.suffix == ".svg" else None)
    return path
