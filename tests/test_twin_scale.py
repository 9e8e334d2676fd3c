"""The twin task at cohort scale (issue 27): the sampled pair table, the sparse twin relations, the chunked
population reference and the baseline on memory-mapped stacks give what the all-pairs / all-in-memory versions
gave, with memory and pairs growing as N."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from bids_siamese.models.regional import RegionalEncoder, brain_majority, running_moments
from bids_siamese.train import data as data_module
from bids_siamese.train.data import VolumeCache, stack_array
from bids_siamese.train.evaluate import voxel_correlation
from bids_siamese.train.loop import TwinData, train_twin
from bids_siamese.train.pairs import Relations
from bids_siamese.train.trainer import TrainConfig
from bids_siamese.train.twins import (
    sample_unrelated,
    twin_pair_table,
    twin_relations,
    unrelated_pair_counts,
    unrelated_pairs_available,
)


def _cohort(n_families: int, seed: int = 0) -> tuple[list[str], Relations, dict[str, str]]:
    """Families of 1-3 subjects (MZ pairs, DZ pairs, sibling trios, singletons), split train/validation/test."""
    rng = np.random.default_rng(seed)
    family, rows, pids = {}, [], []
    for f in range(n_families):
        kind = rng.choice(["single", "single", "MZ", "DZ", "sibling"])
        size = 1 if kind == "single" else 3 if kind == "sibling" else 2
        members = [f"sub-{f:04d}{k}" for k in range(size)]
        for m in members:
            family[m] = f"fam{f}"
        pids += members
        if kind in ("MZ", "DZ"):
            rows.append((members[0], members[1], kind))
        elif kind == "sibling":
            rows += [(a, b, "sibling") for a, b in combinations(members, 2)]
    relations = Relations(family, pd.DataFrame(rows, columns=["subject_a", "subject_b", "relation"]))
    splits = ["train", "validation", "test"]
    split_of = {p: splits[int(family[p][3:]) % 3] for p in pids}
    return pids, relations, split_of


def _all_pairs(pids, relations, split_of) -> set[tuple[str, str, str]]:
    """Brute force: every MZ/DZ pair and every unrelated pair within a split."""
    out = {(r.subject_a, r.subject_b, r.relation) for r in relations.pairs.itertuples() if r.relation in ("MZ", "DZ")}
    for a, b in combinations(sorted(pids), 2):
        if relations.family[a] != relations.family[b] and split_of[a] == split_of[b]:
            out.add((a, b, "unrelated"))
    return out


def test_pair_table_keeps_all_pairs_under_the_cap():
    """A small cohort (every split's unrelated pairs under per_subject x subjects): exactly the all-pairs table."""
    pids, relations, split_of = _cohort(30)
    table = twin_pair_table(pids, relations, split_of, seed=3)
    assert set(zip(table.subject_a, table.subject_b, table.relation)) == _all_pairs(pids, relations, split_of)
    assert len(table) == len(_all_pairs(pids, relations, split_of))
    assert list(table[["subject_a", "subject_b"]].itertuples(index=False, name=None)) == sorted(
        zip(table.subject_a, table.subject_b))
    counts = unrelated_pair_counts(pids, relations, split_of)
    assert sum(counts.values()) == int((table.relation == "unrelated").sum())


def test_pair_table_samples_a_bounded_seeded_set_of_unrelated_pairs():
    pids, relations, split_of = _cohort(600)
    per_subject = 5
    table = twin_pair_table(pids, relations, split_of, seed=1, per_subject=per_subject)
    # every positive pair is kept, with its split
    positives = {(r.subject_a, r.subject_b, r.relation) for r in relations.pairs.itertuples() if r.relation != "sibling"}
    assert positives == set(zip(*(table.loc[table.relation != "unrelated", c] for c in
                                  ("subject_a", "subject_b", "relation"))))
    unrelated = table[table.relation == "unrelated"]
    # never a related pair (twins, siblings) labelled unrelated; both subjects of the row's split; no duplicates
    assert all(relations.family[a] != relations.family[b] for a, b in zip(unrelated.subject_a, unrelated.subject_b))
    assert all(split_of[a] == split_of[b] == s for a, b, s in zip(unrelated.subject_a, unrelated.subject_b,
                                                                   unrelated.split))
    assert not table.duplicated(["subject_a", "subject_b"]).any()
    # bounded: at most per_subject pairs per subject of the split, far fewer than all; every subject drew its own
    available = unrelated_pair_counts(pids, relations, split_of)
    for split, n_split in pd.Series(split_of).value_counts().items():
        scored = int((unrelated.split == split).sum())
        assert scored <= per_subject * n_split < available[split]
    degree = pd.concat([unrelated.subject_a, unrelated.subject_b]).value_counts()
    assert degree.reindex(pids).min() >= per_subject
    # seeded: the same seed gives the same table, another seed another sample
    pd.testing.assert_frame_equal(table, twin_pair_table(pids, relations, split_of, seed=1, per_subject=per_subject))
    other = twin_pair_table(pids, relations, split_of, seed=2, per_subject=per_subject)
    assert set(zip(other.subject_a, other.subject_b)) != set(zip(table.subject_a, table.subject_b))


@pytest.mark.slow
def test_sample_unrelated_counts_without_listing_all_pairs():
    families = ["a", "a", "b", "c", "c", "c"]
    assert unrelated_pairs_available(families) == 15 - 1 - 3
    everything = sample_unrelated(families, 20, np.random.default_rng(0))
    assert everything == [(a, b) for a, b in combinations(range(6), 2) if families[a] != families[b]]
    # 12,000 subjects in one split (ABCD size): 20 draws each; a list of all pairs would hold 72 million
    big = [str(k // 2) for k in range(12_000)]
    sample = sample_unrelated(big, 20, np.random.default_rng(0))
    assert len(sample) <= 20 * len(big) and all(big[a] != big[b] and a < b for a, b in sample[:1000])


def test_twin_relations_sparse_blocks_match_the_dense_matrices():
    pids, relations, _ = _cohort(40)
    family, positive = twin_relations(pids, relations, dz_positives=True, dz_weight=0.5)
    dense = positive.toarray()
    index = {p: k for k, p in enumerate(pids)}
    for r in relations.pairs.itertuples():
        want = {"MZ": 1.0, "DZ": 0.5, "sibling": 0.0}[r.relation]
        assert dense[index[r.subject_a], index[r.subject_b]] == dense[index[r.subject_b], index[r.subject_a]] == want
    unrelated = family[:, None] != family[None, :]
    sparse_data = TwinData(np.zeros((len(pids), 1, 2, 2, 2)), family, positive)
    dense_data = TwinData(np.zeros((len(pids), 1, 2, 2, 2)), family, dense, unrelated)
    idx = np.random.default_rng(0).permutation(len(pids))[:17]
    np.testing.assert_array_equal(sparse_data.positive_block(idx), dense_data.positive_block(idx))
    np.testing.assert_array_equal(sparse_data.related_block(idx), dense_data.related_block(idx))
    np.testing.assert_array_equal(sparse_data.has_positive(idx), dense_data.has_positive(idx))


def _old_reference(volumes: np.ndarray, masks: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference as computed before issue 27: one float32 tensor of all training scans."""
    x = torch.as_tensor(np.asarray(volumes, dtype=np.float32))
    mean = x.mean(dim=0, keepdim=True)
    sd = x.std(dim=0, keepdim=True, unbiased=False)
    inside = (torch.as_tensor(np.asarray(masks)).reshape(x.shape[0], -1).float().mean(0) >= 0.5
              if masks is not None else (x != 0).reshape(x.shape[0], -1).float().mean(0) >= 0.5)
    values = sd.flatten()[inside] if bool(inside.any()) else sd.flatten()
    floor = torch.quantile(values.double(), 0.1).float().clamp_min(1e-6)
    return mean, torch.maximum(sd, floor)


@pytest.mark.parametrize("with_masks", [True, False])
def test_chunked_reference_equals_the_all_in_memory_one(with_masks, monkeypatch):
    """The running float64 reference over chunks of a memory-mapped float16 stack equals the old float32 formula
    on the same values within float32 rounding (rtol 1e-5, atol 1e-6; measured differences about 1e-7)."""
    rng = np.random.default_rng(0)
    shape = (8, 8, 8)
    n = 150  # three chunks of 64
    monkeypatch.setattr(data_module, "SPILL_BYTES", 0)  # force the memory map, as for a cohort
    stack = stack_array((n, 1, *shape), np.float16)
    brain = np.zeros(shape, bool)
    brain[1:7, 1:7, 1:7] = True
    masks = stack_array((n, *shape), bool)
    for k in range(n):
        masks[k] = brain ^ (rng.random(shape) < 0.05)
        stack[k, 0] = np.where(masks[k], 3.0 + rng.normal(size=shape) * rng.uniform(0.5, 2.0), 0.0)
    assert isinstance(stack, np.memmap)
    cache = VolumeCache(stack)
    rows = np.arange(5, n)
    calls = []
    enc = RegionalEncoder(shape, np.ones((4, 4, 4), int))
    enc.set_reference(cache, masks if with_masks else None, rows, after_chunk=lambda: calls.append(1))
    old_mean, old_sd = _old_reference(cache[rows], masks[rows] if with_masks else None)
    torch.testing.assert_close(enc.reference_mean, old_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.reference_sd, old_sd, rtol=1e-5, atol=1e-6)
    assert len(calls) == 3
    np.testing.assert_array_equal(brain_majority(masks, rows, chunk=64), masks[rows].mean(axis=0) >= 0.5)


def test_running_moments_merge_chunks_exactly():
    x = np.random.default_rng(1).normal(5.0, 0.01, size=(130, 1, 3, 3, 3))
    for chunk in (1, 7, 64, 200):
        n, mean, m2, _ = running_moments(x, None, np.arange(130), chunk)
        np.testing.assert_allclose(mean, x.reshape(130, -1).mean(0), rtol=1e-12)
        np.testing.assert_allclose(m2 / n, x.reshape(130, -1).var(0), rtol=1e-9)


def test_voxel_correlation_on_a_memory_mapped_stack(monkeypatch):
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(6, 1, 5, 5, 5)).astype(np.float16)
    masks = rng.random((6, 5, 5, 5)) < 0.8
    monkeypatch.setattr(data_module, "SPILL_BYTES", 0)
    mapped = stack_array(vols.shape, np.float16)
    mapped[:] = vols
    pairs = [(a, b) for a, b in combinations(range(6), 2)] * 60  # past the page release interval
    np.testing.assert_array_equal(voxel_correlation(VolumeCache(mapped), masks, pairs),
                                  voxel_correlation(VolumeCache(vols), masks, pairs))


def test_training_with_sparse_relations_equals_dense():
    """train_twin on the sparse relations gives the same history as on the N x N matrices."""
    rng = np.random.default_rng(0)
    shape = (8, 8, 8)
    family = np.repeat(np.arange(12), 2)
    base = rng.normal(size=(12, *shape))
    vols = (base[family] + 0.5 * rng.normal(size=(24, *shape))).astype(np.float32)[:, None]
    positive = np.zeros((24, 24), np.float32)
    for f in range(12):
        positive[2 * f, 2 * f + 1] = positive[2 * f + 1, 2 * f] = 1.0
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=3, max_shift=0, progress=False)
    histories = []
    for data in (TwinData(vols, family, positive, family[:, None] != family[None, :]),
                 TwinData(vols, family, sparse.csr_matrix(positive))):
        enc = RegionalEncoder(shape, np.ones((4, 4, 4), int) + (np.indices((4, 4, 4))[0] >= 2))
        enc.set_reference(vols[:16])
        result = train_twin(enc, data, np.arange(16), np.arange(16, 24), config)
        histories.append(result.history.drop(columns=["seconds", "volumes_per_second"]))
    pd.testing.assert_frame_equal(*histories)
