"""The group training path: float16 volume cache, DataLoader batch assembly (workers, pinned memory), torch.compile.

No GPU here: the CUDA parts (pinned memory, non-blocking copies, the CUDA default of ``--loader-workers``) are
checked with mocks; everything else trains on the CPU with one torch thread on the 8 mm grid (21 x 26 x 22).
"""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from bids_siamese.cli.parser import parse_args
from bids_siamese.errors import BadDataError, UsageError
from bids_siamese.models import build_model
from bids_siamese.models.regional import RegionalEncoder
from bids_siamese.resources import model_grid
from bids_siamese.train import loop
from bids_siamese.train.data import VolumeCache, augment, family_batches, load_volume_cache, load_volumes
from bids_siamese.train.batches import BatchAssembly, BatchLoader, CompiledOrEager, batch_seed
from bids_siamese.train.loop import TwinData, train_twin
from bids_siamese.train.run import siamese_options
from bids_siamese.train.trainer import TrainConfig, train_config

from test_regional import SHAPE, _held_out_auc, _planted_twins, _quadrants

GRID_SHAPE = (21, 26, 22)  # the 8 mm model grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _brains(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 1, 21, 26, 22)`` float32: normalised intensities inside an ellipsoid, 0 outside."""
    rng = np.random.default_rng(seed)
    grid = np.indices(GRID_SHAPE).astype(float)
    centre = (np.array(GRID_SHAPE, float) - 1) / 2
    inside = sum(((g - c) / (c * 0.9)) ** 2 for g, c in zip(grid, centre)) <= 1
    vols = (rng.normal(size=(n, 1, *GRID_SHAPE)) * 1.5).astype(np.float32)
    vols[:, :, ~inside] = 0
    return vols


def _twin_data(volumes) -> TwinData:
    """8 subjects: 3 MZ families and 2 singletons."""
    family = np.repeat(np.arange(5), [2, 2, 2, 1, 1])
    positive = np.zeros((8, 8), np.float32)
    for a in (0, 2, 4):
        positive[a, a + 1] = positive[a + 1, a] = 1.0
    return TwinData(volumes, family, positive, family[:, None] != family[None, :])


def _train_small(data: TwinData, config: TrainConfig):
    torch.manual_seed(0)
    return train_twin(build_model("twin", "small"), data, np.arange(6), np.arange(6, 8), config)


# ---------------------------------------------------------------------------------------------------------------
# float16 volume cache
# ---------------------------------------------------------------------------------------------------------------


def test_float16_cache_round_trip_error_is_bounded():
    """float16 rounding: at most 2**-11 of a value (2**-25 absolute in the subnormal range), zeros stay zeros,
    indexing gives float32 of the stack's shape, and the stack takes half the memory."""
    vols = _brains(4)
    vols[0, 0, 10, 10, 10] = 3e-6  # a subnormal float16
    vols[0, 0, 10, 10, 11] = 40.0  # a large intensity
    cache = VolumeCache(vols.astype(np.float16))
    assert cache.nbytes * 2 == vols.nbytes and cache.shape == vols.shape and len(cache) == 4
    back = cache[np.arange(4)]
    assert back.dtype == np.float32 and back.shape == vols.shape
    bound = np.maximum(np.abs(vols) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(back - vols) <= bound)
    assert np.array_equal(back == 0, vols == 0)
    assert float(np.abs(back - vols).max()) > 0  # the bound is met by rounding, not by storing float32
    # every index form of an array
    assert np.array_equal(cache[1], back[1]) and np.array_equal(cache[1:3, 0], back[1:3, 0])
    assert np.array_equal(cache[[3, 0], 0, 5], back[[3, 0], 0, 5]) and np.array_equal(np.asarray(cache), back)


def test_load_volume_cache_from_files(tmp_path):
    grid = model_grid(8.0)
    vols = _brains(3)
    paths = []
    for i, v in enumerate(vols):
        paths.append(tmp_path / f"scan{i}.nii.gz")
        nib.save(nib.Nifti1Image(v[0], grid.affine), paths[-1])
    exact = load_volume_cache(paths, grid, "float32")
    assert isinstance(exact, np.ndarray) and np.array_equal(exact, load_volumes(paths, grid))
    cache = load_volume_cache(paths, grid)  # float16 by default
    assert isinstance(cache, VolumeCache) and cache.array.dtype == np.float16
    assert np.all(np.abs(cache[:] - exact) <= np.maximum(np.abs(exact) * 2.0**-11, 2.0**-25))
    loud = vols[0, 0].copy()
    loud[5, 5, 5] = 1e5  # beyond float16
    nib.save(nib.Nifti1Image(loud, grid.affine), tmp_path / "loud.nii.gz")
    with pytest.raises(BadDataError, match="--volume-cache float32"):
        load_volume_cache([tmp_path / "loud.nii.gz"], grid)


def test_regional_training_on_the_float16_cache_matches_float32():
    """The default twin model (regional: no augmentation) learns the same region weights from the float16 cache
    as from float32 (within 1e-4; 1.4e-5 measured), with the same history (1e-4), best epoch and held-out AUC."""
    vols, family, positive, unrelated = _planted_twins(16, np.random.default_rng(0))
    train, val, test = np.arange(0, 20), np.arange(20, 26), np.arange(26, 32)
    config = TrainConfig(epochs=40, batch_size=20, lr=0.05, patience=40, max_shift=0, intensity=0.0, noise_std=0.0,
                         progress=False)
    runs = []
    for volumes in (vols, VolumeCache(vols.astype(np.float16))):
        enc = RegionalEncoder(SHAPE, _quadrants())
        enc.set_reference(volumes[train])
        runs.append(train_twin(enc, TwinData(volumes, family, positive, unrelated), train, val, config))
    exact, half = runs
    np.testing.assert_allclose(half.model.region_weights().detach().numpy(),
                               exact.model.region_weights().detach().numpy(), atol=1e-4)
    columns = ["train_loss", "val_loss", "val_twin_distance", "val_nontwin_distance"]
    np.testing.assert_allclose(half.history[columns], exact.history[columns], atol=1e-4)
    assert half.best_epoch == exact.best_epoch
    assert _held_out_auc(half.model, vols, positive, unrelated, test) == pytest.approx(
        _held_out_auc(exact.model, vols, positive, unrelated, test), abs=1e-9)


def test_cnn_training_on_the_float16_cache_stays_within_adamw_steps_of_float32():
    """A CNN twin training (small, augmented, 2 epochs): the float16 cache changes the inputs by <= 0.05 %, the
    losses by less than 2 % (0.7 % measured) and each weight by at most 2 * lr per optimiser step: AdamW moves a
    weight by about lr per step whatever the gradient's size, so a tiny input change can flip the step of a
    weight whose gradient is near 0; this is the scale at which two runs differ, not a drift."""
    vols = _brains(8)
    config = TrainConfig(epochs=2, batch_size=4, patience=5, progress=False)
    exact = _train_small(_twin_data(vols), config)
    half = _train_small(_twin_data(VolumeCache(vols.astype(np.float16))), config)
    np.testing.assert_allclose(half.history["train_loss"], exact.history["train_loss"], rtol=2e-2)
    has_pos = (_twin_data(vols).positive[:6, :6] > 0).any(axis=1)
    steps = sum(len(family_batches(np.repeat(np.arange(5), [2, 2, 2, 1, 1])[:6], has_pos, 4,
                                   np.random.default_rng([0, epoch]))) for epoch in (1, 2))
    a, b = dict(exact.model.named_parameters()), dict(half.model.named_parameters())
    worst = max(float((a[k] - b[k]).detach().abs().max()) for k in a)
    assert 0 < worst <= 2 * config.lr * steps


# ---------------------------------------------------------------------------------------------------------------
# DataLoader batch assembly
# ---------------------------------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """A twin model that records the training inputs it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.inputs.append(x.detach().clone())
        return self.linear(x.mean(dim=(2, 3, 4)))


def _expected_inputs(data: TwinData, config: TrainConfig, workers: int, train_idx: np.ndarray) -> list[torch.Tensor]:
    """The documented augmentation stream: 0 workers, the run's one generator (seed + 1000 * rank) in order;
    with workers, batch k of epoch e from a generator seeded by batch_seed(seed, rank, e, k)."""
    has_pos = (data.positive[np.ix_(train_idx, train_idx)] > 0).any(axis=1)
    shared = torch.Generator().manual_seed(config.seed)
    out = []
    for epoch in range(1, config.epochs + 1):
        batches = family_batches(data.family[train_idx], has_pos, config.batch_size,
                                 np.random.default_rng([config.seed, epoch]))
        for k, local in enumerate(batches):
            gen = shared if workers == 0 else torch.Generator().manual_seed(batch_seed(config.seed, 0, epoch, k))
            out.append(augment(torch.from_numpy(data.volumes[train_idx[local]]), gen, config.flip_lr,
                               config.max_shift, config.intensity, config.noise_std))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_follow_the_documented_augmentation_stream(workers):
    data = _twin_data(VolumeCache(_brains(8).astype(np.float16)))
    config = TrainConfig(epochs=2, batch_size=4, patience=5, progress=False, loader_workers=workers)
    model = _Recorder()
    train_twin(model, data, np.arange(8), np.arange(0), config)
    expected = _expected_inputs(data, config, workers, np.arange(8))
    assert len(model.inputs) == len(expected) > 2
    for got, want in zip(model.inputs, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_is_reproducible_and_the_same_for_any_number_of_workers():
    """Same seed, same result: twice with 0 workers; with 1 and 2 workers (per-batch generators) the same as each
    other; 0 workers draws one generator in order, so its augmentations (and result) differ from workers >= 1."""
    vols = _brains(8)
    runs = {}
    for key, workers in (("0a", 0), ("0b", 0), ("1", 1), ("2", 2)):
        config = TrainConfig(epochs=2, batch_size=4, patience=5, progress=False, loader_workers=workers)
        runs[key] = _train_small(_twin_data(vols), config)

    def same(a, b) -> bool:
        sa, sb = a.model.state_dict(), b.model.state_dict()
        return a.history["train_loss"].tolist() == b.history["train_loss"].tolist() and all(
            torch.equal(sa[k], sb[k]) for k in sa)

    assert same(runs["0a"], runs["0b"]) and same(runs["1"], runs["2"])
    assert not same(runs["0a"], runs["1"])


def test_cuda_batches_come_pinned_and_are_copied_non_blocking(monkeypatch):
    """No GPU here: on a CUDA device the loader asks for pinned memory and each tensor is copied with
    non_blocking=True (torch.Tensor.to is recorded, not run); on the CPU neither."""
    calls = []

    def record_to(self, *args, **kwargs):
        calls.append((args, kwargs))
        return self

    def assemble(idx, gen, epoch):
        return torch.full((len(idx), 1, 2, 2, 2), float(idx[0])), torch.from_numpy(idx)

    config = TrainConfig(loader_workers=0)
    cpu = BatchLoader(BatchAssembly(assemble, torch.Generator(), torch.device("cpu")), config, loop.DistContext())
    assert cpu.loader.pin_memory is False
    cuda = BatchLoader(BatchAssembly(assemble, torch.Generator(), torch.device("cuda")), config,
                             loop.DistContext())
    assert cuda.loader.pin_memory is True
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    monkeypatch.setattr(cuda.loader, "pin_memory", False)  # a CPU-only torch cannot pin; the flag was checked above
    batches = list(cuda.epoch(1, [np.array([3, 4]), np.array([5])]))
    assert [int(b[0][0, 0, 0, 0, 0]) for b in batches] == [3, 5]
    assert len(calls) == 4 and all(args == (torch.device("cuda"),) and kwargs == {"non_blocking": True}
                                   for args, kwargs in calls)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_compile_flag_reaches_the_trainer_and_the_compiled_forward_is_used(monkeypatch):
    compiled = []

    def fake_compile(module, *args, **kwargs):  # records the call; the "compiled" forward is the eager one
        compiled.append(module)
        return lambda *a, **k: module(*a, **k)

    vols = _brains(8)
    config = TrainConfig(epochs=1, batch_size=4, patience=5, progress=False)
    eager = _train_small(_twin_data(vols), config)
    assert not compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    config.compile = True
    result = _train_small(_twin_data(vols), config)
    assert len(compiled) == 1 and type(result.model).__name__ == "SiameseEncoder"
    assert result.model.state_dict().keys() == eager.model.state_dict().keys()
    assert result.history["train_loss"].tolist() == eager.history["train_loss"].tolist()


@pytest.mark.parametrize("where", ["compile", "first_call"])
def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog, where):
    def failing_compile(module, *args, **kwargs):
        if where == "compile":
            raise RuntimeError("Dynamo is not supported on this Python\nsecond line")

        def broken(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler")
        return broken

    vols = _brains(8)
    config = TrainConfig(epochs=2, batch_size=4, patience=5, progress=False)
    eager = _train_small(_twin_data(vols), config)
    monkeypatch.setattr(torch, "compile", failing_compile)
    config.compile = True
    with caplog.at_level(logging.WARNING, logger="bids_siamese.train"):
        result = _train_small(_twin_data(vols), config)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "eager" in warnings[0]
    assert result.history["train_loss"].tolist() == eager.history["train_loss"].tolist()
    for key, value in eager.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value)


def test_compiled_or_eager_is_transparent():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    wrapped = CompiledOrEager(model)
    assert loop.unwrap(wrapped) is model
    assert list(wrapped.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    assert len(list(wrapped.parameters())) == len(list(model.parameters()))
    wrapped.eval()
    assert not model.training


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def test_cli_options_reach_the_training_configuration(mini_bids, tmp_path, monkeypatch):
    out = tmp_path / "out"
    defaults = parse_args([str(mini_bids), str(out), "group", "--device", "cpu"])
    assert (defaults.loader_workers, defaults.volume_cache, defaults.compile) == (0, "float16", False)
    s = parse_args([str(mini_bids), str(out), "group", "--device", "cpu", "--loader-workers", "2", "--compile",
                    "--volume-cache", "float32"])
    assert (s.loader_workers, s.volume_cache, s.compile) == (2, "float32", True)
    assert s.to_dict()["loader_workers"] == 2 and s.to_dict()["compile"] is True
    for config in (train_config(s, **siamese_options(s)), train_config(s, seed=1, flip_lr=False, max_shift=1)):
        assert (config.loader_workers, config.compile) == (2, True)
    with pytest.raises(UsageError, match="--loader-workers"):
        parse_args([str(mini_bids), str(out), "group", "--device", "cpu", "--loader-workers", "-1"])
    # on CUDA (mocked: no GPU here) the default leaves one of --nprocs to the trainer, at most 4 workers
    monkeypatch.setattr("bids_siamese.cli.parser.resolve_device", lambda requested: "cuda")
    monkeypatch.setattr("bids_siamese.cli.parser.available_cpus", lambda: 16)  # --nprocs is capped at the CPUs
    assert parse_args([str(mini_bids), str(out), "group", "--nprocs", "3"]).loader_workers == 2
    assert parse_args([str(mini_bids), str(out), "group", "--nprocs", "16"]).loader_workers == 4
    assert parse_args([str(mini_bids), str(out), "group", "--nprocs", "1"]).loader_workers == 0
