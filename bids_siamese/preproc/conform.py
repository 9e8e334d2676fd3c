"""Load a T1w scan safely, record header sanity checks, and conform it to RAS.

Three pure steps, used in this order by the participant workflow:

1. :func:`load_t1w` reads the file and turns every way it can be unusable (missing, empty, truncated,
   not 3D, NaN/Inf, constant, absurd voxel size) into a :class:`~bids_siamese.errors.BadDataError`
   with a one-line message naming the file and the fix.
2. :func:`header_checks` records (never raises) the header facts a QC reader wants to see: qform/sform
   presence and agreement, zooms versus affine, storage handedness, obliquity, voxel size, ...
3. :func:`conform` reorders the voxel array to the closest RAS orientation without resampling: every
   voxel keeps exactly the same world (scanner mm) coordinates.
"""
from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ..errors import BadDataError

#: Voxel sizes (mm) outside this open range are rejected by :func:`load_t1w`.
MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0

#: :func:`header_checks` passes ``obliquity`` when the largest angle between a voxel axis and the
#: nearest world axis (``nibabel.affines.obliquity``) is below this many degrees. Oblique scans are
#: fine for this app (registration handles any pose); the check only records the fact.
OBLIQUITY_THRESHOLD_DEG = 1.0

#: qform and sform "agree" when the voxel-grid corners they place differ by less than this (mm).
#: Quaternion storage alone introduces < 1e-4 mm; a qform that cannot represent the sform's shear,
#: or a real inconsistency, moves corners by far more.
QFORM_SFORM_TOLERANCE_MM = 0.01

#: Header zooms agree with the affine column norms within this relative tolerance.
ZOOMS_RTOL = 1e-3

#: Typical T1w voxel sizes: :func:`header_checks` records ``voxel_size`` as failed outside this range
#: (mm) and ``anisotropy`` as failed when the largest/smallest voxel size exceeds the ratio.
TYPICAL_VOXEL_MM = (0.2, 2.0)
MAX_ANISOTROPY = 3.0

#: The field of view (mm) must cover a brain along every axis for ``field_of_view`` to pass.
MIN_FOV_MM = 100.0

#: Errors nibabel, gzip and zlib raise for unreadable, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, MemoryError)

_XFORM_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}
_SPACE_UNITS = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


def _bad(path: Path | str, problem: str, fix: str) -> BadDataError:
    """A :class:`BadDataError` with the standard one-line ``file: problem; fix: ...`` message."""
    return BadDataError(f"{path}: {problem}; fix: {fix}")


def _read_image(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Read header and voxel data, turning every read failure into a :class:`BadDataError`."""
    if not path.exists():
        raise _bad(path, "file not found", "check the path, or restore the scan in the BIDS dataset")
    if not path.is_file():
        raise _bad(path, "not a regular file", "replace it with a NIfTI image")
    if path.stat().st_size == 0:
        raise _bad(path, "the file is empty (0 bytes)", "re-export or re-convert the scan (e.g. dcm2niix)")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise _bad(
            path,
            f"unreadable or truncated image ({type(err).__name__}: {reason})",
            "re-export or re-convert the scan (e.g. dcm2niix) and check the download/copy completed",
        ) from err
    return img, data


def _to_3d(path: Path, data: np.ndarray) -> np.ndarray:
    """Squeeze trailing singleton dimensions; reject anything that is not one 3D volume."""
    if data.ndim > 3 and all(size == 1 for size in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        extra = "" if data.ndim < 3 else f" with {int(np.prod(data.shape[3:]))} volumes"
        raise _bad(
            path,
            f"not a 3D image (shape {tuple(data.shape)}{extra})",
            "provide a single 3D T1w volume (split multi-volume files, e.g. keep one run or average them)",
        )
    if min(data.shape) < 2:
        raise _bad(path, f"not a 3D volume (shape {tuple(data.shape)})", "provide a 3D T1w volume, not a slice")
    return data


def _check_values(path: Path, data: np.ndarray) -> np.ndarray:
    """Return the data as float32, rejecting non-real dtypes, NaN/Inf and constant images."""
    if data.dtype.fields is not None or np.iscomplexobj(data) or data.dtype == bool:
        raise _bad(path, f"unsupported voxel data type {data.dtype}", "convert the scan to a real-valued NIfTI")
    values = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        n_bad = int(values.size - np.count_nonzero(finite))
        raise _bad(
            path,
            f"{n_bad} voxels are NaN or Inf",
            "re-convert the scan; if NaNs are intended as background, replace them with 0",
        )
    if values.size == 0 or float(values.max()) == float(values.min()):
        raise _bad(path, "the image is constant (no contrast)", "check the conversion; this is not a usable T1w scan")
    return values


def _check_voxel_sizes(path: Path, affine: np.ndarray, zooms: tuple[float, ...]) -> None:
    """Reject zero, non-finite or absurd voxel sizes in the header or the affine."""
    col_norms = np.linalg.norm(affine[:3, :3], axis=0)
    for label, sizes in (("header voxel sizes", np.asarray(zooms[:3], dtype=float)), ("affine", col_norms)):
        if not np.all(np.isfinite(sizes)) or np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
            shown = ", ".join(f"{z:.4g}" for z in sizes)
            raise _bad(
                path,
                f"absurd voxel size in the {label} ({shown} mm; expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm)",
                "fix the NIfTI header (pixdim/qform/sform), e.g. re-convert with dcm2niix",
            )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _bad(path, "the voxel-to-world affine is singular", "fix the NIfTI header (qform/sform)")


def _check_raw_pixdim(path: Path) -> None:
    """Reject zero voxel sizes that nibabel silently replaces by 1 mm when no sform overrides them.

    nibabel "fixes" ``pixdim[1:4] == 0`` to 1 on load, so the loaded header cannot show it: the raw header
    is read again without checks. With an sform the affine does not depend on pixdim; without one (qform
    only, or no orientation at all) a 0 means the voxel size is unknown.
    """
    if not str(path).endswith((".nii", ".nii.gz")) or not path.is_file():
        return
    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            raw = nib.Nifti1Header.from_fileobj(fobj, check=False)
    except (*_READ_ERRORS, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError):
        return  # unreadable: :func:`_read_image` reports it
    if int(raw["sform_code"]) != 0:
        return
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if np.all(np.isfinite(pixdim)) and np.all(pixdim > 0):
        return
    shown = ", ".join(f"{z:g}" for z in pixdim)
    orient = "a qform that scales by them" if int(raw["qform_code"]) != 0 else "no qform/sform"
    raise _bad(
        path,
        f"voxel sizes are 0 or invalid in the header (pixdim {shown}) with {orient}; nibabel would assume 1 mm",
        "fix the NIfTI header (set pixdim to the real voxel size, or re-convert with dcm2niix)",
    )


#: Bytes per voxel the participant level holds besides the stored data: float32 copies while checking and
#: conforming (the checked image, the conformed one, the value check's temporaries).
WORKING_BYTES_PER_VOXEL = 12


def image_memory_gb(img: nib.spatialimages.SpatialImage) -> float:
    """GB needed to read and conform ``img``, from its header alone (shape and stored data type).

    Examples:
        >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
        >>> img.header.set_data_shape((2000, 2000, 2000))
        >>> round(image_memory_gb(img))
        112
    """
    n_voxels = float(np.prod([int(n) for n in img.header.get_data_shape()], dtype=float))
    return n_voxels * (img.header.get_data_dtype().itemsize + WORKING_BYTES_PER_VOXEL) / 1e9


def _check_size(path: Path, max_gb: float) -> None:
    """Reject an image whose header declares more data than ``max_gb`` allows, before any data are read.

    nibabel reads exactly the bytes the header declares, so a gzip stream that decompresses to more (a
    decompression bomb) is never read beyond that: the header is what must be checked.
    """
    try:
        img = nib.load(str(path))  # the header only: the data stay on disk
    except (*_READ_ERRORS, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError):
        return  # unreadable: :func:`_read_image` reports it
    need = image_memory_gb(img)
    if need > max_gb:
        shape = "x".join(str(int(n)) for n in img.header.get_data_shape())
        raise _bad(path, f"the header declares a {shape} {img.header.get_data_dtype()} image, about {need:.1f} GB to read "
                   f"and conform, more than --mem-gb {max_gb:g} allows",
                   "check the header's dim field (a damaged or wrong header), or, if the image is real, give the "
                   "job more memory and raise --mem-gb")


def load_t1w(path: str | Path, max_gb: float | None = None) -> nib.Nifti1Image:
    """Load a T1w scan as a 3D float32 :class:`nibabel.Nifti1Image`, or raise :class:`BadDataError`.

    The returned image keeps the file's affine and header (qform and sform untouched, so
    :func:`header_checks` sees them as stored); a 4D file with a single volume is squeezed to 3D.

    Raises:
        BadDataError: the file is missing, empty, truncated or otherwise unreadable; holds more than
            one volume; contains NaN/Inf; is constant; or has a zero/absurd (< 0.1 mm or > 10 mm)
            voxel size; with ``max_gb``, declares (by its header) more data than that memory allows.
            The message is one line naming the file and the fix.
    """
    path = Path(path)
    _check_raw_pixdim(path)  # before nibabel loads (and "fixes") the header
    if max_gb is not None and path.is_file():
        _check_size(path, max_gb)
    img, raw = _read_image(path)
    data = _check_values(path, _to_3d(path, raw))
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_voxel_sizes(path, affine, tuple(float(z) for z in img.header.get_zooms()))
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    if header is not None:
        header.set_data_shape(data.shape)
        header.set_data_dtype(np.float32)
        header.set_slope_inter(1.0, 0.0)
    out = nib.Nifti1Image(data, affine, header)
    if header is None:
        out.header.set_xyzt_units("mm")
    return out


# --------------------------------------------------------------------------------------------------
# Header checks
# --------------------------------------------------------------------------------------------------

def _check(name: str, passed: bool, detail: str) -> dict:
    """One header check record."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def _nifti_header(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Header | None:
    """The image's NIfTI header, or None for other formats."""
    header = img.header
    return header if isinstance(header, nib.Nifti1Header) else None


def _corner_displacement_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where two voxel-to-world affines put the grid's 8 corners."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    ).T
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def _check_xform_codes(img: nib.spatialimages.SpatialImage) -> dict:
    header = _nifti_header(img)
    if header is None:
        return _check("xform_codes", True, f"{type(img).__name__}: orientation from its own header format")
    q, s = int(header["qform_code"]), int(header["sform_code"])
    detail = f"qform_code={q} ({_XFORM_CODES.get(q, '?')}), sform_code={s} ({_XFORM_CODES.get(s, '?')})"
    if q == 0 and s == 0:
        return _check("xform_codes", False, detail + ": no orientation; nibabel falls back to a voxel-size-only affine")
    return _check("xform_codes", True, detail)


def _check_qform_sform(img: nib.spatialimages.SpatialImage) -> dict:
    header = _nifti_header(img)
    if header is None or int(header["qform_code"]) == 0 or int(header["sform_code"]) == 0:
        return _check("qform_sform_match", True, "not applicable (fewer than two coded affines)")
    qform, sform = header.get_qform(), header.get_sform()
    dist = _corner_displacement_mm(qform, sform, img.shape[:3])
    passed = dist < QFORM_SFORM_TOLERANCE_MM
    verdict = "agree" if passed else "DISAGREE (nibabel and this app use the sform; other tools may use the qform)"
    return _check("qform_sform_match", passed, f"qform and sform {verdict}: corners differ by up to {dist:.4g} mm")


def _check_qfac(img: nib.spatialimages.SpatialImage) -> dict:
    header = _nifti_header(img)
    if header is None:
        return _check("qfac", True, "not a NIfTI header")
    qfac = float(header["pixdim"][0])
    passed = qfac in (-1.0, 0.0, 1.0)
    return _check("qfac", passed, f"pixdim[0] (qfac) = {qfac:g}" + ("" if passed else ": must be -1 or 1"))


def _check_zooms(img: nib.spatialimages.SpatialImage) -> dict:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    norms = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
    passed = bool(np.allclose(zooms, norms, rtol=ZOOMS_RTOL, atol=1e-6))
    return _check(
        "zooms_match_affine",
        passed,
        f"header zooms {np.round(zooms, 4).tolist()} mm vs affine column norms {np.round(norms, 4).tolist()} mm",
    )


def _check_handedness(img: nib.spatialimages.SpatialImage) -> dict:
    det = float(np.linalg.det(np.asarray(img.affine)[:3, :3]))
    kind = "radiological (left-handed) voxel storage" if det < 0 else "neurological (right-handed) voxel storage"
    return _check("determinant", True, f"det = {det:.4g}: {kind}; both are valid")


def _check_orientation(img: nib.spatialimages.SpatialImage) -> dict:
    codes = nib.aff2axcodes(np.asarray(img.affine))
    passed = None not in codes and len(set(codes)) == 3
    return _check("axis_codes", passed, f"voxel axes point to {''.join(str(c) for c in codes)}")


def _check_obliquity(img: nib.spatialimages.SpatialImage) -> dict:
    angles = np.degrees(nib.affines.obliquity(np.asarray(img.affine)))
    worst = float(np.max(np.abs(angles)))
    return _check(
        "obliquity",
        worst < OBLIQUITY_THRESHOLD_DEG,
        f"largest voxel-axis obliquity {worst:.2f} deg (threshold {OBLIQUITY_THRESHOLD_DEG:g} deg)",
    )


def _check_voxel_size(img: nib.spatialimages.SpatialImage) -> dict:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    lo, hi = TYPICAL_VOXEL_MM
    passed = bool(np.all((zooms >= lo) & (zooms <= hi)))
    return _check("voxel_size", passed, f"voxel size {np.round(zooms, 3).tolist()} mm (typical T1w: {lo}-{hi} mm)")


def _check_anisotropy(img: nib.spatialimages.SpatialImage) -> dict:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    ratio = float(zooms.max() / zooms.min())
    return _check("anisotropy", ratio <= MAX_ANISOTROPY, f"largest/smallest voxel size {ratio:.2f} (max {MAX_ANISOTROPY:g})")


def _check_fov(img: nib.spatialimages.SpatialImage) -> dict:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    fov = zooms * np.asarray(img.shape[:3], dtype=float)
    return _check(
        "field_of_view",
        bool(np.all(fov >= MIN_FOV_MM)),
        f"field of view {np.round(fov, 1).tolist()} mm (each axis should be >= {MIN_FOV_MM:g} mm to cover a brain)",
    )


def _check_units(img: nib.spatialimages.SpatialImage) -> dict:
    header = _nifti_header(img)
    if header is None:
        return _check("spatial_units", True, "not a NIfTI header (mm assumed)")
    code = int(header["xyzt_units"]) & 0x07
    name = _SPACE_UNITS.get(code, f"code {code}")
    return _check("spatial_units", code in (0, 2), f"spatial units: {name}" + (" (mm assumed)" if code == 0 else ""))


def _check_dims(img: nib.spatialimages.SpatialImage) -> dict:
    shape = tuple(int(s) for s in img.shape)
    passed = len(shape) == 3 or (len(shape) > 3 and all(s == 1 for s in shape[3:]))
    return _check("dimensions", passed, f"shape {shape}")


_CHECKS: tuple[tuple[str, Callable[[nib.spatialimages.SpatialImage], dict]], ...] = (
    ("dimensions", _check_dims),
    ("xform_codes", _check_xform_codes),
    ("qform_sform_match", _check_qform_sform),
    ("qfac", _check_qfac),
    ("zooms_match_affine", _check_zooms),
    ("determinant", _check_handedness),
    ("axis_codes", _check_orientation),
    ("obliquity", _check_obliquity),
    ("voxel_size", _check_voxel_size),
    ("anisotropy", _check_anisotropy),
    ("field_of_view", _check_fov),
    ("spatial_units", _check_units),
)

#: The checks whose failure makes the header's left-right orientation untrustworthy.
ORIENTATION_CHECKS = frozenset({"xform_codes", "qform_sform_match", "qfac", "zooms_match_affine", "axis_codes"})


def header_checks(img: nib.spatialimages.SpatialImage) -> list[dict]:
    """Record header sanity checks; never raises.

    Returns:
        One ``{"name": str, "passed": bool, "detail": str}`` per check, in a fixed order:
        ``dimensions``, ``xform_codes`` (qform/sform codes present), ``qform_sform_match`` (the two
        coded affines place the grid corners within :data:`QFORM_SFORM_TOLERANCE_MM`), ``qfac``,
        ``zooms_match_affine``, ``determinant`` (always passes; records radiological vs neurological
        storage), ``axis_codes``, ``obliquity`` (below :data:`OBLIQUITY_THRESHOLD_DEG`),
        ``voxel_size`` (within :data:`TYPICAL_VOXEL_MM`), ``anisotropy``, ``field_of_view`` and
        ``spatial_units``. A check that cannot be computed is recorded as failed with the reason.
    """
    results = []
    for name, check in _CHECKS:
        try:
            results.append(check(img))
        except Exception as err:  # noqa: BLE001 - a header check must record, never raise
            results.append(_check(name, False, f"could not be computed ({type(err).__name__}: {err})"))
    return results


def conform(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """Reorder the voxel array to the closest RAS+ orientation, keeping world coordinates exact.

    Only axis permutations and flips are applied (no resampling), so each voxel value ends up at
    exactly the same world (scanner mm) position; the new affine is ``affine @ inverse(ornt)``. The
    data become float32; qform and sform are both set to the new affine (sform code kept, or
    ``scanner`` if it was unset). Oblique scans stay oblique (closest, not exact, RAS).
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    data = img.get_fdata(dtype=np.float32)
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 else data
    new_data = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt), dtype=np.float32)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    header = _nifti_header(img)
    code = int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1
    new_header = nib.Nifti1Header()
    new_header.set_xyzt_units("mm")
    new_header.set_sform(new_affine, code)
    new_header.set_qform(new_affine, code)
    # The header stores float32; the in-memory affine stays the exact float64 product.
    return nib.Nifti1Image(new_data, new_affine, new_header)
