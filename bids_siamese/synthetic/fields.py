"""Small pure helpers: smooth random displacement fields, warps, composition, sampling on affine grids."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi


def _interp_axis(arr: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``positions`` (clamped)."""
    n = arr.shape[axis]
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0, n - 1)
    if n == 1:
        return np.repeat(arr, len(pos), axis=axis)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n - 2)
    w = (pos - i0).astype(arr.dtype)
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    a0 = np.take(arr, i0, axis=axis)
    a1 = np.take(arr, i0 + 1, axis=axis)
    a1 -= a0
    a1 *= w
    a0 += a1
    return a0


def upsample_linear(arr: np.ndarray, step: float, shape: Sequence[int]) -> np.ndarray:
    """Separable trilinear upsampling: output voxel ``i`` takes ``arr`` at fractional index ``i / step``.

    Indices beyond the last input sample repeat the edge value.
    """
    out = arr
    for axis, n in enumerate(shape):
        out = _interp_axis(out, axis, np.arange(n) / step)
    return out


def smooth_displacement(
    shape: Sequence[int],
    sigma_vox: float,
    amplitude: float,
    rng: np.random.Generator,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """A smooth random displacement field of shape ``(3, *shape)`` (float32).

    Each component is Gaussian-smoothed white noise (smoothing ``sigma_vox`` voxels) scaled to a standard
    deviation of ``amplitude`` (same unit the caller uses, voxels or mm), then multiplied by ``weight``
    (broadcast over components) if given. For speed the noise is drawn on a lattice coarser by about
    ``sigma_vox / 2`` and upsampled linearly, which keeps the field smooth.

    Examples:
        >>> f = smooth_displacement((20, 20, 20), 4.0, 1.5, np.random.default_rng(0))
        >>> f.shape, f.dtype
        ((3, 20, 20, 20), dtype('float32'))
        >>> 1.0 < float(f.std()) < 2.0
        True
    """
    shape = tuple(int(s) for s in shape)
    step = max(1, int(sigma_vox // 2))
    coarse = tuple(int(np.ceil((s - 1) / step)) + 1 for s in shape)
    out = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        noise = rng.standard_normal(coarse, dtype=np.float32)
        noise = ndi.gaussian_filter(noise, sigma_vox / step, mode="reflect")
        noise *= np.float32(amplitude / max(float(noise.std()), 1e-12))
        out[c] = upsample_linear(noise, step, shape) if step > 1 else noise
    if weight is not None:
        out *= weight.astype(np.float32)[None]
    return out


def warp(volume: np.ndarray, displacement: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Pull-back warp on the same grid: ``out[x] = volume[x + displacement[:, x]]`` (displacement in voxels).

    Examples:
        >>> v = np.arange(5.0)[:, None, None] * np.ones((5, 2, 2))
        >>> d = np.zeros((3, 5, 2, 2)); d[0] = 1.0
        >>> warp(v, d)[:4, 0, 0].tolist()
        [1.0, 2.0, 3.0, 4.0]
    """
    coords = np.indices(volume.shape, dtype=np.float32)
    coords += displacement.astype(np.float32)
    return ndi.map_coordinates(
        volume, coords, order=order, mode="constant", cval=cval, output=np.float32, prefilter=order > 1
    )


def jacobian_determinant(displacement: np.ndarray, spacing: float = 1.0) -> np.ndarray:
    """Jacobian determinant of ``x -> x + displacement(x)``; displacement in the unit of ``spacing``."""
    grads = [np.gradient(displacement[c], spacing) for c in range(3)]
    j = [[grads[r][c] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    ).astype(np.float32)


def apply_affine_grid(affine: np.ndarray, shape: Sequence[int], offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Coordinates ``affine @ [i, j, k, 1]`` of all voxels of a block, shape ``(3, *shape)`` float32.

    ``offset`` is the index of the block's first voxel in the full grid.
    """
    idx = [np.arange(o, o + n, dtype=np.float64) for o, n in zip(offset, shape)]
    out = np.empty((3, *shape), dtype=np.float32)
    for a in range(3):
        acc = np.float32(affine[a, 3]) + np.zeros(tuple(shape), dtype=np.float32)
        for ax in range(3):
            if affine[a, ax] != 0.0:
                bshape = [1, 1, 1]
                bshape[ax] = -1
                acc += (affine[a, ax] * idx[ax]).astype(np.float32).reshape(bshape)
        out[a] = acc
    return out


def sample(
    volume: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, order: int = 1, cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """Values of ``volume`` (voxel->mm ``affine``) at ``points_mm`` (shape ``(3, ...)``), float32."""
    inv = np.linalg.inv(affine)
    coords = np.empty_like(points_mm, dtype=np.float32)
    for a in range(3):
        acc = np.full(points_mm.shape[1:], inv[a, 3], dtype=np.float32)
        for b in range(3):
            if inv[a, b] != 0.0:
                acc += np.float32(inv[a, b]) * points_mm[b]
        coords[a] = acc
    return ndi.map_coordinates(
        volume, coords, order=order, mode=mode, cval=cval, output=np.float32, prefilter=order > 1
    )


def sample_field(field: np.ndarray, affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """The 3 components of a displacement ``field`` (``(3, ...)``, voxel->mm ``affine``) at ``points_mm``."""
    return np.stack([sample(field[c], affine, points_mm, order=1, mode="nearest") for c in range(3)])


def soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """A smooth-enough 0 -> 1 ramp centred at 0 over ``width`` (linear, clipped), float32."""
    out = np.multiply(x, np.float32(1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def index_translation(offset: Sequence[int]) -> np.ndarray:
    """Voxel-index translation matrix (crop index -> full-grid index)."""
    m = np.eye(4)
    m[:3, 3] = offset
    return m


def compose(outer: np.ndarray, inner: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Displacement of ``t -> (t + inner(t)) + outer(t + inner(t))`` on the grid of both fields."""
    points = apply_affine_grid(affine, inner.shape[1:])
    points += inner
    return inner + sample_field(outer, affine, points)


def exponentiate(velocity: np.ndarray, affine: np.ndarray, steps: int = 6) -> np.ndarray:
    """Displacement of the flow of a stationary velocity field (scaling and squaring): diffeomorphic.

    ``velocity`` is ``(3, ...)`` in mm on the grid with voxel->mm ``affine``; so is the result.
    """
    disp = velocity / np.float32(2**steps)
    for _ in range(steps):
        disp = compose(disp, disp, affine)
    return disp


def upsample_block(coarse: np.ndarray, step: int, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Block ``[start, stop)`` of the linear upsampling of ``coarse`` by ``step`` (see :func:`upsample_linear`)."""
    out = coarse
    for axis, (a, b) in enumerate(zip(start, stop)):
        out = _interp_axis(out, axis, np.arange(a, b) / step)
    return out
