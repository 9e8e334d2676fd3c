"""SVG figures for the per-subject visual report.

Every function here is pure: it takes NumPy arrays and returns an SVG document as a string. Nothing is
written to disk and no global plotting state is touched apart from a scoped ``rc_context`` around
``savefig`` (for the deterministic ``svg.hashsalt``). Figures are built with
:class:`matplotlib.figure.Figure` directly, never with ``pyplot``, so they are safe to draw from worker
threads and need no display.

Conventions
-----------
All volumes are 3D arrays in RAS voxel order: axis 0 runs left -> right, axis 1 posterior -> anterior,
axis 2 inferior -> superior. Slices are shown in *neurological* convention (the subject's left on the
left of the picture, as if looking at the subject from the front/top), and the axial and coronal panels
carry "L" and "R" letters so that a left-right flip is visible at a glance. Sagittal panels carry "P"
(posterior) and "A" (anterior).

Image layers are embedded as PNG inside the SVG (``imshow``) and resampled at a modest DPI so that each
SVG stays well under 500 kB; contours stay vector paths. The output is byte-for-byte reproducible: the
SVG hash salt is fixed and the ``Date`` metadata is dropped.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import contourpy
import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from scipy import ndimage

__all__ = [
    "registration_mosaic",
    "mask_contour_mosaic",
    "orientation_figure",
    "robust_window",
    "select_slices",
]

#: Fixed salt so that the ids matplotlib writes into SVGs are the same on every run.
SVG_HASHSALT = "bids-siamese-report"

#: Raster resolution of the image layers embedded in the SVGs (dots per inch of the figure).
RASTER_DPI = 72

#: Size budget of one SVG; larger figures are re-saved with coarser image layers.
MAX_SVG_BYTES = 480_000

BACKGROUND = "black"
#: The panels' colormap, made once: a name would make matplotlib copy the map and rebuild its lookup table per panel.
GRAY = matplotlib.colormaps["gray"]
LETTER_COLOUR = "#f2f2f2"
MASK_COLOUR = "#ff2d2d"
OUTLINE_COLOUR = "#ffd23f"
TISSUE_COLOUR = "#2ee6ff"

# (view name, axis sliced through, letters at the left/right edges of the panel)
_VIEWS: tuple[tuple[str, int, tuple[str, str]], ...] = (
    ("axial", 2, ("L", "R")),
    ("coronal", 1, ("L", "R")),
    ("sagittal", 0, ("P", "A")),
)


# --------------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------------
def _as_volume(data: np.ndarray, name: str) -> np.ndarray:
    """Return ``data`` as a finite float32 3D array (NaN/inf -> 0) or raise ``ValueError``."""
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D array, got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr


def _sample_values(arr: np.ndarray, max_values: int = 2_000_000) -> np.ndarray:
    """Non-zero values of ``arr`` (all values if none are non-zero), deterministically subsampled."""
    values = arr[arr != 0]
    if values.size == 0:
        values = arr.ravel()
    if values.size > max_values:
        values = values[:: int(np.ceil(values.size / max_values))]
    return values


def robust_window(data: np.ndarray, low: float = 2.0, high: float = 99.5) -> tuple[float, float]:
    """Display window ``(vmin, vmax)`` from percentiles of the foreground voxels.

    ``vmax`` is the ``high`` percentile of the non-zero voxels. For (essentially) non-negative images
    ``vmin`` is the ``low`` percentile of the foreground, the voxels above 20% of ``vmax``: the faint
    halo that interpolation leaves around a skull-stripped or resampled brain, and background noise
    in a head image, would otherwise pull the window down and wash out the tissue contrast. Images
    with many negative values (e.g. z-scored) use the ``low`` percentile of all non-zero voxels.
    The window is never empty: an all-zero or constant input gives ``(value, value + 1)``.

    Examples:
        >>> robust_window(np.zeros((3, 3, 3)))
        (0.0, 1.0)
        >>> robust_window(np.arange(1, 101, dtype=float), 0, 100)
        (21.0, 100.0)
    """
    arr = np.asarray(data)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    # float64 after the selection: the same values as converting the whole volume first, at a fraction of the cost
    values = _sample_values(arr).astype(np.float64, copy=False)
    vmax = float(np.percentile(values, high))
    foreground = values
    if vmax > 0 and np.count_nonzero(values < 0) < 0.05 * values.size:
        foreground = values[values > 0.2 * vmax]
        if foreground.size == 0:
            foreground = values
    vmin = float(np.percentile(foreground, low))
    if not vmax > vmin:
        vmin, vmax = float(np.min(values)), float(np.max(values))
    if not vmax > vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def _three_class_otsu(values: np.ndarray, bins: int = 128) -> tuple[float, float] | None:
    """Two thresholds splitting ``values`` into three classes (Otsu's method, exhaustive search).

    In a skull-stripped T1w brain the classes are CSF, grey matter and white matter, so the upper
    threshold is the grey/white-matter boundary. None when the values are (nearly) constant.
    """
    if values.size < 3:
        return None
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return None
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    prob = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight = np.concatenate([[0.0], np.cumsum(prob)])
    moment = np.concatenate([[0.0], np.cumsum(prob * centres)])
    first, second = np.triu_indices(bins + 1, 1)  # classes [0, first), [first, second), [second, bins)
    valid = (first > 0) & (second < bins)
    first, second = first[valid], second[valid]

    def between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        w = weight[b] - weight[a]
        m = moment[b] - moment[a]
        return np.divide(m * m, w, out=np.zeros_like(m), where=w > 0)

    score = between(np.zeros_like(first), first) + between(first, second) + between(second, np.full_like(second, bins))
    best = int(np.argmax(score))
    return float(edges[first[best]]), float(edges[second[best]])


def _template_levels(template: np.ndarray) -> tuple[float | None, float | None]:
    """Contour levels for a template brain: (brain outline, grey/white-matter boundary)."""
    if not np.any(template):
        return None, None
    values = _sample_values(template)
    lo = min(float(values.min()), 0.0)
    hi = float(np.percentile(values, 99.5))
    if not hi > lo:
        return None, None
    outline = lo + 0.15 * (hi - lo)
    inside = np.clip(values[values > outline], lo, hi)
    thresholds = _three_class_otsu(inside)
    return outline, (thresholds[1] if thresholds else None)


def select_slices(data: np.ndarray, axis: int, n_slices: int) -> list[int]:
    """``n_slices`` evenly spaced slice indices along ``axis`` inside the non-zero bounding box.

    The first and last slices of the box are skipped (they hold almost nothing). With an all-zero
    array the whole axis is used. Indices are sorted and may repeat when the axis is short.

    Examples:
        >>> vol = np.zeros((10, 10, 10)); vol[2:8, 2:8, 2:8] = 1
        >>> select_slices(vol, 2, 3)
        [3, 4, 6]
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    arr = np.asarray(data)
    other = tuple(a for a in range(arr.ndim) if a != axis)
    occupied = np.flatnonzero(np.any(arr != 0, axis=other))
    if occupied.size:
        lo, hi = int(occupied[0]), int(occupied[-1])
    else:
        lo, hi = 0, arr.shape[axis] - 1
    positions = np.linspace(lo, hi, n_slices + 2)[1:-1]
    return [int(np.clip(round(float(p)), 0, arr.shape[axis] - 1)) for p in positions]


def _crop_box(reference: np.ndarray, margin: Sequence[int], symmetric_x: bool = False) -> tuple[slice, ...]:
    """Slices cropping ``reference`` to its non-zero bounding box plus ``margin`` voxels per axis.

    With ``symmetric_x`` the left-right range is made symmetric about the array centre, so that a
    left-right mirrored copy cropped with the same box loses nothing. An all-zero reference gives
    the full array.
    """
    box = []
    for axis in range(reference.ndim):
        other = tuple(a for a in range(reference.ndim) if a != axis)
        occupied = np.flatnonzero(np.any(reference != 0, axis=other))
        size = reference.shape[axis]
        if occupied.size == 0:
            box.append(slice(0, size))
            continue
        lo = max(int(occupied[0]) - int(margin[axis]), 0)
        hi = min(int(occupied[-1]) + int(margin[axis]), size - 1)
        if symmetric_x and axis == 0:
            lo, hi = min(lo, size - 1 - hi), max(hi, size - 1 - lo)
        box.append(slice(lo, hi + 1))
    return tuple(box)


def _margin(zooms: Sequence[float], mm: float) -> tuple[int, int, int]:
    return tuple(int(np.ceil(mm / float(z))) for z in zooms[:3])  # type: ignore[return-value]


def _panel(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice ready for ``imshow(origin="lower")``: rows = second in-plane axis, columns = first.

    For axial and coronal slices the columns run left -> right (neurological display); for sagittal
    slices they run posterior -> anterior.
    """
    # basic indexing: a view (np.take copies a non-contiguous volume, such as a cropped one, on every call)
    return volume[(slice(None),) * axis + (int(index),)].T


def _volume_pair(a: np.ndarray, name_a: str, b: np.ndarray, name_b: str, n_slices: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Two volumes of one figure as :func:`_as_volume` arrays on one grid, with at least one slice per row."""
    arr_a, arr_b = _as_volume(a, name_a), _as_volume(b, name_b)
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"{name_a} {arr_a.shape} and {name_b} {arr_b.shape} must share a grid")
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    return arr_a, arr_b


def _check_zooms(zooms: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(z) for z in zooms)
    if len(values) < 3:
        raise ValueError(f"zooms must have three values, got {zooms!r}")
    values = values[:3]
    if not all(np.isfinite(z) and z > 0 for z in values):
        raise ValueError(f"zooms must be positive, got {zooms!r}")
    return values


# --------------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------------
def _show(ax: Axes, panel: np.ndarray, extent, window: tuple[float, float]) -> None:
    ax.imshow(
        panel,
        cmap=GRAY,
        vmin=window[0],
        vmax=window[1],
        origin="lower",
        extent=extent,
        interpolation="antialiased",
        aspect="auto",  # the extent keeps the panel's shape (see _Mosaic)
    )


def _simplify_line(line: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a polyline (N x 2): drop vertices within ``tolerance``.

    The first and last vertices are always kept, so closed contours stay closed. All segments of one
    recursion depth are split at once (each at its farthest vertex, the first of equals): the result of the
    recursive algorithm, in one pass of array operations per depth instead of one per segment.

    Examples:
        >>> _simplify_line(np.array([[0.0, 0.0], [1.0, 0.01], [2.0, 0.0], [3.0, 1.0]]), 0.1).tolist()
        [[0.0, 0.0], [2.0, 0.0], [3.0, 1.0]]
    """
    n = len(line)
    if n <= 2 or tolerance <= 0:
        return line
    line = np.asarray(line, dtype=np.float64)
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    index = np.arange(n)
    while True:
        kept = np.flatnonzero(keep)
        # each vertex's segment: between the kept vertices around it (a kept vertex starts its own)
        segment = np.minimum(np.searchsorted(kept, index, side="right") - 1, len(kept) - 2)
        a, b = line[kept[segment]], line[kept[segment + 1]]
        ab, rel = b - a, line - a
        length = np.hypot(ab[:, 0], ab[:, 1])
        cross = np.abs(ab[:, 0] * rel[:, 1] - ab[:, 1] * rel[:, 0])
        dist = np.where(length > 0, cross / np.where(length > 0, length, 1.0), np.hypot(rel[:, 0], rel[:, 1]))
        dist[keep] = -1.0
        worst = np.maximum.reduceat(dist, kept[:-1])
        split = (dist > tolerance) & (dist == worst[segment])
        if not split.any():
            return line[keep]
        candidates = np.flatnonzero(split)
        _, first = np.unique(segment[candidates], return_index=True)  # the first farthest vertex per segment
        keep[candidates[first]] = True


def _contour(ax: Axes, panel: np.ndarray, extent, level: float, colour: str, width: float,
             points_per_unit: float) -> None:
    """Draw the iso-line ``level`` of ``panel`` (nothing, and no warning, if it does not cross it).

    Lines come from ``contourpy`` (matplotlib's own contouring engine) and are simplified to a quarter
    of a display point before drawing, and specks less than a point across are dropped, which keeps
    the SVG path data small at any voxel size.
    """
    if panel.ndim != 2 or min(panel.shape) < 2:
        return
    if not (float(panel.min()) < level < float(panel.max())):
        return
    rows, cols = panel.shape
    xs = extent[0] + (np.arange(cols) + 0.5) * (extent[1] - extent[0]) / cols
    ys = extent[2] + (np.arange(rows) + 0.5) * (extent[3] - extent[2]) / rows
    generator = contourpy.contour_generator(xs, ys, np.asarray(panel, dtype=np.float64), line_type="Separate")
    tolerance = 0.25 / points_per_unit
    smallest = 1.0 / points_per_unit  # specks under a point across are noise at display size
    lines = [
        _simplify_line(line, tolerance)
        for line in generator.lines(level)
        if len(line) >= 2 and float(np.ptp(line, axis=0).max()) >= smallest
    ]
    if lines:
        ax.add_collection(LineCollection(lines, colors=[colour], linewidths=width), autolim=False)


def _letters(ax: Axes, letters: tuple[str, str], extent, size: float = 7.0) -> None:
    """Put orientation letters at the left and right edges of the panel at ``extent`` (data coordinates)."""
    style = {"color": LETTER_COLOUR, "fontsize": size, "fontweight": "bold", "va": "center"}
    x0, x1, y0, y1 = extent
    ax.text(x0 + 0.015 * (x1 - x0), (y0 + y1) / 2, letters[0], ha="left", **style)
    ax.text(x0 + 0.985 * (x1 - x0), (y0 + y1) / 2, letters[1], ha="right", **style)


def _label(ax: Axes, text: str, extent, size: float = 6.5) -> None:
    """The view's name in the top-left corner of the panel at ``extent``."""
    x0, x1, y0, y1 = extent
    ax.text(x0 + 0.02 * (x1 - x0), y0 + 0.98 * (y1 - y0), text, ha="left", va="top", color=LETTER_COLOUR,
            fontsize=size)


_PATH_DATA = re.compile(r'( d=")([^"]*)(")')
_PATH_TOKEN = re.compile(r"[A-Za-z]|-?(?:\d+\.?\d*|\.\d+)")


def _format_number(token: str) -> str:
    text = f"{float(token):.1f}"
    text = text[:-2] if text.endswith(".0") else text
    return "0" if text == "-0" else text


def _compact_path(data: str) -> str:
    """Rewrite SVG path data with 0.1 pt precision, no line breaks and no repeated line-to points."""
    commands: list[tuple[str, list[str]]] = []
    for token in _PATH_TOKEN.findall(data):
        if token.isalpha():
            commands.append((token, []))
        elif commands:
            commands[-1][1].append(_format_number(token))
    out: list[str] = []
    last_point: list[str] | None = None
    for command, numbers in commands:
        if command == "L" and numbers == last_point:
            continue
        out.append(command + " ".join(numbers))
        if command in ("M", "L", "Q", "C") and len(numbers) >= 2:
            last_point = numbers[-2:]
        elif command in ("z", "Z"):
            last_point = None
    return "".join(out)


def _compact_path_data(svg: str) -> str:
    """Compact every ``d="..."`` attribute (matplotlib writes six decimals and one vertex per line).

    A tenth of a point is far below a screen pixel at normal zoom, so this shrinks contour-heavy
    files several-fold with no visible change.
    """
    return _PATH_DATA.sub(lambda m: m.group(1) + _compact_path(m.group(2)) + m.group(3), svg)


def _to_svg(fig: Figure, max_bytes: int | None = None) -> str:
    """Serialise ``fig`` as a deterministic, compact SVG string.

    Image layers are embedded at :data:`RASTER_DPI`; if the result is larger than ``max_bytes`` (very
    noisy, high-resolution images) it is saved again with coarser image layers, so figures stay
    small enough to embed in a report.
    """
    budget = MAX_SVG_BYTES if max_bytes is None else max_bytes
    svg = ""
    for dpi in (RASTER_DPI, RASTER_DPI * 3 // 4, RASTER_DPI // 2):
        buffer = io.BytesIO()
        with matplotlib.rc_context(
            {"svg.hashsalt": SVG_HASHSALT, "svg.fonttype": "path", "svg.image_inline": True}
        ):
            fig.savefig(
                buffer,
                format="svg",
                dpi=dpi,
                facecolor=fig.get_facecolor(),
                metadata={"Date": None, "Creator": "bids-siamese"},
            )
        svg = _compact_path_data(buffer.getvalue().decode("utf-8"))
        if len(svg.encode("utf-8")) <= budget:
            break
    return svg


@dataclass(frozen=True)
class _Mosaic:
    """A 3-row (axial, coronal, sagittal) x ``n_slices`` mosaic drawn on ONE axes.

    Each panel is an image placed at its own extent in the axes' data coordinates (cell width 1; a row's
    panels keep their physical aspect), so the figure has one axes and matplotlib composites the panels into
    one embedded PNG: far cheaper to build and save than one axes per panel, and it looks the same.
    """

    fig: Figure
    ax: Axes
    row_heights: tuple[float, ...]
    gap_x: float
    gap_y: float
    points_per_unit: float

    def extent(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Data-coordinate extent of the panel in ``row`` (0: axial, at the top) and ``col``."""
        x0 = col * (1.0 + self.gap_x)
        top = sum(self.row_heights) + self.gap_y * (len(self.row_heights) - 1)
        y1 = top - sum(self.row_heights[:row]) - self.gap_y * row
        return (x0, x0 + 1.0, y1 - self.row_heights[row], y1)


def _panel_grid(ratios: Sequence[float], n_cols: int, cell_width: float, wspace: float, hspace: float,
                below: float, above: float) -> _Mosaic:
    """A figure whose single axes holds ``len(ratios)`` rows x ``n_cols`` panel cells (see :class:`_Mosaic`).

    Cells are ``cell_width`` inches wide and ``ratio`` times as high, separated by ``wspace`` of a cell width and
    ``hspace`` of the mean cell height; ``below``/``above`` inches are left free for text under/over the panels.
    """
    gap_x, gap_y = wspace, hspace * float(np.mean(ratios))
    width_units = n_cols + gap_x * (n_cols - 1)
    height_units = sum(ratios) + gap_y * (len(ratios) - 1)
    inches_per_unit = cell_width * n_cols / width_units
    axes_height = height_units * inches_per_unit
    height = axes_height + below + above
    fig = Figure(figsize=(cell_width * n_cols, height), facecolor=BACKGROUND)
    ax = fig.add_axes((0.0, below / height, 1.0, axes_height / height))
    ax.set_facecolor(BACKGROUND)
    ax.set_axis_off()
    ax.set_xlim(0.0, width_units)
    ax.set_ylim(0.0, height_units)
    ax.set_autoscale_on(False)
    return _Mosaic(fig, ax, tuple(float(r) for r in ratios), gap_x, gap_y, 72.0 * inches_per_unit)


def _fit(extent: tuple[float, float, float, float], ratio: float) -> tuple[float, float, float, float]:
    """The largest extent of height/width ``ratio`` centred in the cell ``extent`` (a panel keeps its shape)."""
    x0, x1, y0, y1 = extent
    width, height = x1 - x0, y1 - y0
    if ratio * width > height:
        new_width = height / ratio
        return (x0 + (width - new_width) / 2, x0 + (width + new_width) / 2, y0, y1)
    new_height = ratio * width
    return (x0, x1, y0 + (height - new_height) / 2, y0 + (height + new_height) / 2)


def _mosaic_figure(shape: Sequence[int], zooms: Sequence[float], n_slices: int, footer: str | None) -> _Mosaic:
    """The figure and its single axes for a 3-row x ``n_slices`` mosaic (see :class:`_Mosaic`)."""
    physical = [shape[a] * zooms[a] for a in range(3)]
    ratios = []
    for _, axis, _ in _VIEWS:
        in_plane = [a for a in range(3) if a != axis]
        ratios.append(max(physical[in_plane[1]] / physical[in_plane[0]], 0.05))
    footer_height = 0.22 if footer else 0.0
    mosaic = _panel_grid(ratios, n_slices, 1.4, 0.02, 0.03, footer_height, 0.05)
    if footer:
        height = mosaic.fig.get_figheight()
        mosaic.fig.text(0.5, footer_height / height / 2.0, footer, ha="center", va="center", color=LETTER_COLOUR,
                        fontsize=7)
    return mosaic


# --------------------------------------------------------------------------------------------------
# Public figures
# --------------------------------------------------------------------------------------------------
def registration_mosaic(moving: np.ndarray, fixed: np.ndarray, n_slices: int = 7) -> str:
    """SVG mosaic of the template-space subject image with the template's edges on top.

    Args:
        moving: the subject image resampled into template space (3D, RAS voxel order).
        fixed: the template on the same grid (same shape as ``moving``).
        n_slices: slices per row; rows are axial, coronal and sagittal.

    Returns:
        An SVG document. The subject is grey; the template brain outline is drawn in yellow and the
        template's grey/white-matter boundary (upper three-class Otsu threshold of the template
        intensities) in cyan.
        Good registration: the cyan line follows the subject's grey/white boundary and the yellow line
        hugs the subject's brain edge everywhere.

    Raises:
        ValueError: arrays are not 3D, their shapes differ, or ``n_slices`` < 1.
    """
    mov, fix = _volume_pair(moving, "moving", fixed, "fixed", n_slices)
    zooms = (1.0, 1.0, 1.0)
    window = robust_window(mov)
    outline_level, tissue_level = _template_levels(fix)
    box = _crop_box((fix != 0) | (mov != 0), _margin(zooms, 4.0))
    mov, fix = mov[box], fix[box]
    reference = fix if np.any(fix) else mov

    mosaic = _mosaic_figure(
        mov.shape, zooms, n_slices, "template edges: brain outline (yellow), grey/white boundary (cyan)"
    )
    ax, unit = mosaic.ax, mosaic.points_per_unit
    for row, (view, axis, letters) in enumerate(_VIEWS):
        for col, index in enumerate(select_slices(reference, axis, n_slices)):
            extent = mosaic.extent(row, col)
            _show(ax, _panel(mov, axis, index), extent, window)
            edges = ndimage.gaussian_filter(_panel(fix, axis, index), sigma=0.6)
            if outline_level is not None:
                _contour(ax, edges, extent, outline_level, OUTLINE_COLOUR, 0.6, unit)
            if tissue_level is not None:
                _contour(ax, edges, extent, tissue_level, TISSUE_COLOUR, 0.45, unit)
            _letters(ax, letters, extent)
            if col == 0:
                _label(ax, view, extent)
    return _to_svg(mosaic.fig)


def mask_contour_mosaic(
    t1w: np.ndarray,
    mask: np.ndarray,
    n_slices: int = 7,
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """SVG mosaic of the native (RAS-conformed) T1w with the brain-mask contour in red.

    Args:
        t1w: the T1w image (3D, RAS voxel order).
        mask: the brain mask on the same grid (non-zero = brain).
        n_slices: slices per row; rows are axial, coronal and sagittal.
        zooms: voxel sizes in mm along the three axes, so anisotropic voxels keep their true shape.

    Returns:
        An SVG document. A good mask follows the outer edge of the brain, includes all of the cortex and
        cerebellum, and leaves out skull, eyes and neck.

    Raises:
        ValueError: arrays are not 3D, their shapes differ, ``zooms`` are not positive or ``n_slices`` < 1.
    """
    img, msk = _volume_pair(t1w, "t1w", mask, "mask", n_slices)
    vox = _check_zooms(zooms)
    binary = (msk > 0).astype(np.float32)
    # cropped first: the box holds every non-zero voxel the window below reads, in the same order
    box = _crop_box(binary if binary.any() else img, _margin(vox, 12.0))
    whole, img, binary = img, img[box], binary[box]
    brain = img * binary
    # Window on the brain when there is one, so the skull does not wash out the tissue contrast.
    window = robust_window(brain) if np.any(brain) else robust_window(whole)
    reference = binary if binary.any() else img

    mosaic = _mosaic_figure(img.shape, vox, n_slices, None)
    ax, unit = mosaic.ax, mosaic.points_per_unit
    for row, (view, axis, letters) in enumerate(_VIEWS):
        for col, index in enumerate(select_slices(reference, axis, n_slices)):
            extent = mosaic.extent(row, col)
            _show(ax, _panel(img, axis, index), extent, window)
            _contour(ax, _panel(binary, axis, index), extent, 0.5, MASK_COLOUR, 0.8, unit)
            _letters(ax, letters, extent)
            if col == 0:
                _label(ax, view, extent)
    return _to_svg(mosaic.fig)


def _orientation_slices(volume: np.ndarray) -> tuple[int, int]:
    """(axial, coronal) slice indices through the brain: a little above its middle, and its middle."""
    occupied_z = np.flatnonzero(np.any(volume != 0, axis=(0, 1)))
    occupied_y = np.flatnonzero(np.any(volume != 0, axis=(0, 2)))
    if occupied_z.size:
        z = int(round(occupied_z[0] + 0.6 * (occupied_z[-1] - occupied_z[0])))
    else:
        z = volume.shape[2] // 2
    if occupied_y.size:
        y = int(round(occupied_y[0] + 0.45 * (occupied_y[-1] - occupied_y[0])))
    else:
        y = volume.shape[1] // 2
    return z, y


def orientation_figure(brain: np.ndarray, template: np.ndarray) -> str:
    """SVG comparing the subject brain, its left-right mirror and the template.

    Three columns (subject as stored, subject mirrored left<->right, template) by two rows (axial,
    coronal). The template's outline and grey/white boundary are drawn over the two subject columns,
    so a person can judge which of the two lines up with the template: if the mirrored column matches
    better, the scan's left and right are probably swapped.

    Args:
        brain: skull-stripped subject brain in template space (3D, RAS voxel order).
        template: the template brain (3D, RAS voxel order), normally on the same grid. When the grids
            differ the contours are omitted and each column is sliced through its own middle.

    Raises:
        ValueError: an array is not 3D.
    """
    sub = _as_volume(brain, "brain")
    tpl = _as_volume(template, "template")
    mirrored = sub[::-1, :, :]
    same_grid = sub.shape == tpl.shape
    if same_grid:
        box = _crop_box((sub != 0) | (mirrored != 0) | (tpl != 0), (4, 4, 4), symmetric_x=True)
        sub, mirrored, tpl = sub[box], mirrored[box], tpl[box]
    outline_level, tissue_level = _template_levels(tpl)
    sub_window = robust_window(sub)
    tpl_window = robust_window(tpl)
    tpl_z, tpl_y = _orientation_slices(tpl if np.any(tpl) else sub)
    sub_z, sub_y = (tpl_z, tpl_y) if same_grid else _orientation_slices(sub)

    columns = (
        ("subject as stored", sub, sub_window, (sub_z, sub_y), True),
        ("subject mirrored left\u2194right", mirrored, sub_window, (sub_z, sub_y), True),
        ("template MNI152NLin2009cAsym", tpl, tpl_window, (tpl_z, tpl_y), False),
    )
    rows = (("axial", 2, 0), ("coronal", 1, 1))
    ratios = [max(sub.shape[1] / sub.shape[0], 0.05), max(sub.shape[2] / sub.shape[0], 0.05)]
    title_height = 0.55
    # one axes for the six panels (matplotlib composites them into one embedded image; see _Mosaic)
    layout = _panel_grid(ratios, 3, 2.3, 0.03, 0.04, 0.25, title_height)
    fig, ax, unit = layout.fig, layout.ax, layout.points_per_unit
    height = fig.get_figheight()
    fig.text(
        0.5, 1.0 - 0.17 / height, "Which subject column matches the template on the right?",
        ha="center", va="center", color=LETTER_COLOUR, fontsize=9, fontweight="bold",
    )
    for col, (title, _, _, _, _) in enumerate(columns):
        fig.text((col + 0.5) / 3.0, 1.0 - 0.42 / height, title, ha="center", va="center",
                 color=LETTER_COLOUR, fontsize=7.5)
    fig.text(
        0.5, 0.12 / height, "template edges on the subject columns: outline (yellow), grey/white boundary (cyan)",
        ha="center", va="center", color=LETTER_COLOUR, fontsize=6.5,
    )
    for row, (view, axis, which) in enumerate(rows):
        for col, (_, volume, window, indices, overlay) in enumerate(columns):
            index = int(np.clip(indices[which], 0, volume.shape[axis] - 1))
            panel = _panel(volume, axis, index)
            cell = layout.extent(row, col)
            extent = _fit(cell, panel.shape[0] / max(panel.shape[1], 1))
            _show(ax, panel, extent, window)
            if overlay and same_grid:
                edges = ndimage.gaussian_filter(_panel(tpl, axis, index), sigma=0.6)
                if outline_level is not None:
                    _contour(ax, edges, extent, outline_level, OUTLINE_COLOUR, 0.7, unit)
                if tissue_level is not None:
                    _contour(ax, edges, extent, tissue_level, TISSUE_COLOUR, 0.5, unit)
            _letters(ax, ("L", "R"), cell, size=8)
            if col == 0:
                _label(ax, view, cell, size=7)
    return _to_svg(fig)
