"""The simulated head (CSF, skull, scalp, neck and spinal cord) around the skull-stripped template brain."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .fields import smooth_displacement, soft_step, upsample_linear


def make_head(brain: np.ndarray, rng: np.random.Generator, voxel_size: float = 1.0) -> np.ndarray:
    """Simulated T1w head around a skull-stripped brain (same grid, RAS axis order, intensities like the brain).

    Layers built from distance transforms of a closed hull of the brain mask: CSF gap (dark), inner table (very
    dark), diploe (medium), outer table (very dark); then, outside the skull (or outside the neck), galea/muscle
    (medium), subcutaneous fat (bright), skin (medium) and air (0). A spinal cord in a CSF-filled canal continues
    the brainstem downwards inside a neck column of muscle-like tissue. Layer thicknesses vary smoothly (about
    +-25 %). The grid must leave room: about 20 mm around the brain and 40 mm below it.
    """
    mask = brain > 0
    shape = brain.shape
    step = 2  # distances on a 2 mm grid, then linear upsampling (distance maps are smooth)
    h = step * voxel_size
    small = mask[::step, ::step, ::step]
    hull = ndi.binary_closing(small, structure=ndi.generate_binary_structure(3, 1), iterations=2)
    hull = ndi.binary_fill_holes(hull)
    # spinal canal below the lowest brain slice (the medulla), and the neck column around it
    z_low = int(np.nonzero(small.any(axis=(0, 1)))[0].min())
    cx, cy = (np.argwhere(small[:, :, z_low]).mean(axis=0) * h).tolist()
    xs = np.arange(small.shape[0]) * h - cx
    ys = np.arange(small.shape[1]) * h - cy
    r2 = lambda ax, ay, dy=0.0: (xs[:, None] / ax) ** 2 + ((ys[None, :] - dy) / ay) ** 2  # noqa: E731
    canal = r2(9.0, 8.0) <= 1.0
    cord = r2(5.5, 4.5) <= 1.0
    top = z_low + 2
    hull[:, :, :top] |= canal[:, :, None]
    # neck: elliptic column (52 x 46 mm) with a dome-shaped top that tucks under the skull base
    z_rel = np.arange(small.shape[2]) * h - (z_low * h - 6.0)
    dome = 1.0 - np.clip(z_rel / 34.0, 0.0, None) ** 2
    neck_3d = r2(52.0, 46.0, dy=12.0)[:, :, None] <= dome[None, None, :]
    grid = tuple(s // step + 1 for s in shape)
    kappa = 1.0 + 0.25 * smooth_displacement(grid, 10.0 / step, 1.0, rng)[0][
        : small.shape[0], : small.shape[1], : small.shape[2]
    ]
    kappa = np.clip(kappa, 0.5, 1.6)
    skull_layers = [(2.0, 18.0), (1.5, 5.0), (2.5, 38.0), (1.5, 5.0)]  # CSF gap, inner table, diploe, outer table
    soft_layers = [(1.5, 42.0), (3.5, 100.0), (1.2, 55.0)]  # galea/muscle, fat, skin; then air
    skull_total = sum(t for t, _ in skull_layers)
    d_hull = ndi.distance_transform_edt(~hull, sampling=h).astype(np.float32)
    outer = (d_hull <= skull_total * kappa) | neck_3d
    d_outer = ndi.distance_transform_edt(~outer, sampling=h).astype(np.float32)
    d_hull = upsample_linear(d_hull, step, shape)
    d_outer = upsample_linear(d_outer, step, shape)
    kappa = upsample_linear(kappa.astype(np.float32), step, shape)
    # skull: CSF -> inner table -> diploe -> outer table, as a function of the distance to the brain hull
    value = np.full(shape, skull_layers[0][1], dtype=np.float32)
    boundary = np.zeros(shape, dtype=np.float32)
    for i, (thickness, intensity) in enumerate(skull_layers[:-1]):
        boundary += np.float32(thickness) * kappa
        value += np.float32(skull_layers[i + 1][1] - intensity) * soft_step(d_hull - boundary, 0.8)
    boundary += np.float32(skull_layers[-1][0]) * kappa
    # beyond the skull but inside the neck column: muscle-like tissue with a mild texture
    texture = upsample_linear(smooth_displacement(grid, 3.0, 4.0, rng)[0], step, shape)
    beyond = soft_step(d_hull - boundary, 0.8)
    value += (45.0 + texture - value) * beyond
    # soft tissue outside the skull/neck: galea -> fat -> skin -> air
    soft = np.full(shape, soft_layers[0][1], dtype=np.float32)
    boundary = np.zeros(shape, dtype=np.float32)
    for i, (thickness, intensity) in enumerate(soft_layers):
        boundary += np.float32(thickness) * kappa
        nxt = soft_layers[i + 1][1] if i + 1 < len(soft_layers) else 0.0
        soft += np.float32(nxt - intensity) * soft_step(d_outer - boundary, 0.8)
    outside = soft_step(d_outer, 0.8)
    value += (soft - value) * outside
    # spinal cord (white-matter-like) inside the canal
    cord_1mm = upsample_linear(cord.astype(np.float32), step, shape[:2])
    z_cut = (top - 1) * step
    cord_val = value[:, :, :z_cut] * (1.0 - cord_1mm[:, :, None]) + 72.0 * cord_1mm[:, :, None]
    value[:, :, :z_cut] = cord_val
    value[mask] = brain[mask]
    return np.clip(value, 0.0, None)
