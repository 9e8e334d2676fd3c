"""The symmetry task's scans on the model grid: one (:class:`Scan`, :func:`prepare_scan`) and many
(:class:`ScanStack`: a cohort's training, validation or test scans held as memory-mapped stacks, issue 27).

A :class:`Scan` holds its image (0 outside the brain), its mask and the distance of every voxel to the brain's
border (``depth_mm``, what the lesion simulator places lesions by: 8 bytes a voxel, 6 MB a scan at 2 mm). A list
of them holds about 10 MB per scan at 2 mm; a :class:`ScanStack` holds the images and masks in
:func:`~bids_siamese.train.data.stack_array` stacks (memory-mapped on a temporary file above 256 MiB) and computes a
scan's depth map when the scan is taken out, so that thousands of scans take disk, not memory, with the same
values as the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..train.data import release_pages, stack_array


@dataclass
class Scan:
    """A scan on the model grid with what the simulator needs."""

    volume: np.ndarray
    mask: np.ndarray
    depth_mm: np.ndarray
    key: str = ""


def prepare_scan(volume: np.ndarray, mask: np.ndarray, resolution: float, key: str = "") -> Scan:
    """A :class:`Scan` (the distance-to-border map is computed once here).

    Examples:
        >>> m = np.zeros((8, 8, 8), bool); m[2:6, 2:6, 2:6] = True
        >>> float(prepare_scan(np.ones((8, 8, 8)), m, 4.0).depth_mm.max())
        8.0
    """
    mask = np.asarray(mask) > 0
    depth = ndi.distance_transform_edt(mask) * float(resolution)
    return Scan(np.where(mask, np.asarray(volume, np.float32), 0.0).astype(np.float32), mask, depth, key)


class ScanStack:
    """Scans as two stacks, ``volumes`` ``(N, X, Y, Z)`` float32 (0 outside the brain) and ``masks`` bool (each a
    :func:`~bids_siamese.train.data.stack_array`: memory-mapped when large), and their keys. ``stack[i]`` is the
    :class:`Scan` that :func:`prepare_scan` makes of scan ``i`` (its depth map computed then); ``len``, iteration
    and ``stack[a:b]`` (a list) as for a list of scans.

    Examples:
        >>> m = np.zeros((8, 8, 8), bool); m[2:6, 2:6, 2:6] = True
        >>> stack = ScanStack.gather(2, (8, 8, 8), 4.0, lambda i: (np.full((8, 8, 8), i + 1.0), m, f"s{i}"))
        >>> len(stack), stack[1].key, float(stack[1].volume.max()), float(stack[1].depth_mm.max())
        (2, 's1', 2.0, 8.0)
    """

    def __init__(self, volumes: np.ndarray, masks: np.ndarray, resolution: float, keys: Sequence[str]):
        self.volumes, self.masks, self.resolution, self.keys = volumes, masks, float(resolution), list(keys)

    @classmethod
    def gather(cls, n: int, shape: Sequence[int], resolution: float,
               scan_of: Callable[[int], tuple[np.ndarray, np.ndarray, str]]) -> "ScanStack":
        """The stacks of ``n`` scans ``scan_of(i) -> (volume, mask, key)`` on a grid of ``shape``, taken one at a
        time (the memory of one scan, plus the stacks where they are not memory-mapped)."""
        volumes = stack_array((n, *shape), np.float32)
        masks = stack_array((n, *shape), bool)
        keys = []
        for i in range(n):
            volume, mask, key = scan_of(i)
            mask = np.asarray(mask) > 0
            volumes[i] = np.where(mask, np.asarray(volume, np.float32), 0.0)
            masks[i] = mask
            keys.append(key)
            if i % 64 == 63:
                release_pages(volumes)
                release_pages(masks)
        return cls(volumes, masks, resolution, keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, idx: int | slice) -> Scan | list[Scan]:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        i = int(idx)
        if not -len(self) <= i < len(self):
            raise IndexError(f"scan {i} of {len(self)}")
        return prepare_scan(np.array(self.volumes[i]), np.array(self.masks[i]), self.resolution, self.keys[i])

    def release(self) -> None:
        """Drop the pages of the memory-mapped stacks that this process has read
        (:func:`~bids_siamese.train.data.release_pages`)."""
        release_pages(self.volumes)
        release_pages(self.masks)


def scan_arrays(scans: Sequence[Scan] | ScanStack) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]:
    """``(volumes, masks)`` of scans: the stacks of a :class:`ScanStack` (nothing read), the lists of a list.

    Examples:
        >>> m = np.ones((2, 2, 2), bool)
        >>> [len(a) for a in scan_arrays([prepare_scan(np.ones((2, 2, 2)), m, 1.0)])]
        [1, 1]
    """
    if isinstance(scans, ScanStack):
        return scans.volumes, scans.masks
    return [s.volume for s in scans], [s.mask for s in scans]
