"""Model-grid volumes: finding and loading the participant-level outputs, batching and augmentation.

The participant level writes, per scan, ``<source>_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz``
(float32 on :func:`bids_siamese.resources.model_grid`, 0 outside the brain) and the matching
``desc-brain_mask``. Training holds them in memory as one ``(N, 1, X, Y, Z)`` stack: a float16
:class:`VolumeCache` by default (1.5 MB per scan at 2 mm; ``--volume-cache float32``: a float32 array, 3 MB per
scan); a stack over 256 MiB is memory-mapped on a temporary file (:func:`stack_array`), so cohorts larger than
the node's memory are paged from disk. Indexing either gives float32. The array axes are RAS, so axis 2 of a batch tensor is left-right.
"""
from __future__ import annotations

import logging
import mmap
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..bids.derivatives import PREPROC_SUFFIX, legacy_preproc_pattern, mask_path_for, orientation_qc_path, preproc_name_pattern
from ..errors import BadDataError, NoInputError
from ..qc.gate import qc_record_usable
from ..resources import TEMPLATE, Grid
from .batches import usable_loader_workers
from .pairs import order_sessions, participant_id

LOG = logging.getLogger("bids_siamese.data")

_ENTITY = re.compile(r"(?:^|_)(ses|acq|ce|rec|run)-([a-zA-Z0-9]+)")


def find_preproc(output_dir: Path, subjects: Sequence[str],
                 sessions: Sequence[str] = (), include_unusable: bool = False) -> pd.DataFrame:
    """All model-grid T1w files of the selected subjects: ``participant_id, session, path`` (one per session;
    the first in name order when a session has several runs). The names carry no ``res-`` (the model grid is not
    a TemplateFlow grid); :func:`load_volume` checks each file's grid against ``--resolution`` when it is read.

    Args:
        output_dir: the participant level's OUTPUT_DIR.
        subjects: participant labels (with or without ``sub-``).
        sessions: restrict to these session labels (empty: all).
        include_unusable: keep scans whose orientation QC says ``usable: false`` (left out and logged by
            default; see :mod:`bids_siamese.qc.gate`).

    Raises:
        NoInputError: a selected subject has no such file (names the expected file and the fix).
    """
    rows, missing = [], []
    wanted_sessions = {s.removeprefix("ses-") for s in sessions}
    for sub in subjects:
        pid = participant_id(sub)
        files = sorted((Path(output_dir) / pid).glob(f"**/anat/{pid}{preproc_name_pattern()}"))
        seen: set[str] = set()
        excluded = False
        for path in files:
            entities = dict(_ENTITY.findall(path.name.split(f"_space-{TEMPLATE}")[0]))
            ses = entities.get("ses", "")
            if wanted_sessions and ses not in wanted_sessions:
                continue
            if ses in seen:
                LOG.info("%s: several scans in session '%s'; using the first (%s)", pid, ses, rows[-1][2].name)
                continue
            if not include_unusable and not qc_record_usable(orientation_qc_path(path)):
                LOG.warning("%s: failed the usable-scan gate (usable: false); left out (--include-unusable keeps it)",
                            path.name.split("_space-")[0])
                excluded = True
                continue
            seen.add(ses)
            rows.append((pid, ses, path))
        if not seen and not excluded:
            missing.append(pid)
    if missing:
        legacy = next(iter(Path(output_dir).glob(f"{missing[0]}/**/anat/{legacy_preproc_pattern()}")), None)
        hint = (f" (found {legacy.name}, named by an earlier bids-siamese: rerun the participant level to rename "
                "its outputs)" if legacy else "")
        example = Path(output_dir) / missing[0] / "[ses-<label>/]anat" / (
            f"{missing[0]}[_ses-<label>]_space-{TEMPLATE}_{PREPROC_SUFFIX}")
        raise NoInputError(
            f"no participant-level output for {len(missing)} subject(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): {example} not found{hint}; fix: run the participant level "
            "first for these subjects, or leave them out with --participant-label")
    return pd.DataFrame(rows, columns=["participant_id", "session", "path"])


def first_scan_per_subject(scans: pd.DataFrame, times: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per participant: the scan of the earliest session.

    Examples:
        >>> s = pd.DataFrame({"participant_id": ["sub-1", "sub-1"], "session": ["2", "1"], "path": ["b", "a"]})
        >>> first_scan_per_subject(s)["path"].tolist()
        ['a']
    """
    rows = []
    for pid, group in scans.groupby("participant_id", sort=True):
        first = order_sessions(list(group["session"].astype(str)), (times or {}).get(pid, {}))[0]
        rows.append(group[group["session"].astype(str) == first].iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def load_volume(path: Path, grid: Grid) -> np.ndarray:
    """A model-grid volume as float32 (NaN -> 0), checked against ``grid``.

    Raises:
        BadDataError: unreadable file, or not on the model grid.
    """
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise BadDataError(f"cannot read {path} ({err}); fix: re-run the participant level for this scan") from err
    if data.shape != tuple(grid.shape) or not np.allclose(img.affine, grid.affine, atol=1e-3):
        raise BadDataError(
            f"{path} is not on the {grid.resolution:g} mm model grid (shape {data.shape}, want {grid.shape}); "
            "fix: re-run the participant level with the same --resolution")
    return np.nan_to_num(data, copy=False)


#: Stacks of volumes or masks larger than this (bytes) live in a memory-mapped temporary file rather than in
#: anonymous memory: the kernel pages them in and out as they are used, so a cohort's stack never has to fit in RAM
#: (a float16 stack of 13,200 scans at 2 mm is 20 GB). Below it, the stack is an ordinary array. 256 MiB (1 GiB
#: before issue 27's streaming branch): a step holds up to five such stacks (symmetry: maps, masks and the three
#: normative matrices), each just under the threshold at about 1,000 scans.
SPILL_BYTES = 2 ** 28


#: While a memory-mapped stack is filled, its pages are let go (:func:`release_pages`) every this many scans: the
#: written pages stay in the file and the page cache, not in the filling process's resident memory.
RELEASE_EVERY = 64


def stack_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array: in memory up to :data:`SPILL_BYTES`, else a ``numpy.memmap`` on an unlinked temporary
    file in ``$TMPDIR`` (its disk space is freed when the array is).

    Examples:
        >>> stack_array((2, 3), np.float16).shape
        (2, 3)
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= SPILL_BYTES:
        return np.empty(shape, dtype=dtype)
    LOG.info("a stack of %d model-grid arrays (%s, %.1f GB) is memory-mapped on a temporary file in %s", shape[0],
             np.dtype(dtype).name, nbytes / 1e9, tempfile.gettempdir())
    with tempfile.TemporaryFile(prefix="bids-siamese-stack-") as fh:  # the map keeps its own descriptor
        return np.memmap(fh, dtype=dtype, mode="w+", shape=shape)


def load_volumes(paths: Sequence[Path], grid: Grid) -> np.ndarray:
    """Stack volumes into ``(N, 1, X, Y, Z)`` float32 (memory-mapped when large: :func:`stack_array`)."""
    out = stack_array((len(paths), 1, *grid.shape), np.float32)
    for i, path in enumerate(paths):
        out[i, 0] = load_volume(path, grid)
    return out


#: ``--volume-cache`` choices: the dtype of the in-memory stack of model-grid volumes used for training.
VOLUME_CACHE_DTYPES = ("float16", "float32")


class VolumeCache:
    """Model-grid volumes held in memory at reduced precision; ``cache[idx]`` is float32, like ``array[idx]`` of
    the float32 stack it stands in for (any numpy index: an int, a slice, an index array, a tuple).

    float16 halves the memory of the stack (1.5 MB instead of 3 MB per scan at 2 mm). Its rounding error is at
    most ``2**-11`` (0.05 %) of a value, or ``2**-25`` absolute for values under ``2**-14`` in magnitude; values
    under ``2**-25`` become 0 (the inputs are normalised to an inter-quartile range of 1, so this is far below the
    augmentation noise of 0.05). Whole-array numpy operations need ``np.asarray(cache)`` (a float32 copy).

    Examples:
        >>> cache = VolumeCache(np.array([[1.0, 0.1]], dtype=np.float16))
        >>> cache[0].dtype, cache.shape, len(cache)
        (dtype('float32'), (1, 2), 1)
    """

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def dtype(self) -> np.dtype:
        """The dtype indexing returns (float32); the stored one is ``cache.array.dtype``."""
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self.array.nbytes

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.array[idx], dtype=np.float32)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.array.astype(dtype or np.float32)


def load_volume_cache(paths: Sequence[Path], grid: Grid, dtype: str = "float16") -> VolumeCache | np.ndarray:
    """The training stack of ``paths``: a :class:`VolumeCache` of ``dtype`` float16, or the float32 array of
    :func:`load_volumes` for ``float32``. Volumes are read one at a time, so memory peaks at the stack plus one
    float32 volume.

    Raises:
        BadDataError: as :func:`load_volume`; or a value beyond the float16 range (65504).
    """
    if dtype == "float32":
        return load_volumes(paths, grid)
    return _fill_cache(len(paths), tuple(grid.shape), dtype, lambda i: load_volume(paths[i], grid),
                       lambda i: f"{paths[i]}", "re-run the participant level for this scan, or pass --volume-cache "
                       "float32")


def volume_cache(volumes: Sequence[np.ndarray], dtype: str = "float16") -> VolumeCache | np.ndarray:
    """The training stack ``(N, 1, X, Y, Z)`` of volumes already in memory (all of one shape), as
    :func:`load_volume_cache` holds files: a float16 :class:`VolumeCache`, or a float32 array for ``float32``.

    Raises:
        BadDataError: a value beyond the float16 range (65504).

    Examples:
        >>> cache = volume_cache([np.full((2, 2, 2), 0.5, np.float32)] * 3)
        >>> cache.shape, cache.array.dtype, float(cache[1, 0].max())
        ((3, 1, 2, 2, 2), dtype('float16'), 0.5)
    """
    shape = tuple(np.shape(volumes[0])) if len(volumes) else ()
    if dtype == "float32":
        out = stack_array((len(volumes), 1, *shape), np.float32)
        for i, volume in enumerate(volumes):
            out[i, 0] = volume
        return out
    return _fill_cache(len(volumes), shape, dtype, lambda i: np.asarray(volumes[i], np.float32),
                       lambda i: f"training volume {i}", "pass --volume-cache float32")


def _fill_cache(n: int, shape: tuple[int, ...], dtype: str, volume_of: Callable[[int], np.ndarray],
                name_of: Callable[[int], str], fix: str) -> VolumeCache:
    """A reduced-precision :class:`VolumeCache` of ``n`` volumes ``volume_of(i)`` (float32), filled one by one."""
    if dtype not in VOLUME_CACHE_DTYPES:
        raise ValueError(f"volume cache dtype {dtype!r} is not one of {VOLUME_CACHE_DTYPES}")
    out = stack_array((n, 1, *shape), np.float16)
    limit = float(np.finfo(np.float16).max)
    for i in range(n):
        volume = volume_of(i)
        if volume.size and float(np.abs(volume).max()) > limit:
            raise BadDataError(f"{name_of(i)} has values beyond the float16 range (|value| > {limit:g}); fix: {fix}")
        out[i, 0] = volume
        if i % RELEASE_EVERY == RELEASE_EVERY - 1:
            release_pages(out)
    release_pages(out)
    return VolumeCache(out)


def stored_precision(volume: np.ndarray, dtype: str, name: str = "a volume") -> np.ndarray:
    """``volume`` (float32) as a ``dtype`` training stack would give it back: rounded through float16 for
    ``float16`` (what indexing a :class:`VolumeCache` returns), unchanged for ``float32``. Streaming passes use it
    to score exactly what the in-memory stack held.

    Raises:
        BadDataError: a value beyond the float16 range (65504), as :func:`load_volume_cache`.

    Examples:
        >>> float(stored_precision(np.array([0.1], np.float32), "float16")[0]) == float(np.float16(0.1))
        True
    """
    if dtype == "float32":
        return volume
    if dtype not in VOLUME_CACHE_DTYPES:
        raise ValueError(f"volume cache dtype {dtype!r} is not one of {VOLUME_CACHE_DTYPES}")
    limit = float(np.finfo(np.float16).max)
    if volume.size and float(np.abs(volume).max()) > limit:
        raise BadDataError(f"{name} has values beyond the float16 range (|value| > {limit:g}); fix: pass "
                           "--volume-cache float32")
    return volume.astype(np.float16).astype(np.float32)


class _VolumeReads(torch.utils.data.Dataset):
    """Item ``i``: ``(i, volume)`` of ``paths[i]`` at the stored precision, or ``(i, error)`` for a
    :class:`~bids_siamese.errors.BadDataError` (raised again by :func:`stream_volumes` in the calling process,
    as its one line: a DataLoader would wrap it in a worker traceback)."""

    def __init__(self, paths: Sequence[Path], grid: Grid, dtype: str):
        self.paths, self.grid, self.dtype = list(paths), grid, dtype

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | BadDataError]:
        try:
            volume = stored_precision(load_volume(self.paths[i], self.grid), self.dtype, str(self.paths[i]))
        except BadDataError as err:
            return i, err
        return i, torch.from_numpy(volume)


def _collate_reads(items: list) -> list:
    return items


def stream_volumes(paths: Sequence[Path], grid: Grid, batch_size: int = 8, workers: int = 0,
                   dtype: str = "float32") -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The volumes of ``paths`` read once each, in order, a batch at a time: ``(indices, (B, X, Y, Z) float32
    tensor)``; decoded by ``workers`` DataLoader processes (``--loader-workers``; 0: in this process) while the
    caller works on the previous batch. ``dtype``: the values as a ``--volume-cache`` stack of that dtype would hold
    them (:func:`stored_precision`). Memory: a few batches, whatever the number of scans.

    Raises:
        BadDataError: as :func:`load_volume` (one line, also from a worker).

    Examples:
        >>> from bids_siamese.resources import model_grid
        >>> list(stream_volumes([], model_grid(8.0)))
        []
    """
    if not len(paths):
        return
    workers = usable_loader_workers(workers)
    loader = torch.utils.data.DataLoader(
        _VolumeReads(paths, grid, dtype), batch_size=batch_size, num_workers=workers, collate_fn=_collate_reads,
        multiprocessing_context="fork" if workers else None, prefetch_factor=2 if workers else None)
    for items in loader:
        for _, value in items:
            if isinstance(value, BadDataError):
                raise value
        yield np.array([i for i, _ in items]), torch.stack([v for _, v in items])


class VolumeFiles:
    """Model-grid volumes read from their files on demand: ``files[idx]`` is ``(len(idx), 1, X, Y, Z)`` float32.

    Stands in for the array of :func:`load_volumes` where each volume is needed once (embedding a cohort), so
    memory holds one batch, not N volumes.
    """

    def __init__(self, paths: Sequence[Path], grid: Grid):
        self.paths = [Path(p) for p in paths]
        self.grid = grid

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> np.ndarray:
        rows = np.atleast_1d(np.arange(len(self.paths))[idx])
        return load_volumes([self.paths[i] for i in rows], self.grid)


def load_masks(paths: Sequence[Path], grid: Grid) -> np.ndarray:
    """Brain masks ``(N, X, Y, Z)`` bool for the given preproc files (the mask next to each one; where a mask is
    missing, the non-zero voxels of the volume); memory-mapped when large (:func:`stack_array`)."""
    out = stack_array((len(paths), *grid.shape), bool)
    for i, path in enumerate(paths):
        mask = mask_path_for(path)
        out[i] = (load_volume(mask, grid) > 0.5) if mask.is_file() else (load_volume(path, grid) != 0)
        if i % RELEASE_EVERY == RELEASE_EVERY - 1:
            release_pages(out)
    release_pages(out)
    return out


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    flip_lr: bool = False,
    max_shift: int = 2,
    intensity: float = 0.1,
    noise_std: float = 0.05,
) -> torch.Tensor:
    """Random augmentation of a batch ``(B, C, X, Y, Z)``; channels of one sample get the same transform.

    Per sample: an integer translation of up to ``max_shift`` voxels per axis (zero filled), an intensity
    scale ``1 +- intensity`` and offset ``+- intensity`` inside the brain (non-zero voxels) and Gaussian
    noise of ``noise_std`` inside the brain. Left-right flips (axis 2) happen only with ``flip_lr=True``: a
    mirrored brain is a different brain for twin identification and orientation QC.

    Args:
        x: batch on any device.
        generator: a CPU ``torch.Generator`` (seeded by the caller).
        flip_lr: allow random left-right flips (off by default).
        max_shift: maximum translation in voxels.
        intensity: relative scale/offset range.
        noise_std: noise standard deviation (the inputs have an inter-quartile range of 1).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.zeros(2, 1, 8, 8, 8); x[:, :, 2:6, 2:6, 2:6] = 1.0
        >>> y = augment(x, g)
        >>> y.shape, bool((y[x == 0] == 0).float().mean() > 0.5)
        (torch.Size([2, 1, 8, 8, 8]), True)
    """
    b = x.shape[0]
    out = torch.empty_like(x)
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 3), generator=generator) if max_shift > 0 else \
        torch.zeros((b, 3), dtype=torch.long)
    scale = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * intensity
    offset = (torch.rand(b, generator=generator) * 2 - 1) * intensity
    flips = (torch.rand(b, generator=generator) < 0.5) if flip_lr else torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        vol = _shift(x[i], [int(s) for s in shifts[i]])
        if flips[i]:
            vol = torch.flip(vol, dims=[1])
        outside = vol == 0
        # in place on the shifted copy: the same operations in the same order as
        # ``where(brain, vol * scale + offset + noise, 0)``, without four volume-sized temporaries
        vol.mul_(float(scale[i])).add_(float(offset[i]))
        if noise_std > 0:
            vol.add_(torch.randn(vol.shape, generator=generator).to(vol.device).mul_(noise_std))
        out[i] = vol.masked_fill_(outside, 0.0)
    return out


def _shift(vol: torch.Tensor, shifts: Sequence[int]) -> torch.Tensor:
    """Translate ``(C, X, Y, Z)`` by integer voxels, filling with zeros."""
    out = torch.zeros_like(vol)
    src, dst = [slice(None)], [slice(None)]
    for s, n in zip(shifts, vol.shape[1:]):
        if s >= 0:
            src.append(slice(0, n - s))
            dst.append(slice(s, n))
        else:
            src.append(slice(-s, n))
            dst.append(slice(0, n + s))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def family_batches(
    family: Sequence[int],
    has_positive: Sequence[bool],
    batch_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Batches of subject indices for triplet training: whole families, every batch with positives and negatives.

    Each family with a positive pair (a twin family) appears once per epoch; twin families fill up to about
    three quarters of a batch and the rest is taken from the other subjects (singletons and families without
    positives, cycled in random order), so that every anchor has non-relatives to mine negatives from.

    Args:
        family: family index per subject.
        has_positive: per subject, whether it has a positive (MZ co-twin, or DZ with ``--dz-positives``).
        batch_size: target subjects per batch (at least 3).
        rng: numpy random generator.

    Examples:
        >>> fam = [0, 0, 1, 1, 2, 3, 4]
        >>> pos = [True, True, True, True, False, False, False]
        >>> batches = family_batches(fam, pos, 4, np.random.default_rng(0))
        >>> sorted(len(b) for b in batches), sorted(int(i) for b in batches for i in b if pos[i])
        ([4, 4], [0, 1, 2, 3])
    """
    family = np.asarray(family)
    has_positive = np.asarray(has_positive, dtype=bool)
    twin_fams = sorted({int(f) for f in family[has_positive]})
    others = np.flatnonzero(~np.isin(family, twin_fams))
    members = {f: np.flatnonzero(family == f) for f in twin_fams}
    order = rng.permutation(len(twin_fams))
    target_twins = max(2, int(round(batch_size * 0.75)))
    batches, current = [], []
    for k in order:
        fam_idx = members[twin_fams[k]]
        if current and len(current) + len(fam_idx) > target_twins:
            batches.append(current)
            current = []
        current = current + fam_idx.tolist()
    if current:
        batches.append(current)
    pool = rng.permutation(others).tolist() if len(others) else []
    out = []
    for i, batch in enumerate(batches):
        fill = max(1, batch_size - len(batch))
        extra = [pool[(i * fill + j) % len(pool)] for j in range(min(fill, len(pool)))] if pool else []
        out.append(np.asarray(batch + extra, dtype=int))
    if not pool and len(out) > 1:
        # without other subjects, a batch holding one family has no negatives: merge batches pairwise
        merged = [np.concatenate(out[i:i + 2]) for i in range(0, len(out) - len(out) % 2, 2)]
        if len(out) % 2:
            merged[-1] = np.concatenate([merged[-1], out[-1]])
        out = merged
    return out


def pair_batches(n_pairs: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of pair indices (the last one may be smaller).

    Examples:
        >>> [len(b) for b in pair_batches(5, 2, np.random.default_rng(0))]
        [2, 2, 1]
    """
    order = rng.permutation(n_pairs)
    return [order[i:i + batch_size] for i in range(0, n_pairs, batch_size)]


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a :func:`stack_array` memory map from this process's resident memory (its data stay in
    the file and the page cache, and are paged back in when read): a pass over a stack a scan or a slab at a time
    then holds one scan or slab, not every page it has touched. Arrays in memory are left alone.

    Examples:
        >>> release_pages(np.zeros(3))  # an ordinary array: nothing to do
    """
    mapped = getattr(array, "_mmap", None)
    if isinstance(array, np.memmap) and mapped is not None:
        mapped.madvise(mmap.MADV_DONTNEED)
