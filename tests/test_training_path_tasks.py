"""The GPU-ready training path in the longitudinal and the symmetry trainers (issue 14): float16 volume cache,
DataLoader batch assembly with workers, torch.compile.

CPU only, one torch thread, tiny volumes: the longitudinal scans on the 8 mm grid (21 x 26 x 22), the symmetry
scans 20 x 24 x 20 voxels at 4 mm.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bids_siamese.config import Settings
from bids_siamese.models import build_model
from bids_siamese.resources import model_grid
from bids_siamese.symmetry.model import build_symmetry_model
from bids_siamese.symmetry.simulate import LesionConfig, curriculum_range
from bids_siamese.symmetry.scans import Scan, prepare_scan
from bids_siamese.symmetry.train import RAMP_FRACTION, make_example, train_symmetry_model
from bids_siamese.train.batches import batch_seed
from bids_siamese.train.data import VolumeCache, VolumeFiles, pair_batches, volume_cache
from bids_siamese.train.longitudinal import collect_longitudinal
from bids_siamese.train.loop import PairData, predict_pairs, train_longitudinal
from bids_siamese.train.models import new_longitudinal_model
from bids_siamese.train.run import siamese_options
from bids_siamese.train.trainer import TrainConfig, train_config

from test_train import make_group_inputs, settings_for

SYM_RES = 4.0
SYM_LESION = LesionConfig(volume_mm3=(500.0, 2000.0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _same(a, b) -> bool:
    """Same training history and same final weights."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return a.history["train_loss"].tolist() == b.history["train_loss"].tolist() and all(
        torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------------
# Longitudinal
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    return make_group_inputs(tmp_path_factory.mktemp("long"))


def _pair_data(n_scans: int = 12, seed: int = 0) -> PairData:
    """6 session pairs (3 decline, 3 stable) of random brains on the 8 mm grid."""
    rng = np.random.default_rng(seed)
    shape = model_grid(8.0).shape
    vols = (rng.normal(size=(n_scans, 1, *shape)) * 1.5).astype(np.float32)
    vols[:, :, :3] = 0  # some background
    pairs = np.arange(n_scans).reshape(-1, 2)
    return PairData(vols, pairs, np.array([1.0, 0.0] * (len(pairs) // 2)))


def _train_long(data: PairData, workers: int):
    config = TrainConfig(epochs=2, batch_size=2, patience=5, progress=False, loader_workers=workers)
    torch.manual_seed(0)
    return train_longitudinal(build_model("longitudinal", "small", embedding_dim=8), data, np.arange(4),
                              np.arange(4, 6), config)


def test_longitudinal_training_with_loader_workers_is_reproducible():
    data = _pair_data()
    runs = {key: _train_long(data, workers) for key, workers in (("2a", 2), ("2b", 2), ("1", 1), ("0", 0))}
    assert np.isfinite(runs["2a"].history["train_loss"]).all() and np.isfinite(runs["2a"].history["val_loss"]).all()
    assert _same(runs["2a"], runs["2b"]) and _same(runs["1"], runs["2a"])  # per-batch generators
    assert not _same(runs["0"], runs["1"])  # 0 workers: the run's one generator, in order


def testcollect_longitudinal_hold_the_cache_for_training_and_the_stored_volumes_for_outputs(long_data):
    bids, out, subjects = long_data
    half = collect_longitudinal(settings_for(bids, out, "longitudinal"), subjects, require_labels=True)
    assert isinstance(half.volumes, VolumeCache) and half.volumes.array.dtype == np.float16  # the default
    assert isinstance(half.stored, VolumeFiles)
    full = collect_longitudinal(settings_for(bids, out, "longitudinal", volume_cache="float32"), subjects, True)
    assert isinstance(full.volumes, np.ndarray) and full.stored is full.volumes
    stored = half.stored[np.arange(len(half.stored))]
    assert np.array_equal(stored, full.volumes)
    assert np.abs(half.volumes[:] - stored).max() <= 2.0 ** -11 * np.abs(stored).max()
    applied = collect_longitudinal(settings_for(bids, out, "longitudinal", mode="apply"), subjects, False, load=False)
    assert isinstance(applied.volumes, VolumeFiles) and applied.stored is applied.volumes


@pytest.mark.parametrize("backbone, tolerance", [("regional", 1e-3), ("small", 0.05)])
def test_longitudinal_float16_cache_predicts_within_tolerance_of_float32(long_data, backbone, tolerance):
    """Trained on the float16 cache or on float32 (same seed, same pairs), both models predicting from the stored
    volumes: p(decline) within ``tolerance``. Measured: 9.9e-5 (regional: no augmentation, region means) and 0.013
    (small CNN, 4 epochs: AdamW's sign-like steps amplify the rounding)."""
    bids, out, subjects = long_data
    extra = {"atlas": "harvard_oxford"} if backbone == "regional" else {}
    preds, losses = {}, {}
    for cache in ("float32", "float16"):
        settings = settings_for(bids, out, "longitudinal", backbone=backbone, volume_cache=cache, epochs=4, **extra)
        inputs = collect_longitudinal(settings, subjects, require_labels=True)
        labels = inputs.pairs["label"].to_numpy(dtype=float)
        data = PairData(inputs.volumes, inputs.pair_index, labels)
        train_idx, val_idx = np.arange(8), np.arange(8, 12)
        torch.manual_seed(0)
        model = new_longitudinal_model(settings, model_grid(settings.resolution), data, train_idx)
        config = train_config(settings, **siamese_options(settings))
        result = train_longitudinal(model, data, train_idx, val_idx, config)
        preds[cache] = predict_pairs(result.model, PairData(inputs.stored, inputs.pair_index, labels))
        losses[cache] = result.history["train_loss"].to_numpy()
    assert np.isfinite(losses["float16"]).all()
    assert not np.array_equal(losses["float16"], losses["float32"])  # the cache was used for training
    assert np.abs(preds["float16"] - preds["float32"]).max() <= tolerance


# ---------------------------------------------------------------------------------------------------------------
# Symmetry
# ---------------------------------------------------------------------------------------------------------------


def _sym_scans(n: int = 5) -> list[Scan]:
    m = np.zeros((20, 24, 20), bool)
    m[3:17, 4:20, 4:16] = True
    rng = np.random.default_rng(0)
    return [prepare_scan(np.where(m, rng.normal(size=m.shape), 0), m, SYM_RES, key=f"s{i}") for i in range(n)]


def _train_sym(scans, workers: int = 0, cache: str = "float32", compile_model: bool = False, model=None):
    config = TrainConfig(epochs=3, batch_size=4, flip_lr=True, progress=False, loader_workers=workers,
                         compile=compile_model)
    torch.manual_seed(0)
    model = model or build_symmetry_model("small", embedding_dim=16, difference_channel=True)
    return train_symmetry_model(model, scans[:4], scans[4:], config, SYM_RES, SYM_LESION, samples_per_scan=1,
                                val_draws=1, volume_cache_dtype=cache)


def test_task_configs_take_the_runtime_options(tmp_path):
    """The one TrainConfig builder passes --loader-workers/--compile to every task, under the task's overrides."""
    def settings(**kw) -> Settings:
        return Settings(bids_dir=tmp_path, output_dir=tmp_path, work_dir=tmp_path, analysis_level="group",
                        task="symmetry", **kw)

    config = train_config(settings(loader_workers=3, compile=True), flip_lr=True)  # the symmetry task's override
    assert (config.loader_workers, config.compile, config.flip_lr) == (3, True, True)
    default = train_config(settings())
    assert (default.loader_workers, default.compile) == (0, False)


class _Inputs:
    """Records the training inputs (grad enabled, train mode) a symmetry model receives."""

    def __init__(self, model):
        self.x: list[torch.Tensor] = []
        real = model.forward_all

        def forward_all(x):
            if torch.is_grad_enabled() and model.training:
                self.x.append(x.detach().clone())
            return real(x)

        model.forward_all = forward_all


@pytest.mark.parametrize("workers", [0, 2])
def test_symmetry_samples_follow_the_documented_stream(workers):
    """0 workers: one numpy generator (seed) drawn batch after batch, as the trainer did before the DataLoader;
    workers: batch k of epoch e from default_rng(batch_seed(seed, 0, e, k)). The curriculum range is the epoch's."""
    scans = _sym_scans()
    model = build_symmetry_model("small", embedding_dim=16, difference_channel=True)
    inputs = _Inputs(model)
    _train_sym(scans, workers, model=model)
    items = [(i, lesioned) for i in range(4) for lesioned in (True, False)]
    affine = np.diag([SYM_RES] * 3 + [1.0])
    config = TrainConfig(epochs=3, batch_size=4, flip_lr=True)
    shared = np.random.default_rng(0)
    expected = []
    for epoch in (1, 2, 3):
        vrange = curriculum_range(epoch - 1, 3, SYM_LESION.volume_mm3, RAMP_FRACTION)
        for k, batch in enumerate(pair_batches(len(items), 4, np.random.default_rng([0, epoch]))):
            rng = shared if workers == 0 else np.random.default_rng(batch_seed(0, 0, epoch, k))
            expected.append(np.stack([make_example(scans[items[j][0]], items[j][1], rng, config, SYM_LESION, vrange,
                                                   affine)[0] for j in batch])[:, None])
    assert len(inputs.x) == len(expected) == 6
    for got, want in zip(inputs.x, expected):
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))


def test_symmetry_training_with_loader_workers_is_reproducible():
    scans = _sym_scans()
    (a, info), (b, _), (one, _), (zero, _) = (_train_sym(scans, w) for w in (2, 2, 1, 0))
    assert np.isfinite(a.history["train_loss"]).all() and np.isfinite(a.history["val_loss"]).all()
    assert _same(a, b) and _same(a, one) and not _same(a, zero)
    assert 0.0 <= info["threshold"] <= 1.0 and info["volume_cache"] == "float32"


def test_symmetry_float16_cache_trains_from_the_cache_within_tolerance():
    """Same seed, float16 against float32 training volumes: the losses differ (the samples come from the cache) but
    stay within 0.05, and p(abnormal) of the scans within 0.05 (measured: 0.0071 and 0.0115)."""
    scans = _sym_scans()
    (full, info32), (half, info16) = _train_sym(scans, cache="float32"), _train_sym(scans, cache="float16")
    assert info16["volume_cache"] == "float16" and np.isfinite(half.history["train_loss"]).all()
    assert not np.array_equal(full.history["train_loss"], half.history["train_loss"])
    assert np.allclose(full.history["train_loss"], half.history["train_loss"], atol=0.05)
    x = torch.from_numpy(np.stack([s.volume for s in scans])[:, None])
    with torch.no_grad():
        p32, p16 = torch.sigmoid(full.model(x)[0]), torch.sigmoid(half.model(x)[0])
    assert float((p32 - p16).abs().max()) <= 0.05
    # the reference of the difference channel comes from the scans as given, whatever the cache
    assert torch.equal(full.model.reference_mean, half.model.reference_mean)


def test_volume_cache_of_in_memory_volumes_rounds_like_the_file_cache():
    volumes = [np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5) * (i + 1) for i in range(3)]
    full, half = volume_cache(volumes, "float32"), volume_cache(volumes, "float16")
    assert isinstance(full, np.ndarray) and full.shape == (3, 1, 3, 4, 5) and np.array_equal(full[2, 0], volumes[2])
    assert isinstance(half, VolumeCache) and half.array.dtype == np.float16
    assert np.abs(half[:] - full).max() <= 2.0 ** -11 * np.abs(full).max()


def test_symmetry_compile_runs_the_training_forward_with_all_outputs(monkeypatch):
    """The loss needs forward_all's outputs: the compiled module is called as model(x, all_outputs=True), so the
    torch.compile wrapper (which has only forward) runs the training forward; a pass-through compile gives the
    eager result exactly."""
    calls = []

    def fake_compile(module, *args, **kwargs):
        def run(*a, **k):
            calls.append(k)
            return module(*a, **k)
        return run

    scans = _sym_scans()
    eager, _ = _train_sym(scans)
    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled, _ = _train_sym(scans, compile_model=True)
    assert {"all_outputs": True} in calls and type(compiled.model).__name__ == "SymmetrySiamese"
    assert _same(eager, compiled)


def test_symmetry_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def failing_compile(module, *args, **kwargs):
        def broken(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler")
        return broken

    scans = _sym_scans()
    eager, _ = _train_sym(scans)
    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level(logging.WARNING, logger="bids_siamese.train"):
        fallback, _ = _train_sym(scans, compile_model=True)
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1
    assert _same(eager, fallback)


def test_symmetry_model_all_outputs_is_forward_all():
    torch.manual_seed(0)
    model = build_symmetry_model("small", embedding_dim=16).eval()
    x = torch.randn(2, 1, 20, 24, 20)
    out, direct = model(x, all_outputs=True), model.forward_all(x)
    assert set(out) == set(direct) == {"logit", "side", "positions"}
    assert all(torch.equal(out[k], direct[k]) for k in out)
    logit, side = model(x)
    assert torch.equal(logit, direct["logit"]) and torch.equal(side, direct["side"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_symmetry_trains_and_predicts_on_cuda(tmp_path):
    from bids_siamese.symmetry.train import load_symmetry_model, save_symmetry_checkpoint, siamese_logits

    scans = _sym_scans()
    model = build_symmetry_model("small", embedding_dim=16, difference_channel=True)
    config = TrainConfig(epochs=2, batch_size=4, flip_lr=True, progress=False, loader_workers=2)
    result, info = train_symmetry_model(model, scans[:4], scans[4:], config, SYM_RES, SYM_LESION, samples_per_scan=1,
                                        val_draws=1, device="cuda", volume_cache_dtype="float16")
    assert next(result.model.parameters()).device.type == "cuda"
    assert np.isfinite(result.history["train_loss"]).all() and 0.0 <= info["threshold"] <= 1.0
    logit, side = siamese_logits(result.model, [s.volume for s in scans], [s.mask for s in scans], SYM_RES, SYM_RES)
    assert logit.shape == (len(scans),) and np.isfinite(logit).all() and np.isfinite(side).all()
    # the checkpoint of a CUDA-trained model loads on the CPU and gives the same logits
    save_symmetry_checkpoint(tmp_path / "ckpt", result.model, config, SYM_RES, {}, {}, info["threshold"])
    loaded, _ = load_symmetry_model(tmp_path / "ckpt")
    again, _ = siamese_logits(loaded, [s.volume for s in scans], [s.mask for s in scans], SYM_RES, SYM_RES)
    assert next(loaded.parameters()).device.type == "cpu" and np.allclose(again, logit, atol=1e-3)
