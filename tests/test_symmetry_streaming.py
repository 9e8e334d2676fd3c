"""The symmetry group level streams (issue 27): the reference and the scores read the asymmetry maps from
(memory-mapped) stacks a slab, a column chunk or a scan at a time, with today's results: bit for bit from float32
maps, within float16 rounding from the default float16 stack."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage as ndi

from bids_siamese.atlas import atlas_on_grid
from bids_siamese.bids.derivatives import init_output_dir
from bids_siamese.config import Settings
from bids_siamese.preproc.grid import template_on_grid
from bids_siamese.resources import model_grid
from bids_siamese.symmetry import asymmetry, normative, regional
from bids_siamese.symmetry import model as symmetry_model
from bids_siamese.symmetry.model import build_symmetry_model
from bids_siamese.symmetry.analysis import template_reference
from bids_siamese.symmetry.run import ScanVolumes, collect_scans, load_scan, score_dataset
from bids_siamese.symmetry.scans import Scan, ScanStack, prepare_scan
from bids_siamese.symmetry.simulate import LesionConfig, simulate_lesion
from bids_siamese.symmetry.train import train_symmetry_model
from bids_siamese.train import data as train_data
from bids_siamese.train.data import stack_array
from bids_siamese.train.trainer import TrainConfig

RES = 8.0


@pytest.fixture
def spill_everything(monkeypatch):
    """Every stack memory-mapped, the normative passes in 97-value chunks, the reference one x plane at a time."""
    monkeypatch.setattr(train_data, "SPILL_BYTES", 0)
    monkeypatch.setattr(normative, "CHUNK_VALUES", 97)
    monkeypatch.setattr(asymmetry, "SLAB_VALUES", 1)


def population(n: int = 28, shape=(20, 16, 16), seed: int = 0):
    """Antisymmetric AI maps of one large-scale pattern with per-scan variation, masks with per-scan holes, and a
    lesion in scan 0."""
    rng = np.random.default_rng(seed)

    def antisym(v):
        return (v - v[::-1]) / 2.0

    pattern = antisym(ndi.gaussian_filter(rng.normal(0, 1, shape), 3.0))
    pattern = 0.06 * pattern / np.abs(pattern).max()
    maps, masks = [], []
    for _ in range(n):
        maps.append((pattern * rng.uniform(0.8, 1.2) + antisym(ndi.gaussian_filter(rng.normal(0, 0.012, shape),
                                                                                   1.0))).astype(np.float32))
        mask = np.ones(shape, bool)
        mask[tuple(rng.integers(0, s) for s in shape)] = False
        masks.append(mask)
    blob = np.zeros(shape, np.float32)
    blob[4:7, 6:9, 6:9] = -0.08
    maps[0] = maps[0] + blob - blob[::-1]
    return maps, masks, [f"s{i // 2}" for i in range(n)]  # two scans per participant


def stacks(maps, masks, dtype):
    out_maps, out_masks = stack_array((len(maps), *maps[0].shape), dtype), stack_array((len(masks), *maps[0].shape), bool)
    for i, (a, m) in enumerate(zip(maps, masks)):
        out_maps[i], out_masks[i] = a, m
    return out_maps, out_masks


def test_group_reference_from_memory_mapped_stacks_matches_the_lists(spill_everything):
    maps, masks, groups = population()
    template = asymmetry.Reference(mean=np.zeros(maps[0].shape, np.float32))
    in_memory = asymmetry.group_reference(maps, masks, [], template, 4.0, groups=groups)
    m32, k32 = stacks(maps, masks, np.float32)
    assert isinstance(m32, np.memmap) and isinstance(k32, np.memmap)
    streamed = asymmetry.group_reference(m32, k32, [], template, 4.0, groups=groups)
    assert isinstance(streamed.normative.member_expected, np.memmap)  # the (scans, voxels) matrix is on disk
    # float32 maps: the same statistics; only the Gram matrix's sum is split in chunks (float64)
    np.testing.assert_array_equal(streamed.mean, in_memory.mean)
    np.testing.assert_allclose(streamed.sd, in_memory.sd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(streamed.extra["focal"], in_memory.extra["focal"], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(streamed.normative.member_expected), in_memory.normative.member_expected,
                               rtol=1e-4, atol=1e-6)
    # float16 maps: within their rounding (2**-11 of a value), and the lesion stays the top score
    m16, k16 = stacks(maps, masks, np.float16)
    half = asymmetry.group_reference(m16, k16, [], template, 4.0, groups=groups)
    bound = 2.0 ** -10 * max(float(np.abs(a).max()) for a in maps)
    assert 0 < float(np.abs(half.mean - in_memory.mean).max()) <= bound
    assert float(np.abs(half.sd - in_memory.sd).max()) <= 0.02 * float(in_memory.sd.max())
    np.testing.assert_allclose(half.extra["focal"], in_memory.extra["focal"], rtol=0.01)
    assert int(np.argmax(half.extra["focal"])) == int(np.argmax(in_memory.extra["focal"])) == 0


def test_normative_bases_of_a_large_cohort_use_a_bounded_random_subset(monkeypatch):
    """Above MAX_BASIS_SCANS scans in a fold, a random subset fits its modes (bounded time per fold: linear in the
    cohort); below it, every scan, as before. The lesion stays the top focal statistic either way."""
    maps, masks, groups = population()
    template = asymmetry.Reference(mean=np.zeros(maps[0].shape, np.float32))
    full = asymmetry.group_reference(maps, masks, [], template, 4.0, groups=groups)
    fitted = []
    real_fit = normative.fit_basis
    monkeypatch.setattr(normative, "fit_basis", lambda x, r, rows=None: fitted.append(
        len(x) if rows is None else len(rows)) or real_fit(x, r, rows))
    monkeypatch.setattr(normative, "MAX_BASIS_SCANS", 12)
    capped = asymmetry.group_reference(maps, masks, [], template, 4.0, groups=groups)
    assert max(fitted) == 12 and len(fitted) == 11  # ten folds of about 25 scans, and all 28 scans
    assert not np.array_equal(capped.sd, full.sd)
    assert int(np.argmax(capped.extra["focal"])) == int(np.argmax(full.extra["focal"])) == 0
    np.testing.assert_array_equal(normative.basis_rows(np.arange(30), 3, 12), normative.basis_rows(np.arange(30), 3, 12))


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, model_grid(RES).affine), str(path))


def write_outputs(root: Path, n: int, lesions: dict[int, str], seed: int = 0) -> Settings:
    """``n`` participants' model-grid outputs: the template, warped and noisy, with large lesions in ``lesions``."""
    init_output_dir(root)
    data, mask = template_on_grid(model_grid(RES))
    q75, q50, q25 = np.percentile(data[mask], [75, 50, 25])
    data = np.where(mask, (data - q50) / (q75 - q25), 0.0)
    rng = np.random.default_rng(seed)
    coords = np.indices(data.shape).astype(float)
    for i in range(n):
        shift = [ndi.gaussian_filter(rng.normal(size=data.shape), 2.0) * 0.6 for _ in range(3)]
        img = ndi.map_coordinates(data, [coords[a] + shift[a] for a in range(3)], order=1)
        img = np.where(mask, img + rng.normal(0, 0.05, data.shape), 0).astype(np.float32)
        if i in lesions:
            img, _ = simulate_lesion(img, mask, model_grid(RES).affine, rng,
                                     LesionConfig(volume_mm3=(6000.0, 8000.0), intensity=(-3.0, -2.5)),
                                     hemisphere=lesions[i])
        base = root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_space-MNI152NLin2009cAsym"
        _save(Path(f"{base}_desc-preproc_T1w.nii.gz"), img)
        _save(Path(f"{base}_desc-brain_mask.nii.gz"), mask.astype(np.uint8))
    return Settings(bids_dir=root / "nobids", output_dir=root, analysis_level="group", work_dir=root / "work",
                    resolution=RES)


def in_memory_table(files, settings: Settings) -> pd.DataFrame:
    """The group table as the symmetry task made it before it streamed: every scan's map in memory as float32."""
    fwhm = float(settings.symmetry_fwhm)
    labels, names = atlas_on_grid(settings.atlas, RES)
    pairs = regional.homologous_pairs(names)
    grid = model_grid(RES)
    loaded = [load_scan(f, RES) for f in files]
    maps = [asymmetry.asymmetry_map(d, m, RES, fwhm) for d, m in loaded]
    regions = [regional.regional_asymmetry(asymmetry.positive_intensities(d, m), m, labels, pairs) for d, m in loaded]
    reference = asymmetry.group_reference(maps, [m for _, m in loaded], regions,
                                          template_reference(RES, fwhm, settings.atlas),
                                          RES, fwhm, groups=[f.participant_id for f in files],
                                          components=int(settings.symmetry_components))
    rows = []
    for i, (f, (_, mask)) in enumerate(zip(files, loaded)):
        s = asymmetry.score_map(maps[i], mask, RES, reference.member(i))
        peak = asymmetry.peak_location(s["peak"], s["z"], grid.affine)
        rows.append({"asymmetry_score": round(s["asymmetry_score"], 3),
                     "asymmetry_suspected": bool(s["asymmetry_score"] > asymmetry.ASYMMETRY_THRESHOLD),
                     "focal_z": round(s["focal_z"], 3), "raw_magnitude": round(s["raw_magnitude"], 5),
                     "peak_mm": ",".join(f"{v:.0f}" for v in peak),
                     "peak_region": regional.region_at(peak, labels, names, grid.affine),
                     "top_regions": regional.format_top_regions(
                         regional.top_regions(regional.regional_z(regions[i], reference), 3))})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_score_dataset_streams_with_todays_results(tmp_path, spill_everything):
    settings = write_outputs(tmp_path / "out", 12, {0: "L", 1: "R"})
    files = collect_scans(settings, [f"{i:02d}" for i in range(12)])
    today = in_memory_table(files, settings)
    columns = list(today.columns)
    exact = score_dataset(files, RES, settings.atlas, float(settings.symmetry_fwhm), map_dtype="float32")
    pd.testing.assert_frame_equal(exact.table[columns], today)  # float32 stacks: bit for bit
    half = score_dataset(files, RES, settings.atlas, float(settings.symmetry_fwhm))  # the default, float16
    assert half.table["asymmetry_suspected"].tolist() == today["asymmetry_suspected"].tolist()
    # the peak voxel may move to a neighbour where |z| is nearly tied (inside a lesion), no farther
    moved = [np.linalg.norm(np.array(a.split(","), float) - np.array(b.split(","), float))
             for a, b in zip(half.table["peak_mm"], today["peak_mm"])]
    assert max(moved) <= 2 * RES and sum(d > 0 for d in moved) <= 2
    for column in ("asymmetry_score", "focal_z", "raw_magnitude"):
        np.testing.assert_allclose(half.table[column], today[column], rtol=0.01, atol=0.02)
    assert set(half.table.sort_values("asymmetry_score")["participant_id"][-2:]) == {"sub-00", "sub-01"}
    # the scans themselves are read from disk when a model needs them
    assert isinstance(half.volumes, ScanVolumes) and len(half.masks) == 12
    image, mask = load_scan(files[3], RES)
    np.testing.assert_array_equal(half.volumes[3], image)
    assert [m.dtype for m in half.masks[2:4]] == [np.dtype(bool)] * 2 and np.array_equal(half.masks[3], mask)


# ---------------------------------------------------------------------------------------------------------------
# Training (issue 27): the training, validation and test scans as memory-mapped stacks
# ---------------------------------------------------------------------------------------------------------------


def _training_scans(n: int = 6) -> list[Scan]:
    mask = np.zeros((20, 24, 20), bool)
    mask[3:17, 4:20, 4:16] = True
    rng = np.random.default_rng(1)
    return [prepare_scan(np.where(mask, rng.normal(size=mask.shape), 0), mask, 4.0, key=f"s{i}") for i in range(n)]


def _train(train, val, cache: str):
    config = TrainConfig(epochs=2, batch_size=2, flip_lr=True, progress=False)
    torch.manual_seed(0)
    model = build_symmetry_model("small", embedding_dim=16, difference_channel=True)
    return train_symmetry_model(model, train, val, config, 4.0, LesionConfig(volume_mm3=(500.0, 2000.0)),
                                samples_per_scan=1, val_draws=1, volume_cache_dtype=cache)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_symmetry_training_from_memory_mapped_stacks_is_the_same(monkeypatch, one_torch_thread, cache):
    """ScanStack (every stack memory-mapped, the difference channel's reference a y plane at a time) trains the
    same model as the list of scans: the same history, weights, reference and thresholds, bit for bit."""
    scans = _training_scans()
    listed, listed_info = _train(scans[:4], scans[4:], cache)
    monkeypatch.setattr(train_data, "SPILL_BYTES", 0)
    monkeypatch.setattr(symmetry_model, "REFERENCE_CHUNK_VALUES", 1)

    def gather(part):
        return ScanStack.gather(len(part), part[0].volume.shape, 4.0, lambda i: (part[i].volume, part[i].mask,
                                                                                  part[i].key))

    train, val = gather(scans[:4]), gather(scans[4:])
    assert isinstance(train.volumes, np.memmap) and isinstance(train.masks, np.memmap)
    for a, b in zip(train, scans[:4]):  # a stacked scan is the scan
        assert a.key == b.key and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("volume", "mask",
                                                                                            "depth_mm"))
    stacked, stacked_info = _train(train, val, cache)
    pd.testing.assert_frame_equal(stacked.history.drop(columns=["seconds", "volumes_per_second"]),
                                  listed.history.drop(columns=["seconds", "volumes_per_second"]))
    sa, sb = stacked.model.state_dict(), listed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the reference buffers included
    for key in ("best_epoch", "best_val_loss", "threshold", "threshold_fp5", "threshold_clean_fp5"):
        assert stacked_info[key] == listed_info[key]
