"""Closest relatives at cohort scale: exact k-nearest-neighbour search over scan embeddings, in blocks.

``group --task twin`` embeds each scan once; :func:`nearest_relatives` then finds, for every scan, the ``k``
other scans with the smallest embedding distance, without ever holding the ``N x N`` distance matrix or a pair
table. Queries and candidates are both taken in blocks of ``block`` rows, so the working memory is
``O(N d + N k + block^2)`` (the embeddings, the running top-k, one block of scores) whatever ``N``; the search
is exact (the same distances as :func:`bids_siamese.models.losses.pairwise_distance`), not approximate.
Cost is ``O(N^2 d)`` multiply-adds in BLAS matrix products (see ``benchmarks/relatives.py`` and
docs/benchmarks.md for measured times at N = 1,000 to 100,000).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

#: Rows per block of queries and of candidates (one block of scores is ``BLOCK x BLOCK`` floats: 16 MB).
BLOCK = 2048

#: Columns of ``group_twins_relatives.tsv`` (see docs/outputs.md).
RELATIVE_COLUMNS = ["participant_id", "rank", "relative_id", "distance", "twin_probability", "predicted_twin",
                    "relation"]


def _prepare(embeddings: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ready for dot products: unit length for ``cosine``; squared norms for ``euclidean``."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {x.shape}")
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    if distance == "cosine":
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norm, 1e-12), None
    if distance == "euclidean":
        return x, np.einsum("ij,ij->i", x, x)
    raise ValueError(f"unknown distance '{distance}'; choose cosine or euclidean")


def _block_distance(q: np.ndarray, c: np.ndarray, distance: str, q_sq: np.ndarray | None,
                    c_sq: np.ndarray | None) -> np.ndarray:
    """Distances ``(len(q), len(c))`` with the definitions of ``pairwise_distance`` (euclidean with its 1e-12)."""
    dot = q @ c.T
    if distance == "cosine":
        np.subtract(1.0, dot, out=dot)
        return np.maximum(dot, 0.0, out=dot)
    dot *= -2.0
    dot += q_sq[:, None]
    dot += c_sq[None, :]
    np.maximum(dot, 0.0, out=dot)
    dot += 1e-12
    return np.sqrt(dot, out=dot)


def nearest_relatives(embeddings: np.ndarray, k: int, distance: str = "cosine", block: int = BLOCK
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of each row of ``embeddings`` (exact, blocked).

    Args:
        embeddings: ``(N, d)`` scan embeddings (float32 or float64; computed in that precision).
        k: neighbours per scan (clipped to ``N - 1``).
        distance: ``cosine`` (``1 - cos``, on the L2-normalised rows) or ``euclidean``.
        block: rows per block of queries and of candidates; memory for scores is ``block^2`` floats.

    Returns:
        ``(index, dist)``, both ``(N, k)``: for row ``i`` the indices of its nearest other rows and their
        distances, nearest first (equal distances in no guaranteed order). A row is never its own neighbour.

    Examples:
        >>> e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> nearest_relatives(e, 1)[0].ravel().tolist()
        [1, 0, 3, 2]
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    x, sq = _prepare(embeddings, distance)
    n = len(x)
    k = max(0, min(int(k), n - 1))
    out_index = np.empty((n, k), dtype=np.int64)
    out_dist = np.empty((n, k), dtype=x.dtype)
    if k == 0:
        return out_index, out_dist
    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        q = x[q0:q1]
        q_sq = sq[q0:q1] if sq is not None else None
        best_d = np.full((q1 - q0, k), np.inf, dtype=x.dtype)
        best_i = np.full((q1 - q0, k), -1, dtype=np.int64)
        rows = np.arange(q1 - q0)
        for c0 in range(0, n, block):
            c1 = min(n, c0 + block)
            d = _block_distance(q, x[c0:c1], distance, q_sq, sq[c0:c1] if sq is not None else None)
            lo, hi = max(q0, c0), min(q1, c1)
            if lo < hi:  # the query rows themselves are in this candidate block
                d[np.arange(lo, hi) - q0, np.arange(lo, hi) - c0] = np.inf
            # only candidates closer than a row's current k-th best can enter its top k
            closer = d < best_d[:, -1:]
            n_closer = int(np.count_nonzero(closer))
            if n_closer == 0:
                continue
            if n_closer <= d.size // 8:  # later blocks: few candidates qualify, take just those
                r, col = np.divmod(np.flatnonzero(closer), c1 - c0)
            else:  # first blocks: most candidates qualify, partition each row
                kk = min(k, c1 - c0)
                col = np.argpartition(d, kk - 1, axis=1)[:, :kk] if kk < c1 - c0 else np.broadcast_to(
                    np.arange(c1 - c0), d.shape)
                r = np.broadcast_to(rows[:, None], col.shape)
                r, col = r.ravel(), col.ravel()
            all_r = np.concatenate([np.repeat(rows, k), r])
            all_d = np.concatenate([best_d.ravel(), d[r, col]])
            all_i = np.concatenate([best_i.ravel(), col + c0])
            order = np.lexsort((all_i, all_d, all_r))  # by row, then distance, then index
            starts = np.concatenate([[0], np.cumsum(np.bincount(all_r, minlength=len(rows)))[:-1]])
            keep = order[starts[:, None] + np.arange(k)]  # every row has >= k entries (its current best)
            best_d, best_i = all_d[keep], all_i[keep]
        out_index[q0:q1] = best_i
        out_dist[q0:q1] = best_d
    return out_index, out_dist


def relatives_table(ids: Sequence[str], index: np.ndarray, dist: np.ndarray, threshold_distance: float | None,
                    probability_scale: float | None, relation_of=None) -> pd.DataFrame:
    """``group_twins_relatives.tsv``: one row per scan and candidate, nearest first (:data:`RELATIVE_COLUMNS`).

    Args:
        ids: participant ids, one per embedding row.
        index, dist: from :func:`nearest_relatives`.
        threshold_distance, probability_scale: the model's decision (``distance <= threshold`` predicts a
            co-twin; probability ``sigmoid((threshold - distance) / scale)``); ``None``: n/a.
        relation_of: ``f(id_a, id_b) -> MZ|DZ|sibling|unrelated`` when family data are known, else ``None``.

    Examples:
        >>> t = relatives_table(["sub-1", "sub-2"], np.array([[1], [0]]), np.array([[0.1], [0.1]]), 0.2, 0.05)
        >>> t[["participant_id", "rank", "relative_id", "predicted_twin", "relation"]].values.tolist()
        [['sub-1', 1, 'sub-2', True, 'n/a'], ['sub-2', 1, 'sub-1', True, 'n/a']]
    """
    ids = np.asarray(list(ids), dtype=object)
    n, k = index.shape
    a = np.repeat(ids, k)
    b = ids[index.ravel()] if index.size else np.array([], dtype=object)
    d = dist.ravel().astype(np.float64)
    if threshold_distance is None or probability_scale is None:
        prob = np.full(len(d), np.nan)
        predicted = np.full(len(d), None, dtype=object)
    else:
        z = np.clip((float(threshold_distance) - d) / float(probability_scale), -50, 50)
        prob = 1.0 / (1.0 + np.exp(-z))
        predicted = d <= float(threshold_distance)
    relation = [relation_of(x, y) for x, y in zip(a, b)] if relation_of is not None else ["n/a"] * len(d)
    return pd.DataFrame({
        "participant_id": a, "rank": np.tile(np.arange(1, k + 1), n), "relative_id": b,
        "distance": d.round(6), "twin_probability": np.round(prob, 4), "predicted_twin": predicted,
        "relation": relation,
    }, columns=RELATIVE_COLUMNS)
