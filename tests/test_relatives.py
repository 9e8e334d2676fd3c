"""Closest relatives by blocked exact nearest-neighbour search (bids_siamese.train.relatives)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from bids_siamese.models.losses import pairwise_distance
from bids_siamese.train.relatives import RELATIVE_COLUMNS, nearest_relatives, relatives_table


def brute_force(emb: np.ndarray, k: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
    full = pairwise_distance(torch.from_numpy(emb), distance).numpy()
    np.fill_diagonal(full, np.inf)
    index = np.argsort(full, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(full, index, axis=1)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("block", [1, 7, 64, 300, 1000])
def test_blocked_search_equals_brute_force(distance, block):
    rng = np.random.default_rng(block)
    emb = rng.normal(size=(300, 12))  # float64: distinct distances, exact comparison
    index, dist = nearest_relatives(emb, 6, distance, block=block)
    want_index, want_dist = brute_force(emb, 6, distance)
    assert index.shape == dist.shape == (300, 6)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-12)
    assert not (index == np.arange(300)[:, None]).any()  # never its own relative
    assert (np.diff(dist, axis=1) >= 0).all()  # nearest first


def test_float32_embeddings_and_planted_twins_are_found_first():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 32)).astype(np.float32)
    twin = base + 0.01 * rng.normal(size=base.shape).astype(np.float32)
    emb = np.concatenate([base, twin])
    index, dist = nearest_relatives(emb, 3, "cosine", block=128)
    assert dist.dtype == np.float32
    assert (index[:500, 0] == np.arange(500, 1000)).all() and (index[500:, 0] == np.arange(500)).all()
    want_index, want_dist = brute_force(emb.astype(np.float64), 3, "cosine")
    np.testing.assert_allclose(dist, want_dist, atol=1e-5)


def test_k_is_clipped_to_the_other_scans_and_tiny_inputs_work():
    emb = np.eye(3)
    index, dist = nearest_relatives(emb, 10)
    assert index.shape == (3, 2)
    assert sorted(index[0].tolist()) == [1, 2] and np.allclose(dist, 1.0)
    index, dist = nearest_relatives(np.ones((1, 4)), 5)
    assert index.shape == (1, 0)
    with pytest.raises(ValueError, match="unknown distance"):
        nearest_relatives(emb, 1, "manhattan")


def _peak_bytes(n: int, d: int = 16, block: int = 128) -> int:
    emb = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    tracemalloc.start()
    tracemalloc.reset_peak()
    nearest_relatives(emb, 5, "cosine", block=block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_memory_grows_linearly_not_quadratically_with_the_number_of_scans():
    small, large = _peak_bytes(1500), _peak_bytes(6000)
    # an N x N float32 table would be 144 MB at N = 6000; blocks keep the search to a few MB
    assert large < 6000 * 6000 * 4 / 20
    # 4x the scans: linear memory grows ~4x, quadratic 16x
    assert large < 6 * small


def test_relatives_table_columns_probability_and_relations():
    ids = ["sub-1", "sub-2", "sub-3"]
    index = np.array([[1, 2], [0, 2], [1, 0]])
    dist = np.array([[0.1, 0.5], [0.1, 0.4], [0.4, 0.5]])
    table = relatives_table(ids, index, dist, 0.2, 0.05, lambda a, b: "MZ" if {a, b} == {"sub-1", "sub-2"}
                            else "unrelated")
    assert list(table.columns) == RELATIVE_COLUMNS
    assert table["participant_id"].tolist() == ["sub-1", "sub-1", "sub-2", "sub-2", "sub-3", "sub-3"]
    assert table["rank"].tolist() == [1, 2, 1, 2, 1, 2]
    assert table["relative_id"].tolist() == ["sub-2", "sub-3", "sub-1", "sub-3", "sub-2", "sub-1"]
    assert table["predicted_twin"].tolist() == [True, False, True, False, False, False]
    assert np.allclose(table["twin_probability"], 1 / (1 + np.exp(-(0.2 - dist.ravel()) / 0.05)), atol=1e-4)
    assert table["relation"].tolist()[:3] == ["MZ", "unrelated", "MZ"]
    unknown = relatives_table(ids, index, dist, None, None)
    assert unknown["twin_probability"].isna().all() and set(unknown["relation"]) == {"n/a"}


def test_top_k_option_is_checked_and_saved(mini_bids, tmp_path):
    from bids_siamese.cli.parser import parse_args
    from bids_siamese.errors import UsageError

    args = [str(mini_bids), str(tmp_path / "out"), "group", "--task", "twin", "--device", "cpu"]
    settings = parse_args([*args, "--top-k", "3"])
    assert settings.top_k == 3 and settings.to_dict()["top_k"] == 3
    assert parse_args(args).top_k == 5
    with pytest.raises(UsageError, match="--top-k must be at least 1"):
        parse_args([*args, "--top-k", "0"])
