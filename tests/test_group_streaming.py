"""Issue 27: the group steps other than twin stream their volumes with today's results.

* ``stream_volumes`` reads each file once, in order, at the training stack's precision, in this process or in
  loader workers, and a bad file is one line (not a worker traceback);
* the longitudinal regional model sets itself up a chunk of scans at a time (:func:`nonzero_majority`, the
  embeddings), bit for bit as from the whole stack;
* ``augment`` works in place on its shifted copy, with the values of the formula it replaced.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_siamese.errors import BadDataError
from bids_siamese.resources import model_grid
from bids_siamese.train import models as train_models
from bids_siamese.train.data import augment, load_volume, load_volume_cache, stored_precision, stream_volumes
from bids_siamese.train.longitudinal import collect_longitudinal
from bids_siamese.train.loop import PairData
from bids_siamese.train.models import new_longitudinal_model, nonzero_majority

from test_train import make_group_inputs, settings_for

RES = 8.0


def _volumes(tmp_path, n: int = 5):
    grid = model_grid(RES)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=grid.shape).astype(np.float32), grid.affine), str(path))
        paths.append(path)
    return grid, paths


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_volumes_reads_each_file_once_in_order_at_the_stack_precision(tmp_path, workers):
    grid, paths = _volumes(tmp_path)
    cache = load_volume_cache(paths, grid, "float16")
    seen = []
    for idx, batch in stream_volumes(paths, grid, batch_size=2, workers=workers, dtype="float16"):
        assert batch.dtype == torch.float32 and tuple(batch.shape[1:]) == grid.shape
        np.testing.assert_array_equal(batch.numpy(), cache[idx, 0])  # what the float16 stack gave
        seen += idx.tolist()
    assert seen == list(range(len(paths)))
    exact = np.concatenate([b.numpy() for _, b in stream_volumes(paths, grid, 3, workers, "float32")])
    np.testing.assert_array_equal(exact, np.stack([load_volume(p, grid) for p in paths]))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_in_a_stream_is_one_line(tmp_path, workers):
    grid, paths = _volumes(tmp_path, 3)
    paths[1].write_bytes(b"not a nifti")
    with pytest.raises(BadDataError) as err:
        list(stream_volumes(paths, grid, batch_size=2, workers=workers))
    assert str(paths[1]) in str(err.value) and "\n" not in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(BadDataError, match="float16 range"):
        stored_precision(np.array([1e6], np.float32), "float16", "x.nii.gz")


def test_brain_majority_by_chunks_is_the_mean_of_the_stack():
    rng = np.random.default_rng(0)
    volumes = np.where(rng.random((9, 1, 6, 5, 4)) < 0.5, 0.0, 1.0).astype(np.float32)
    idx = np.array([0, 2, 3, 5, 6, 8])
    expected = (volumes[idx, 0] != 0).mean(axis=0) >= 0.5
    for chunk in (1, 4, 16):
        np.testing.assert_array_equal(nonzero_majority(volumes, idx, chunk), expected)


@pytest.mark.slow
def test_longitudinal_regional_model_set_up_by_chunks_is_the_same(tmp_path, monkeypatch):
    bids, out, subjects = make_group_inputs(tmp_path)
    settings = settings_for(bids, out, "longitudinal", backbone="regional")
    inputs = collect_longitudinal(settings, subjects, require_labels=True)
    data = PairData(inputs.volumes, inputs.pair_index, inputs.pairs["label"].to_numpy(float))
    grid, train_idx = model_grid(settings.resolution), np.arange(8)
    whole = new_longitudinal_model(settings, grid, data, train_idx)
    monkeypatch.setattr(train_models, "SCAN_CHUNK", 3)
    chunked = new_longitudinal_model(settings, grid, data, train_idx)
    a, b = whole.state_dict(), chunked.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # and both are what the whole stack in memory gives (the set-up before issue 27)
    scans = np.unique(data.pairs[train_idx])
    emb = whole.embed(torch.from_numpy(np.asarray(data.volumes[scans])))
    row = {int(s): k for k, s in enumerate(scans)}
    pairs = data.pairs[train_idx]
    diff = emb[[row[int(q)] for q in pairs[:, 1]]] - emb[[row[int(p)] for p in pairs[:, 0]]]
    assert torch.equal(chunked.feature_mean, diff.mean(dim=0))


def _shift(vol, shifts):
    """An integer translation of ``(C, X, Y, Z)``, zero filled."""
    out = torch.zeros_like(vol)
    src, dst = [slice(None)], [slice(None)]
    for s, n in zip(shifts, vol.shape[1:]):
        src.append(slice(0, n - s) if s >= 0 else slice(-s, n))
        dst.append(slice(s, n) if s >= 0 else slice(0, n + s))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def _augment_before(x, generator, flip_lr=False, max_shift=2, intensity=0.1, noise_std=0.05):
    """``augment`` as it was before issue 27 (out-of-place formula)."""
    b = x.shape[0]
    out = torch.empty_like(x)
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 3), generator=generator)
    scale = 1.0 + (torch.rand(b, generator=generator) * 2 - 1) * intensity
    offset = (torch.rand(b, generator=generator) * 2 - 1) * intensity
    flips = (torch.rand(b, generator=generator) < 0.5) if flip_lr else torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        vol = _shift(x[i], [int(s) for s in shifts[i]])
        if flips[i]:
            vol = torch.flip(vol, dims=[1])
        brain = vol != 0
        noise = torch.randn(vol.shape, generator=generator) * noise_std
        out[i] = torch.where(brain, vol * float(scale[i]) + float(offset[i]) + noise, torch.zeros_like(vol))
    return out


@pytest.mark.parametrize("flip_lr", [False, True])
def test_augment_in_place_gives_the_values_of_the_formula(flip_lr):
    x = torch.randn(4, 2, 10, 8, 6)
    x[x < -0.3] = 0.0
    kept = x.clone()
    new = augment(x, torch.Generator().manual_seed(3), flip_lr=flip_lr)
    old = _augment_before(x, torch.Generator().manual_seed(3), flip_lr=flip_lr)
    assert torch.equal(new, old) and torch.equal(x, kept)  # the input is left alone
