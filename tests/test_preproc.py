"""Tests of the pure participant preprocessing steps (load/checks, conform, brain, register, grid)."""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import nitransforms as nt
import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_siamese.errors import BadDataError
from conftest import raw_nifti_with_zero_pixdim
from bids_siamese.preproc import register
from bids_siamese.preproc.brain import extract_brain, mask_from_image
from bids_siamese.preproc.conform import conform, header_checks, load_t1w
from bids_siamese.preproc.grid import normalise_intensity, resample_to_grid, template_on_grid
from bids_siamese.preproc.register import (
    itk_affine_text,
    matrix_to_parameters,
    read_itk_affine,
    register_affine,
    write_itk_affine,
)
from bids_siamese.qc.orientation import antisymmetric_correlation, flip_statistic
from bids_siamese.resources import model_grid, template_brain_path


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_affine(rng: np.random.Generator, max_deg: float = 12.0, max_mm: float = 12.0) -> np.ndarray:
    """A random template->subject affine: rotation, anisotropic scale 0.92-1.08, translation."""
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(tuple(rng.uniform(-max_deg, max_deg, 3))) @ np.diag(rng.uniform(0.92, 1.08, 3))
    matrix[:3, 3] = rng.uniform(-max_mm, max_mm, 3)
    return matrix


@lru_cache(maxsize=None)
def _template(voxel_mm: float) -> nib.Nifti1Image:
    """The template brain box-averaged to ``voxel_mm`` (an integer factor of 1 mm)."""
    img = nib.load(template_brain_path())
    data = img.get_fdata(dtype=np.float32)
    k = int(voxel_mm)
    shape = [s // k * k for s in data.shape]
    data = data[: shape[0], : shape[1], : shape[2]]
    data = data.reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k).mean(axis=(1, 3, 5))
    affine = img.affine @ np.diag([k, k, k, 1.0])
    affine[:3, 3] = img.affine[:3, 3] + (k - 1) / 2.0
    data[data < 1.0] = 0.0
    return nib.Nifti1Image(data.astype(np.float32), affine)


def _render(
    source: nib.Nifti1Image,
    template_to_subject: np.ndarray,
    voxel_mm: float,
    storage: str = "LAS",
    flip: bool = False,
) -> nib.Nifti1Image:
    """Render ``source`` (template space) into a subject scan with the given pose and storage order."""
    shape = (int(200 / voxel_mm),) * 3
    ornt = nib.orientations.axcodes2ornt(storage)
    axes = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(ornt):
        axes[int(axis), i] = sign * voxel_mm
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = template_to_subject[:3, 3] - axes @ (np.asarray(shape) - 1) / 2.0
    vox2vox = np.linalg.inv(source.affine) @ np.linalg.inv(template_to_subject) @ affine
    data = ndimage.affine_transform(
        source.get_fdata(dtype=np.float32), vox2vox[:3, :3], vox2vox[:3, 3], output_shape=shape, order=1
    )
    if flip:
        data = np.flip(data, axis=int(np.argmax(np.abs(affine[0, :3])))).copy()
    return nib.Nifti1Image(data.astype(np.float32), affine)


def _subject(rng: np.random.Generator, flip: bool = False, voxel_mm: float = 3.0):
    """(brain image, brain mask, true template->subject) of a posed copy of the 3 mm template."""
    truth = _random_affine(rng)
    source = _template(3)
    img = _render(source, truth, voxel_mm, flip=flip)
    mask_source = nib.Nifti1Image((source.get_fdata() > 0).astype(np.float32), source.affine)
    mask = _render(mask_source, truth, voxel_mm, flip=flip).get_fdata() > 0.5
    brain = nib.Nifti1Image(np.where(mask, img.get_fdata(dtype=np.float32), 0).astype(np.float32), img.affine)
    return brain, mask, truth


def _mean_error_mm(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean displacement (mm) between two template->subject affines over template brain voxels."""
    tpl = _template(3)
    ijk = np.argwhere(tpl.get_fdata() > 0)[::7]
    points = np.c_[ijk, np.ones(len(ijk))] @ tpl.affine.T
    return float(np.linalg.norm(points @ estimate.T - points @ truth.T, axis=1).mean())


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, str(path))
    return path


def _volume(shape=(20, 22, 24), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# load_t1w
# ------------------------------------------------------------------------------------------------

def test_load_t1w_reads_a_good_image(tmp_path: Path) -> None:
    affine = np.diag([1.2, 1.0, 1.1, 1.0])
    path = _save(nib.Nifti1Image(_volume().astype(np.int16), affine), tmp_path / "t1.nii.gz")
    img = load_t1w(path)
    assert img.shape == (20, 22, 24)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine)


def test_load_t1w_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="not found"):
        load_t1w(tmp_path / "nope.nii.gz")


def test_load_t1w_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(BadDataError, match="sub-01_T1w.nii.gz.*empty.*fix:") as err:
        load_t1w(path)
    assert err.value.exit_code == 65
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["t1.nii.gz", "t1.nii"])
def test_load_t1w_truncated(tmp_path: Path, name: str) -> None:
    path = _save(nib.Nifti1Image(_volume((40, 40, 40)), np.eye(4)), tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError, match=f"{name}: unreadable or truncated.*fix:"):
        load_t1w(path)


def test_load_t1w_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "t1.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 50))
    with pytest.raises(BadDataError, match="t1.nii.gz"):
        load_t1w(path)


def test_load_t1w_rejects_multi_volume(tmp_path: Path) -> None:
    path = _save(nib.Nifti1Image(np.stack([_volume(), _volume(seed=1)], axis=-1), np.eye(4)), tmp_path / "t1.nii")
    with pytest.raises(BadDataError, match="not a 3D image.*2 volumes"):
        load_t1w(path)


def test_load_t1w_squeezes_single_volume(tmp_path: Path) -> None:
    vol = _volume()
    path = _save(nib.Nifti1Image(vol[..., None], np.eye(4)), tmp_path / "t1.nii.gz")
    img = load_t1w(path)
    assert img.shape == vol.shape
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), vol)


def test_load_t1w_rejects_nan_and_inf(tmp_path: Path) -> None:
    for bad in (np.nan, np.inf):
        vol = _volume()
        vol[3, 4, 5] = bad
        path = _save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "t1.nii.gz")
        with pytest.raises(BadDataError, match="NaN or Inf"):
            load_t1w(path)


def test_load_t1w_rejects_constant(tmp_path: Path) -> None:
    path = _save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.float32), np.eye(4)), tmp_path / "t1.nii.gz")
    with pytest.raises(BadDataError, match="constant"):
        load_t1w(path)


@pytest.mark.parametrize("zooms", [(0.05, 1, 1), (1, 1, 12.0)])
def test_load_t1w_rejects_absurd_voxel_sizes(tmp_path: Path, zooms: tuple[float, float, float]) -> None:
    path = _save(nib.Nifti1Image(_volume(), np.diag([*zooms, 1.0])), tmp_path / "t1.nii.gz")
    with pytest.raises(BadDataError, match="t1.nii.gz: absurd voxel size"):
        load_t1w(path)


def test_load_t1w_rejects_zero_voxel_size(tmp_path: Path) -> None:
    img = nib.Nifti1Image(_volume(), np.eye(4))
    img.header.set_qform(None, 0)
    img.header["srow_y"] = [0.0, 0.0, 0.0, 0.0]  # the sform's second column is zero
    path = tmp_path / "t1.nii.gz"
    nib.Nifti1Image(_volume(), None, img.header).to_filename(str(path))
    with pytest.raises(BadDataError, match="t1.nii.gz: absurd voxel size.*0 "):
        load_t1w(path)


def test_load_t1w_rejects_raw_zero_pixdim(tmp_path: Path) -> None:
    """pixdim 0 without an sform: nibabel reads 1 mm voxels, the raw header says the size is unknown."""

    path = raw_nifti_with_zero_pixdim(tmp_path / "t1.nii.gz")
    assert nib.load(path).header.get_zooms()[:3] == (1.0, 1.0, 1.0)  # what nibabel alone would use
    with pytest.raises(BadDataError, match=r"t1.nii.gz: voxel sizes are 0 .*pixdim 0, 0, 0.* no qform/sform"):
        load_t1w(path)


# ------------------------------------------------------------------------------------------------
# header checks
# ------------------------------------------------------------------------------------------------

def _by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


def test_header_checks_clean_image_passes_orientation_checks() -> None:
    img = nib.Nifti1Image(_volume((120, 120, 120)), np.diag([-1.0, 1.0, 1.0, 1.0]))
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 1)
    checks = _by_name(header_checks(img))
    for name in ("xform_codes", "qform_sform_match", "zooms_match_affine", "obliquity", "axis_codes", "voxel_size"):
        assert checks[name]["passed"], checks[name]
    assert "radiological" in checks["determinant"]["detail"] and checks["determinant"]["passed"]
    assert all(set(c) == {"name", "passed", "detail"} for c in checks.values())


def test_header_checks_flag_qform_sform_mismatch() -> None:
    img = nib.Nifti1Image(_volume(), np.eye(4))
    qform = np.eye(4)
    qform[0, 3] = 5.0
    img.set_qform(qform, 1)
    img.set_sform(np.eye(4), 1)
    checks = _by_name(header_checks(img))
    assert not checks["qform_sform_match"]["passed"]
    assert "5" in checks["qform_sform_match"]["detail"]


def test_header_checks_flag_obliquity_and_missing_codes() -> None:
    affine = np.eye(4)
    affine[:3, :3] = _rotation((0.0, 0.0, 10.0))
    img = nib.Nifti1Image(_volume(), affine)
    assert not _by_name(header_checks(img))["obliquity"]["passed"]
    img.set_qform(None, 0)
    img.set_sform(None, 0)
    assert not _by_name(header_checks(img))["xform_codes"]["passed"]


def test_header_checks_never_raise() -> None:
    img = nib.Nifti1Image(_volume(), np.eye(4))
    img.header["pixdim"][0] = 3.0  # invalid qfac
    checks = _by_name(header_checks(img))
    assert not checks["qfac"]["passed"]
    assert len(checks) >= 10


# ------------------------------------------------------------------------------------------------
# conform
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["LPS", "PIR", "RAS", "ASL"])
def test_conform_keeps_world_coordinates_exact(storage: str) -> None:
    rng = np.random.default_rng(1)
    vol = _volume((17, 19, 23))
    ornt = nib.orientations.axcodes2ornt(storage)
    axes = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(ornt):
        axes[int(axis), i] = sign * (1.0 + 0.2 * i)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(tuple(rng.uniform(-8, 8, 3))) @ axes
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    img = nib.Nifti1Image(vol, affine)
    out = conform(img)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert out.get_data_dtype() == np.float32
    new = out.get_fdata(dtype=np.float32)
    # every voxel keeps its value at exactly the same world point
    ijk = np.argwhere(np.ones(vol.shape, bool))
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    new_ijk = (world - out.affine[:3, 3]) @ np.linalg.inv(out.affine[:3, :3]).T
    rounded = np.rint(new_ijk).astype(int)
    assert np.abs(new_ijk - rounded).max() < 1e-9
    np.testing.assert_array_equal(new[tuple(rounded.T)], vol[tuple(ijk.T)])


# ------------------------------------------------------------------------------------------------
# brain masks
# ------------------------------------------------------------------------------------------------

def test_mask_from_image_same_grid_and_resampled() -> None:
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 6:14, 4:12] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    assert np.array_equal(mask_from_image(mask_img, nib.Nifti1Image(np.zeros((20, 20, 20)), affine)), mask)
    # reference stored LPS at 1 mm: every reference voxel maps to the mask voxel it lies in
    ref_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    ref_affine[:3, 3] = [39.25, 39.25, 0.25]  # no voxel centre half-way between mask voxels
    ref = nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), ref_affine)
    out = mask_from_image(mask_img, ref)
    ijk = np.argwhere(np.ones(out.shape, bool))
    world = ijk @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    src = np.rint(world / 2.0).astype(int)
    inside = np.all((src >= 0) & (src < 20), axis=1)
    expected = np.zeros(len(ijk), bool)
    expected[inside] = mask[tuple(src[inside].T)]
    assert np.array_equal(out[tuple(ijk.T)], expected)


@pytest.mark.slow
def test_extract_brain_finds_the_brain_under_a_skull() -> None:
    source = _template(2)
    brain = source.get_fdata(dtype=np.float32)
    inside = brain > 0
    distance = ndimage.distance_transform_edt(~inside, sampling=2.0)
    head = brain.copy()
    head[(distance > 0) & (distance <= 4)] = 10.0  # CSF
    head[(distance > 4) & (distance <= 9)] = 5.0  # skull
    head[(distance > 9) & (distance <= 15)] = 70.0  # scalp
    head = np.pad(head, 10)
    affine = source.affine.copy()
    affine[:3, 3] -= 20.0
    rng = np.random.default_rng(0)
    head += rng.normal(0, 2, head.shape).astype(np.float32)
    img = nib.Nifti1Image(np.abs(head)[::-1].copy(), affine @ np.array(
        [[-1, 0, 0, head.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))  # stored LAS
    truth = np.pad(inside, 10)[::-1]
    mask, brain_img = extract_brain(img, n_threads=2)
    assert mask.shape == img.shape and mask.dtype == bool
    dice = 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())
    assert dice > 0.9
    assert np.all(brain_img.get_fdata()[~mask] == 0)
    np.testing.assert_allclose(brain_img.affine, img.affine)


# ------------------------------------------------------------------------------------------------
# registration and ITK files
# ------------------------------------------------------------------------------------------------

def test_itk_affine_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    matrix = _random_affine(rng, max_deg=25)
    matrix[:3, :3] = matrix[:3, :3] @ np.array([[1, 0.05, 0], [0, 1, 0.02], [0, 0, 1]])
    path = write_itk_affine(matrix, tmp_path / "from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt")
    text = path.read_text()
    assert text.startswith("#Insight Transform File V1.0\n")
    assert "Transform: AffineTransform_double_3_3" in text
    np.testing.assert_allclose(read_itk_affine(path), matrix, atol=1e-12)
    loaded = nt.linear.load(str(path), fmt="itk")
    np.testing.assert_allclose(loaded.matrix, matrix, atol=1e-5)
    # nitransforms' own writer stores the same parameters (in float precision)
    nt.linear.Affine(matrix).to_filename(str(tmp_path / "nt.txt"), fmt="itk")
    np.testing.assert_allclose(read_itk_affine(tmp_path / "nt.txt"), matrix, atol=1e-5)
    # resampling direction: the transform maps an MNI point to the subject point
    point = np.array([10.0, -20.0, 30.0])
    np.testing.assert_allclose(loaded.map(point[None])[0], matrix[:3, :3] @ point + matrix[:3, 3], atol=1e-4)


def test_itk_affine_text_rejects_non_affine() -> None:
    with pytest.raises(ValueError):
        itk_affine_text(np.ones((4, 4)))


@pytest.mark.slow
def test_register_affine_recovers_a_random_affine() -> None:
    rng = np.random.default_rng(11)
    brain, mask, truth = _subject(rng)
    estimate = register_affine(brain, mask, _template(3), resolution=4.0, seed=0, n_threads=1)
    assert _mean_error_mm(estimate, truth) < 2.0
    assert np.linalg.det(estimate[:3, :3]) > 0


@pytest.mark.slow
def test_register_affine_dof_restricts_the_transform() -> None:
    brain, mask, truth = _subject(np.random.default_rng(4))
    for dof in (7, 9):
        estimate = register_affine(brain, mask, _template(3), resolution=4.0, n_threads=1, dof=dof)
        linear = estimate[:3, :3]
        # no shear: the columns are orthogonal (linear = R @ diag(s)); 7 dof: all scales equal
        gram = linear.T @ linear
        assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-9
        scales = np.sqrt(np.diag(gram))
        if dof == 7:
            assert np.ptp(scales) < 1e-9
        assert np.linalg.det(linear) > 0
        assert _mean_error_mm(estimate, truth) < 6.0  # the truth has anisotropic scales
    with pytest.raises(ValueError):
        register_affine(brain, mask, _template(3), dof=8)


def test_matrix_to_parameters_round_trips_and_drops_what_dof_fixes() -> None:
    params = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.1, 0.2, 0.02, -0.03, 0.04, 0.05, -0.02, 0.01], dtype=torch.float64)
    centres = (np.array([1.0, -17.0, 9.0]), np.array([4.0, 2.0, -30.0]))
    log_scale0 = 0.07
    matrix = register._template_to_subject(params, *(torch.from_numpy(c) for c in centres), log_scale0).numpy()
    np.testing.assert_allclose(matrix_to_parameters(matrix, *centres, log_scale0, dof=12), params.numpy(), atol=1e-9)
    shear_free = matrix_to_parameters(matrix, *centres, log_scale0, dof=9)
    assert np.all(shear_free[9:] == 0)
    rigid_scale = matrix_to_parameters(matrix, *centres, log_scale0, dof=7)
    assert np.ptp(rigid_scale[6:9]) == 0
    # the centre still lands where the matrix sends it, whatever the model keeps of the linear part
    kept = register._template_to_subject(torch.from_numpy(shear_free), *(torch.from_numpy(c) for c in centres),
                                         log_scale0).numpy()
    np.testing.assert_allclose(kept[:3, :3] @ centres[0] + kept[:3, 3], matrix[:3, :3] @ centres[0] + matrix[:3, 3],
                               atol=1e-9)
    with pytest.raises(ValueError, match="positive determinant"):
        matrix_to_parameters(np.diag([-1.0, 1.0, 1.0, 1.0]), *centres, log_scale0)


@pytest.mark.slow
def test_register_affine_refines_a_start_estimate_with_fewer_steps(monkeypatch) -> None:
    """Started from an estimate, the registration reaches the same answer with a fraction of the Adam steps."""
    brain, mask, truth = _subject(np.random.default_rng(11))
    steps: list[int] = []
    optimise = register._optimise

    def counting(level, params, centres, log_scale0, iterations, *args, **kwargs):
        steps.append(int(iterations))
        return optimise(level, params, centres, log_scale0, iterations, *args, **kwargs)

    monkeypatch.setattr(register, "_optimise", counting)
    cold = register_affine(brain, mask, _template(3), resolution=4.0, seed=0, n_threads=1, dof=9)
    cold_steps, steps[:] = sum(steps), []
    # a start about a degree and a millimetre off the answer (the mirror of a registration is 0.6-1.0 mm off
    # the mirrored scan's on the real heads of tests/test_real_heads.py)
    start = cold.copy()
    start[:3, :3] = _rotation((1.0, -0.5, 0.5)) @ start[:3, :3]
    start[:3, 3] += [1.0, -0.5, 0.5]
    warm = register_affine(brain, mask, _template(3), resolution=4.0, seed=0, n_threads=1, dof=9, initial=start)
    warm_steps = sum(steps)
    assert warm_steps <= cold_steps / 5
    assert _mean_error_mm(warm, cold) < 0.5
    assert _mean_error_mm(warm, truth) < _mean_error_mm(cold, truth) + 0.5
    # started from the answer, it stays there
    again = register_affine(brain, mask, _template(3), resolution=4.0, seed=0, n_threads=1, dof=9, initial=cold)
    assert _mean_error_mm(again, cold) < 0.3


@pytest.mark.slow
def test_register_affine_is_deterministic_for_a_seed() -> None:
    brain, mask, _ = _subject(np.random.default_rng(5))
    first = register_affine(brain, mask, _template(3), resolution=4.0, seed=7, n_threads=1)
    second = register_affine(brain, mask, _template(3), resolution=4.0, seed=7, n_threads=1)
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_register_affine_does_not_undo_a_left_right_flip() -> None:
    grid = model_grid(4.0)
    template, _ = template_on_grid(grid)
    on_grid, statistic = {}, {}
    for flip in (False, True):
        brain, mask, _ = _subject(np.random.default_rng(1), flip=flip)
        estimate = register_affine(brain, mask, _template(3), resolution=4.0, seed=0, n_threads=1)
        assert np.linalg.det(estimate[:3, :3]) > 0
        on_grid[flip] = resample_to_grid(brain, estimate, grid)
        mask_img = nib.Nifti1Image(mask.astype(np.float32), brain.affine)
        statistic[flip] = flip_statistic(on_grid[flip], resample_to_grid(mask_img, estimate, grid) > 0.5, template)

    # The flipped scan lands in template space as the mirror image of the unflipped one: the
    # left-right antisymmetric parts of the two registered brains are opposite.
    region = (on_grid[False] > 0) | (on_grid[True] > 0)
    region |= region[::-1]
    assert antisymmetric_correlation(on_grid[True], on_grid[False], region) < -0.2
    assert statistic[True] > 0 > statistic[False]


# ------------------------------------------------------------------------------------------------
# grid and normalisation
# ------------------------------------------------------------------------------------------------

def test_resample_to_grid_identity_and_translation() -> None:
    grid = model_grid(4.0)
    data = np.random.default_rng(0).uniform(0, 1, grid.shape).astype(np.float32)
    img = nib.Nifti1Image(data, grid.affine)
    np.testing.assert_allclose(resample_to_grid(img, np.eye(4), grid), data, atol=1e-6)
    shift = np.eye(4)
    shift[0, 3] = 8.0  # template x maps to subject x + 8 mm = two voxels further along axis 0
    moved = resample_to_grid(img, shift, grid, order=0)
    np.testing.assert_allclose(moved[:-2], data[2:], atol=1e-6)
    assert moved.dtype == np.float32 and moved.shape == grid.shape


def test_template_on_grid_is_cached_and_masked() -> None:
    grid = model_grid(4.0)
    array, mask = template_on_grid(grid)
    again, _ = template_on_grid(model_grid(4.0))
    assert array is again
    assert array.shape == grid.shape and mask.dtype == bool
    assert np.all(array[~mask] == 0) and array[mask].min() > 0
    assert not array.flags.writeable


def test_normalise_intensity_stats_inside_mask() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(300.0, 40.0, (32, 32, 32)).astype(np.float32)
    data[0, 0, 0] = 1e6  # an outlier is clipped, not allowed to set the scale
    mask = np.zeros(data.shape, bool)
    mask[2:30, 2:30, 2:30] = True
    mask[0, 0, 0] = True
    out = normalise_intensity(data, mask)
    assert out.dtype == np.float32
    assert np.all(out[~mask] == 0)
    inside = out[mask]
    assert abs(float(np.median(inside))) < 1e-3
    q25, q75 = np.percentile(inside, [25, 75])
    assert abs((q75 - q25) - 1.349) < 0.01
    assert abs(float(inside.std()) - 1.0) < 0.05
    assert inside.max() == pytest.approx(5.0)
    with pytest.raises(ValueError):
        normalise_intensity(data, np.zeros(data.shape, bool))
