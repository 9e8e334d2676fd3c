"""A per-scan normative expectation of the asymmetry map: the dataset's main modes of normal asymmetry.

Why. The group reference of :func:`bids_siamese.symmetry.asymmetry.group_reference` compares every scan with
one voxelwise median map and one voxelwise spread. In a heterogeneous population -- heads of different shapes,
sites or anatomies -- each head carries its own large-scale asymmetry pattern (petalia, sulcal and ventricular
asymmetries, a slightly different mid-sagittal plane). Their differences inflate the voxelwise spread, and the
spread that one head's pattern adds swamps another head's lesion.

What. Most of this normal variation lies in a few spatially extended patterns that many scans share; a lesion
is focal and belongs to one scan. So each scan's expected map is the dataset median plus its projection on the
first ``components`` principal modes of the *other* scans' maps (out of fold): the part of its asymmetry
explained by normal variation is removed, the focal rest is kept. The voxelwise spread is then the robust spread
of these residuals across the dataset, and the focal statistic is standardised as before.

How (see :func:`fit_normative`):

* only the left-hemisphere voxels of the analysis mask are used (the maps are antisymmetric);
* scans are split into ``folds`` groups (a participant's sessions stay together, so that one scan's
  idiosyncrasy -- or its lesion -- cannot be explained by the same head's other session); the modes used for a
  scan come from the other folds;
* the modes are robust to the lesions of other scans: each fold's deviations from its median are clipped at
  :data:`CLIP_FACTOR` times their voxelwise :data:`CLIP_QUANTILE` quantile before the decomposition, and a
  scan's coefficients are estimated from its clipped deviation (a lesion cannot pull the projection much),
  while the residual is taken from the unclipped one;
* the decomposition is an eigendecomposition of the fold's Gram matrix (``n x n``), so its cost is
  ``O(n^2 p)`` and the memory that of the maps; a basis uses at most :data:`MAX_BASIS_SCANS` scans (a random
  subset of a larger fold), so that a large cohort's reference costs time linear in its size.

A scan that was not in the dataset (e.g. a held-out scan with a simulated lesion) is projected on the modes of
all the dataset's scans (:meth:`NormativeModel.expected`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..train.data import release_pages, stack_array

#: Default number of modes of normal asymmetry removed from each scan's map (0: the plain median reference).
DEFAULT_COMPONENTS = 10
#: At most this fraction of the training scans of a fold become modes (few scans: fewer modes).
MAX_COMPONENT_FRACTION = 0.25
#: Default number of folds (fewer scans than folds: leave one group out).
DEFAULT_FOLDS = 10
#: Deviations are clipped at :data:`CLIP_FACTOR` times this voxelwise quantile of the fold's absolute deviations
#: before the decomposition and the projection: a lesion is one scan in twenty or more and is clipped, while
#: a minority head (a few scans with the same large-scale pattern) sets the quantile and is kept.
CLIP_QUANTILE = 0.95
CLIP_FACTOR = 1.5
#: At most this many scans (drawn at random, seed ``seed``, when a fold has more) fit a basis: the modes of a large
#: cohort are as well determined from 500 scans as from all, and a basis then costs a bounded time (its Gram matrix is
#: ``O(rows^2 voxels)``), so the reference grows linearly with the cohort (issue 27). Smaller folds use every scan.
MAX_BASIS_SCANS = 500
#: Values of the ``(scans, voxels)`` matrix read at once by the column-chunked passes (:func:`column_chunks`):
#: 2**25 float32 values, 128 MB.
CHUNK_VALUES = 2 ** 25


@dataclass
class Basis:
    """The modes of one fold (or of all scans): ``expected = center + components @ coef``."""

    center: np.ndarray  # (p,)
    clip: np.ndarray  # (p,) voxelwise clipping bound of the deviations
    components: np.ndarray  # (p, r), orthonormal columns

    def expected(self, x: np.ndarray) -> np.ndarray:
        """The expectation of the analysis-voxel vector ``x`` (p,) under this basis."""
        dev = np.clip(x - self.center, -self.clip, self.clip)
        if self.components.shape[1] == 0:
            return self.center.copy()
        return self.center + self.components @ (self.components.T @ dev)


@dataclass
class NormativeModel:
    """Out-of-fold expectations of the dataset's scans and the all-scan basis for new scans.

    Attributes:
        voxels: flat indices of the analysis voxels (left hemisphere) in the grid.
        shape: grid shape.
        member_expected: ``(n, p)`` out-of-fold expectation of each dataset scan at the analysis voxels.
        full: the basis fitted on every scan (for scans outside the dataset).
        folds: fold of each dataset scan.
        n_components: modes per basis.
    """

    voxels: np.ndarray
    shape: tuple[int, int, int]
    member_expected: np.ndarray
    full: Basis
    folds: np.ndarray
    n_components: int

    def _to_map(self, values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        out = np.array(fallback, dtype=np.float32, copy=True).ravel()
        out[self.voxels] = values
        out = out.reshape(self.shape)
        # antisymmetric: the right hemisphere is minus the mirrored left
        nx = self.shape[0]
        out[nx - nx // 2:] = -out[: nx // 2][::-1]
        return out

    def member_mean(self, index: int, fallback: np.ndarray) -> np.ndarray:
        """The expected map (full grid, antisymmetric) of dataset scan ``index``; ``fallback`` elsewhere."""
        return self._to_map(self.member_expected[index], fallback)

    def expected(self, ai: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """The expected map of a scan outside the dataset (projected on every scan's modes)."""
        x = np.asarray(ai, dtype=np.float32).ravel()[self.voxels]
        return self._to_map(self.full.expected(x), fallback)


def fold_assignment(groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each scan: the groups (participants) are shuffled and dealt round-robin into ``folds`` folds.

    Examples:
        >>> f = fold_assignment(["a", "a", "b", "c", "d"], 2)
        >>> bool(f[0] == f[1]), sorted(set(f.tolist()))
        (True, [0, 1])
    """
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    k = max(1, min(int(folds), len(names)))
    fold_of = {names[j]: int(rank % k) for rank, j in enumerate(order)}
    return np.array([fold_of[g] for g in groups], dtype=int)


def column_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Column ranges of an ``(n_rows, n_cols)`` matrix holding about :data:`CHUNK_VALUES` values each (one range
    when the matrix is that small), so that a voxelwise pass over a memory-mapped stack holds one chunk.

    Examples:
        >>> column_chunks(2, 5)
        [slice(0, 5, None)]
    """
    width = max(1, CHUNK_VALUES // max(1, int(n_rows)))
    return [slice(start, min(start + width, n_cols)) for start in range(0, n_cols, width)]


def fit_basis(x: np.ndarray, components: int, rows: np.ndarray | None = None) -> Basis:
    """Median, clipping bounds and the first ``components`` modes of the rows of ``x`` (n, p).

    ``x`` may be a memory-mapped stack (:func:`bids_siamese.train.data.stack_array`): it is read in column chunks
    (:func:`column_chunks`), three passes, and the memory is that of a chunk and the ``(n, n)`` Gram matrix.

    Args:
        x: the scans' values at the analysis voxels.
        components: modes kept.
        rows: the rows to fit (default: all).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> mode = rng.normal(size=50)
        >>> x = rng.normal(size=(30, 1)) * mode + 0.01 * rng.normal(size=(30, 50))
        >>> b = fit_basis(x.astype(np.float32), 1)
        >>> round(abs(float(b.components[:, 0] @ mode / np.linalg.norm(mode))), 2)
        1.0
    """
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
    n, p = len(rows), x.shape[1]
    chunks = column_chunks(n, p)

    def block(cols: slice) -> np.ndarray:
        out = np.asarray(x[rows, cols] if len(chunks) > 1 or len(rows) < x.shape[0] else x, dtype=np.float32)
        release_pages(x)
        return out

    center = np.empty(p, np.float32)
    spread = np.empty(p, np.float32)
    for cols in chunks:
        values = block(cols)
        center[cols] = np.median(values, axis=0)
        spread[cols] = np.quantile(np.abs(values - center[cols]), CLIP_QUANTILE, axis=0)
    clip = CLIP_FACTOR * np.maximum(spread, max(float(np.median(spread)) * 0.1, 1e-6))
    r = int(max(0, min(components, n - 1)))
    if r == 0:
        return Basis(center, clip, np.zeros((p, 0), np.float32))

    def deviation(cols: slice) -> np.ndarray:
        return np.clip(block(cols) - center[cols], -clip[cols], clip[cols]).astype(np.float64)

    gram = np.zeros((n, n))
    for cols in chunks:
        dev = deviation(cols)
        gram += dev @ dev.T
    values, vectors = np.linalg.eigh(gram)
    keep = np.argsort(values)[::-1][:r]
    values, vectors = values[keep], vectors[:, keep]
    ok = values > values[0] * 1e-10 if values.size else np.zeros(0, bool)
    comps = np.empty((p, int(ok.sum())), np.float32)
    for cols in chunks:
        comps[cols] = deviation(cols).T @ vectors[:, ok] / np.sqrt(values[ok])
    return Basis(center, clip, comps)


def basis_rows(rows: np.ndarray, seed: int = 0, limit: int | None = None) -> np.ndarray:
    """``rows`` (sorted indices of the scans a basis may use), or a sorted random subset of ``limit``
    (:data:`MAX_BASIS_SCANS`) of them when there are more.

    Examples:
        >>> basis_rows(np.arange(5)).tolist(), len(basis_rows(np.arange(900), limit=100))
        ([0, 1, 2, 3, 4], 100)
    """
    limit = MAX_BASIS_SCANS if limit is None else int(limit)
    rows = np.asarray(rows)
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def fit_normative(
    ai_maps: Sequence[np.ndarray],
    analysis: np.ndarray,
    groups: Sequence[str] | None = None,
    components: int = DEFAULT_COMPONENTS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> NormativeModel:
    """Out-of-fold normative expectations of ``ai_maps`` (see the module docstring).

    Args:
        ai_maps: the scans' asymmetry maps (antisymmetric, on one grid).
        analysis: boolean mask of the voxels to model (left hemisphere, seen in most scans).
        groups: participant of each scan (scans of one participant share a fold); default: one group per scan.
        components: modes removed; capped at :data:`MAX_COMPONENT_FRACTION` of each fold's training scans.
        folds: number of folds.
        seed: fold shuffling.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> modes = rng.normal(0, 0.05, (2, 6, 4, 4))
        >>> maps = [(a * modes[0] + b * modes[1]) for a, b in rng.normal(size=(40, 2))]
        >>> maps = [m - m[::-1] for m in maps]
        >>> left = np.zeros((6, 4, 4), bool); left[:3] = True
        >>> error = lambda model: max(float(np.abs(model.member_mean(i, np.zeros((6, 4, 4))) - maps[i]).max() /
        ...                                   np.abs(maps[i]).max()) for i in range(40))
        >>> error(fit_normative(maps, left, components=0)) > 0.5, error(fit_normative(maps, left, components=3)) < 0.2
        (True, True)
    """
    shape = tuple(int(s) for s in np.shape(ai_maps[0]))
    voxels = np.flatnonzero(np.asarray(analysis, bool).ravel())
    x = np.stack([np.asarray(a, np.float32).ravel()[voxels] for a in ai_maps])
    return fit_normative_matrix(x, voxels, shape, groups, components, folds, seed)


def fit_normative_matrix(x: np.ndarray, voxels: np.ndarray, shape: Sequence[int], groups: Sequence[str] | None = None,
                         components: int = DEFAULT_COMPONENTS, folds: int = DEFAULT_FOLDS,
                         seed: int = 0) -> NormativeModel:
    """:func:`fit_normative` on the maps' values at the analysis voxels already gathered: ``x`` (n, p) at the
    flat grid indices ``voxels`` of a grid of ``shape`` (the memory of the maps themselves is not needed). ``x``
    may be a memory-mapped stack (:func:`bids_siamese.train.data.stack_array`); the out-of-fold expectations
    ``member_expected`` are then one too, and the bases are fitted a column chunk at a time (:func:`fit_basis`)."""
    shape = tuple(int(s) for s in shape)
    if not isinstance(x, np.memmap):
        x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    groups = list(groups) if groups is not None else [str(i) for i in range(n)]
    fold = fold_assignment(groups, folds, seed)
    expected = stack_array(x.shape, np.float32)  # memory-mapped for a large cohort, as ``x`` may be
    for f in np.unique(fold):
        train = fold != f
        if not train.any():  # a single group: nothing to learn from
            for cols in column_chunks(n, x.shape[1]):
                expected[:, cols] = np.median(np.asarray(x[:, cols], np.float32), axis=0)
            continue
        r = min(int(components), int(MAX_COMPONENT_FRACTION * int(train.sum())))
        basis = fit_basis(x, r, basis_rows(np.flatnonzero(train), seed + int(f)))
        for i in np.flatnonzero(~train):
            expected[i] = basis.expected(np.asarray(x[i], np.float32))
        release_pages(expected)
        release_pages(x)
    r_full = min(int(components), int(MAX_COMPONENT_FRACTION * n))
    full = fit_basis(x, r_full, basis_rows(np.arange(n), seed) if n > MAX_BASIS_SCANS else None)
    return NormativeModel(voxels, shape, expected, full, fold, int(r_full))
