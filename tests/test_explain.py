"""Explanations: LRP through captum (conservation, planted signal, all backbones), atlas ranking, statistics."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from bids_siamese.config import Settings
from bids_siamese.explain.canonize import canonize
from bids_siamese.explain.lrp import (
    distance_shares,
    embedding_network,
    relevance_embedding,
    relevance_pair_distance,
)
from bids_siamese.explain.rules import attach_rules


def _zero_bias_batchnorm(net: nn.Module) -> nn.Module:
    """BatchNorm with running mean 0 and shift 0: merged into the conv it adds no bias."""
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.zero_()
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.zero_()
    return net.eval()


class ResidualNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block (in-place add, a ReLU module used three times), max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.c1, self.b1 = nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.c2, self.b2 = nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.b0(self.c0(x)))
        y = self.act(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        y += x
        y = self.pool(self.act(y))
        return self.fc(y.flatten(2).mean(dim=2))


class DenseNet(nn.Module):
    """Two pre-activation dense layers (BN-ReLU-conv, concatenation), average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv3d(1, 3, 3, padding=1, bias=False)
        self.n1, self.c1 = nn.BatchNorm3d(3), nn.Conv3d(3, 2, 3, padding=1, bias=False)
        self.n2, self.c2 = nn.BatchNorm3d(5), nn.Conv3d(5, 2, 3, padding=1, bias=False)
        self.pool = nn.AvgPool3d(2)
        self.fc = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c0(x))
        x = torch.cat([x, self.c1(torch.relu(self.n1(x)))], 1)
        x = torch.cat([x, self.c2(torch.relu(self.n2(x)))], dim=1)
        x = self.pool(torch.relu(x))
        return self.fc(x.flatten(2).mean(dim=2))


class AvgMaxNet(nn.Module):
    """Conv-BN-ReLU, then global average and maximum pooling concatenated (the ``avgmax`` embedding head)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.fc = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.relu(self.b0(self.c0(x))).flatten(2)
        return self.fc(torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1))


def _volume(seed: int = 0, shape: tuple[int, int, int] = (12, 12, 12)) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("net_class", [ResidualNet, DenseNet, AvgMaxNet])
@pytest.mark.parametrize("rules", ["epsilon", "epsilon_plus"])
def test_lrp_conserves_relevance_on_bias_free_networks(net_class, rules):
    torch.manual_seed(0)
    net = _zero_bias_batchnorm(net_class())
    vol = _volume()
    with torch.no_grad():
        embedding = net(torch.as_tensor(vol)[None, None])
    for target, value in (("embedding", float(embedding.sum())), ("embedding_abs", float(embedding.abs().sum()))):
        relevance = relevance_embedding(net, vol, target=target, normalised=False, rules=rules)
        assert relevance.shape == vol.shape
        if rules == "epsilon":  # LRP-0: exact
            assert relevance.sum() == pytest.approx(value, rel=1e-4, abs=1e-6)
        elif target == "embedding_abs":  # the relative stabilisers absorb some relevance, never create it
            assert 0.6 * value < relevance.sum() <= value * 1.0001


def test_lrp_pair_distance_conserves_the_distance():
    torch.manual_seed(0)
    net = _zero_bias_batchnorm(ResidualNet())
    a, b = _volume(1), _volume(2)
    ra, rb, d = relevance_pair_distance(net, a, b, distance="cosine", rules="epsilon")
    with torch.no_grad():
        ea, eb = net(torch.as_tensor(a)[None, None]), net(torch.as_tensor(b)[None, None])
    assert d == pytest.approx(float(1 - torch.cosine_similarity(ea, eb)), rel=1e-5)
    assert ra.sum() + rb.sum() == pytest.approx(d, rel=1e-3)
    ca, cb = distance_shares(ea[0], eb[0], "euclidean")
    assert float(ca.sum() + cb.sum()) == pytest.approx(float((ea - eb).norm()), rel=1e-5)


def test_canonised_model_computes_the_same_function():
    torch.manual_seed(0)
    net = _zero_bias_batchnorm(DenseNet())
    for m in net.modules():  # non-zero statistics this time: merging must not change the output
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.as_tensor(_volume(3))[None, None]
    canon = canonize(net)
    with torch.no_grad():
        assert torch.allclose(canon.module(x), net(x), atol=1e-5)


def test_lrp_refuses_a_layer_without_rule():
    net = nn.Sequential(nn.Conv3d(1, 1, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(TypeError, match="no rule"):
        attach_rules(canonize(net).module)


class PositionNet(nn.Module):
    """Position-aware regressor: conv-BN-ReLU, residual conv, pooling, flatten, linear."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.c1 = nn.Conv3d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(4 * (size // 2) ** 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.c1(x) + x)
        return self.fc(self.pool(x).flatten(1))


def _planted(n: int, size: int, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Volumes with noise, a signal cube A (its brightness is the label) and a distractor cube B."""
    x = gen.normal(0.0, 0.3, size=(n, 1, size, size, size)).astype(np.float32)
    a, b = gen.uniform(0, 2, n), gen.uniform(0, 2, n)
    x[:, 0, 2:6, 2:6, 2:6] += a[:, None, None, None]
    x[:, 0, 10:14, 10:14, 10:14] += b[:, None, None, None]
    return x, a.astype(np.float32)


@pytest.mark.slow
def test_relevance_concentrates_on_the_planted_signal():
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    size = 16
    net = PositionNet(size)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(80):
        x, y = _planted(8, size, gen)
        net.train()
        loss = ((net(torch.as_tensor(x))[:, 0] - torch.as_tensor(y)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, _ = _planted(1, size, np.random.default_rng(7))
    x[0, 0, 2:6, 2:6, 2:6] = 1.5 + x[0, 0, 2:6, 2:6, 2:6] - x[0, 0, 2:6, 2:6, 2:6].mean()
    x[0, 0, 10:14, 10:14, 10:14] = 1.5 + x[0, 0, 10:14, 10:14, 10:14] - x[0, 0, 10:14, 10:14, 10:14].mean()
    relevance = relevance_embedding(net, x[0, 0], normalised=False)
    in_signal = relevance[2:6, 2:6, 2:6].sum()
    in_distractor = relevance[10:14, 10:14, 10:14].sum()
    # the signal cube is 1/64 of the volume but carries most of the (signed) relevance; the distractor,
    # as bright, carries little; the smoothed map peaks inside the signal cube
    assert in_signal > 0.6 * relevance.sum()
    assert abs(in_distractor) < 0.2 * in_signal
    smoothed = ndimage.gaussian_filter(relevance, 1.0)
    peak = np.unravel_index(np.argmax(smoothed), smoothed.shape)
    assert all(1 <= p <= 6 for p in peak), peak


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["small", "unet", "resnet18", "densenet121"])
def test_lrp_runs_on_every_backbone(backbone):
    from bids_siamese.models.heads import build_model

    torch.manual_seed(0)
    model = build_model("twin", backbone, embedding_dim=8).eval()
    net, normalised = embedding_network(model)
    assert normalised
    canon = canonize(net)
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32))[None, None]
    with torch.no_grad():
        reference = nn.functional.normalize(net(x), dim=1)
        assert torch.allclose(reference, model(x), atol=1e-5)
        out = canon.calibrate(x) if canon.needs_calibration else canon.module(x)
        assert torch.allclose(out, net(x), atol=1e-4)
    relevance = relevance_embedding(canon, x, normalised=True)
    assert relevance.shape == (32, 32, 32)
    assert np.isfinite(relevance).all() and np.abs(relevance).sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Conservation on the four real backbones
# ----------------------------------------------------------------------------------------------------------
#: ``epsilon`` rules on a bias-free backbone: |relevance sum - target| <= this * sum_k |share_k|. Measured at 32^3,
#: embedding_dim 8, seeds 0-2: at most 3.4e-6 (small), 5e-7 (unet), 1e-6 (resnet18, densenet121); float32 sums.
EPSILON_TOLERANCE = 1e-4
#: ``epsilon_plus`` rules, embedding_abs target: the stabilisers absorb relevance, never create it; relevance sum /
#: target measured at 0.53-0.54 (small), 0.41-0.43 (resnet18), 0.29-0.32 (densenet121), seeds 0-2.
EPSILON_PLUS_RANGE = (0.2, 1.0 + 1e-4)
CONSERVATION_SHAPE = (32, 32, 32)  # the smallest grid every backbone accepts (resnet18/densenet121: grid / 32)


def _bias_free_backbone(backbone: str, seed: int = 0):
    """The twin model's embedding network with every bias and normalisation shift set to 0 and random positive
    normalisation scales: positively homogeneous, so relevance can be conserved exactly (a bias absorbs the share
    of relevance it contributes)."""
    from bids_siamese.models.heads import build_model

    torch.manual_seed(seed)
    net, normalised = embedding_network(build_model("twin", backbone, embedding_dim=8).eval())
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.zero_()
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.zero_()
        elif isinstance(getattr(m, "bias", None), torch.Tensor):
            m.bias.data.zero_()
    return net, normalised


def _scans(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(n, 1, *CONSERVATION_SHAPE)).astype(np.float32))


_SLOW_BACKBONES = {"resnet18", "densenet121"}
_BACKBONE_PARAMS = [pytest.param(b, marks=pytest.mark.slow) if b in _SLOW_BACKBONES else b
                    for b in ("small", "unet", "resnet18", "densenet121")]


@pytest.mark.parametrize("backbone", _BACKBONE_PARAMS)
def test_lrp_epsilon_conserves_relevance_on_every_backbone(backbone):
    from bids_siamese.explain.lrp import embedding_shares, relevance_maps

    net, normalised = _bias_free_backbone(backbone)
    canon = canonize(net)
    x = _scans()
    e = canon.embed(x)
    for target in ("embedding", "embedding_abs"):
        shares = embedding_shares(e, target, normalised)
        sums = relevance_maps(canon, x, shares, e, rules="epsilon").reshape(2, -1).sum(1)
        expected = shares.sum(1).numpy()
        assert np.all(np.abs(sums - expected) <= EPSILON_TOLERANCE * shares.abs().sum(1).numpy()), (target, sums,
                                                                                                  expected)
    ra, rb, d = relevance_pair_distance(canon, x[0, 0], x[1, 0], distance="cosine", rules="epsilon")
    assert d > 0 and abs(ra.sum() + rb.sum() - d) <= EPSILON_TOLERANCE * d


@pytest.mark.parametrize("backbone", [
    *(p for p in _BACKBONE_PARAMS if p != "unet"),
    pytest.param("unet", marks=pytest.mark.xfail(strict=True, reason=(
        "epsilon_plus is not conservative on MONAI's residual U-Net: z+ meets inputs that PReLU leaves negative "
        "(measured relevance sum / target from -2.7 to 2.5 on bias-free random weights)"))),
])
def test_lrp_epsilon_plus_absorbs_but_never_creates_relevance(backbone):
    from bids_siamese.explain.lrp import embedding_shares, relevance_maps

    net, normalised = _bias_free_backbone(backbone)
    canon = canonize(net)
    x = _scans()
    e = canon.embed(x)
    shares = embedding_shares(e, "embedding_abs", normalised)
    ratios = relevance_maps(canon, x, shares, e).reshape(2, -1).sum(1) / shares.sum(1).numpy()
    low, high = EPSILON_PLUS_RANGE
    assert np.all((ratios >= low) & (ratios <= high)), ratios


def test_a_batch_gets_the_maps_of_its_scans_one_at_a_time():
    from bids_siamese.explain.lrp import embedding_shares, relevance_maps

    torch.manual_seed(0)
    net = _zero_bias_batchnorm(ResidualNet())
    canon = canonize(net)
    x = torch.as_tensor(np.stack([_volume(s) for s in range(3)]))[:, None]
    e = canon.embed(x)
    shares = embedding_shares(e, "embedding_abs", normalised=True)
    together = relevance_maps(canon, x, shares, e)  # epsilon_plus: per-scan relative stabilisers
    alone = np.concatenate([relevance_maps(canon, x[i:i + 1], shares[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-6 * float(np.abs(alone).max()))


# ----------------------------------------------------------------------------------------------------------
# Device and resources of the explanation step
# ----------------------------------------------------------------------------------------------------------
def test_explanations_use_the_requested_device(monkeypatch, caplog):
    from bids_siamese.explain import run as explain_run

    assert explain_run.explain_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="bids_siamese.group.explain"):
        assert explain_run.explain_device("cuda:1") == torch.device("cpu")
    assert "no usable CUDA device" in caplog.text
    assert explain_run.explain_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert explain_run.explain_device("cuda") == torch.device("cuda")
    assert explain_run.explain_device("cuda:1") == torch.device("cuda", 1)
    assert explain_run.explain_device("auto") == torch.device("cuda")


def test_lrp_batch_and_scan_threads_follow_the_declared_memory(monkeypatch):
    from bids_siamese.explain import run as explain_run
    from bids_siamese.explain.lrp import lrp_memory_gb

    canon = canonize(_zero_bias_batchnorm(ResidualNet()))
    shape = (24, 24, 24)
    per_scan = lrp_memory_gb(canon, shape)
    assert per_scan > 0
    cpu = torch.device("cpu")
    assert explain_run.lrp_batch(canon, shape, cpu, mem_gb=1000.0) == explain_run.MAX_LRP_BATCH
    assert explain_run.lrp_batch(canon, shape, cpu, mem_gb=2 * 3.5 * per_scan) == 3  # half of the memory
    assert explain_run.lrp_batch(canon, shape, cpu, mem_gb=1e-9) == 1
    # on a GPU the free device memory counts, not --mem-gb
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2 * 2.5 * per_scan * 1024 ** 3), 0))
    assert explain_run.lrp_batch(canon, shape, torch.device("cuda"), mem_gb=1000.0) == 2
    settings = Settings(output_dir=Path("/o"), bids_dir=Path("/b"), analysis_level="group", work_dir=Path("/w"),
                        nprocs=4, mem_gb=64.0)
    assert explain_run.scan_workers(settings) == 4
    settings.mem_gb = 1.0
    assert explain_run.scan_workers(settings) == int(1.0 // explain_run.SCAN_MEM_GB)
    settings.mem_gb = 0.1
    assert explain_run.scan_workers(settings) == 1


# ----------------------------------------------------------------------------------------------------------
# Regions and statistics
# ----------------------------------------------------------------------------------------------------------
def _thalamus_map(resolution: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    from bids_siamese.resources import model_grid

    grid = model_grid(resolution)
    ijk = np.indices(grid.shape).reshape(3, -1)
    xyz = (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]).T.reshape(*grid.shape, 3)
    blob = np.exp(-((np.abs(xyz[..., 0]) - 11) ** 2 + (xyz[..., 1] + 18) ** 2 + (xyz[..., 2] - 7) ** 2) / (2 * 7 ** 2))
    return blob.astype(np.float32), grid.affine


@pytest.mark.parametrize("atlas", ["harvard_oxford", "aal", "neuromorphometrics"])
def test_thalamus_map_ranks_thalamus_first(atlas):
    from bids_siamese.atlas import labels_on_grid, load_atlas
    from bids_siamese.explain.regions import rank_regions
    from bids_siamese.resources import model_grid

    grid = model_grid(2.0)
    volume, _ = _thalamus_map()
    at = load_atlas(atlas)
    ranking = rank_regions(volume, labels_on_grid(at, grid.shape, grid.affine), at.table)
    assert list(ranking.columns[:5]) == ["region", "hemisphere", "structure_class", "importance", "rank"]
    assert set(ranking.head(2)["region"].str.lower().str.contains("thalam")) == {True}
    assert set(ranking.head(2)["hemisphere"]) == {"L", "R"}
    assert ranking["importance"].iloc[0] == 1.0 and ranking["importance"].between(0, 1).all()
    assert ranking["rank"].tolist() == list(range(1, len(ranking) + 1))
    if atlas == "aal":
        assert "cerebellar" in set(ranking["structure_class"])
    if atlas == "harvard_oxford":
        assert {"cortical", "subcortical", "brainstem"} <= set(ranking["structure_class"])


def test_user_atlas_with_label_tsv(tmp_path):
    import nibabel as nib

    from bids_siamese.atlas import load_atlas

    labels = np.zeros((10, 10, 10), np.int16)
    labels[:5] = 1
    labels[5:] = 2
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "my_atlas.nii.gz")
    (tmp_path / "my_atlas.tsv").write_text("index\tname\tstructure_class\n1\tLeft_Blob\tsubcortical\n2\tRight_Blob\tcortical\n")
    at = load_atlas(str(tmp_path / "my_atlas.nii.gz"))
    assert at.table[["region", "hemisphere", "structure_class"]].values.tolist() == [
        ["Blob", "L", "subcortical"], ["Blob", "R", "cortical"]]
    with pytest.raises(Exception, match="not found"):
        load_atlas(str(tmp_path / "missing.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "unlabelled.nii.gz")
    with pytest.raises(Exception, match="no label table"):
        load_atlas(str(tmp_path / "unlabelled.nii.gz"))


def test_class_contrast_statistics():
    import pandas as pd

    from bids_siamese.explain.regions import class_contrast

    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        for r in range(4):
            rows.append({"participant_id": f"sub-{s}", "label": f"s{r}", "structure_class": "subcortical",
                         "importance": 0.8 + rng.normal(0, 0.05)})
            rows.append({"participant_id": f"sub-{s}", "label": f"c{r}", "structure_class": "cortical",
                         "importance": 0.3 + rng.normal(0, 0.05)})
    per_subject = pd.DataFrame(rows)
    ranking = per_subject.groupby(["label", "structure_class"], as_index=False)["importance"].mean()
    stats = class_contrast(per_subject, ranking, n_permutations=1000)
    subj = stats[stats["level"] == "subjects"].iloc[0]
    assert subj["cohens_d"] > 3 and subj["welch_p"] < 1e-6
    assert subj["permutation_p"] == pytest.approx(2 / 2 ** 8)  # exact: all-same-sign flips only
    assert subj["n_permutations"] == 256
    assert set(stats["level"]) == {"subjects", "regions"}


# ----------------------------------------------------------------------------------------------------------
# The group-level step end to end on a tiny synthetic output folder
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    import types

    import nibabel as nib

    from bids_siamese.explain.run import run_explain
    from bids_siamese.models.checkpoint import make_card, save_checkpoint
    from bids_siamese.models.heads import build_model
    from bids_siamese.resources import model_grid

    from bids_siamese.bids.derivatives import init_output_dir

    out = tmp_path_factory.mktemp("out")
    bids = tmp_path_factory.mktemp("bids")
    (bids / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.10.0"}')
    init_output_dir(out)
    (bids / "participants.tsv").write_text("participant_id\tfamily_id\tzygosity\n" + "".join(
        f"sub-{i:02d}\tf{i // 2}\tMZ\n" for i in range(6)))
    resolution = 8.0
    grid = model_grid(resolution)
    blob, _ = _thalamus_map(resolution)
    rng = np.random.default_rng(0)
    brain = blob > -1
    for i in range(6):
        anat = out / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        vol = (rng.normal(0, 0.2, grid.shape) + (1 + i % 2) * blob).astype(np.float32)
        stem = f"sub-{i:02d}_space-MNI152NLin2009cAsym"
        nib.save(nib.Nifti1Image(vol, grid.affine), anat / f"{stem}_desc-preproc_T1w.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), grid.affine), anat / f"{stem}_desc-brain_mask.nii.gz")
        # the sidecars the participant level writes (the validator requires SkullStripped and Type)
        (anat / f"{stem}_desc-preproc_T1w.json").write_text(json.dumps({"SkullStripped": True}))
        (anat / f"{stem}_desc-brain_mask.json").write_text(json.dumps({"Type": "Brain"}))
    torch.manual_seed(0)
    model = build_model("twin", "small", embedding_dim=8).eval()
    card = make_card("twin", "small", 8, grid, 0, {"fingerprint": "x"}, {"threshold_distance": 0.5}, {}, {"distance": "cosine"})
    save_checkpoint(out / "models" / "twins_small", model, card)
    settings = Settings(output_dir=out, bids_dir=bids, analysis_level="group", work_dir=out.parent / "work",
                        resolution=resolution, task="twin", atlas="harvard_oxford", seed=0, backbone="small",
                        distance="cosine", report_subjects=True, explain_surfaces=True, relevance_fwhm=8.0)
    assert settings.resolution_label == "8"
    return out, run_explain(settings, ["01", "00", "02", "03", "04", "05"])


@pytest.mark.slow
def test_run_explain_writes_every_output(explained):
    import pandas as pd

    out, written = explained
    names = {p.name for p in written}
    assert "sub-00_space-MNI152NLin2009cAsym_desc-lrp_relevance.nii.gz" in names
    assert "sub-00_space-MNI152NLin2009cAsym_desc-lrp_relevance.json" in names
    assert "sub-00_hemi-L_space-fsLR_den-32k_desc-lrp_relevance.func.gii" in names
    for name in ("group_regions_ranking.tsv", "group_regions_statistics.tsv", "group_regions_subjects.tsv",
                 "group.html"):
        assert (out / name).is_file(), name
    for name in ("group_fsLR.spec", "group_space-fsLR_den-91k_desc-lrp_relevance.dscalar.nii",
                 "group_hemi-R_space-fsaverage5_desc-lrp_relevance.func.gii",
                 "group_space-MNI152NLin2009cAsym_desc-lrp_relevance.nii.gz"):
        assert (out / "group" / name).is_file(), name
    ranking = pd.read_csv(out / "group_regions_ranking.tsv", sep="\t")
    assert ranking["importance"].max() == 1.0
    assert {"/group*", "*_relevance.*"} <= set((out / ".bidsignore").read_text().split())
    html = (out / "group.html").read_text()
    assert "Region ranking" in html and "<svg" in html and "Subjects" in html


@pytest.mark.slow
def test_run_explain_outputs_pass_the_bids_validator(explained, tmp_path):
    from bids_siamese.bids.layout import run_validator

    out, _ = explained
    errors = [(i.code, i.location) for i in run_validator(out) if i.severity == "error"]
    assert not errors, errors
    from bids_siamese.bids.derivatives import BIDSIGNORE

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for pattern in ("models", "*_relevance.*", "/group*"):  # each is needed for the explanation outputs
        (copy / ".bidsignore").write_text("\n".join(p for p in BIDSIGNORE if p != pattern) + "\n")
        assert [i for i in run_validator(copy) if i.severity == "error"], f"{pattern} hides nothing"


def test_run_explain_refuses_a_swin_twin_model_in_one_line(tmp_path):
    """A swin twin checkpoint applied without --backbone (so the parser cannot refuse it): the explain step says
    in one line that LRP does not cover swin and how to run without it, instead of a torch.fx traceback."""
    from bids_siamese.errors import UsageError
    from bids_siamese.explain.run import run_explain
    from bids_siamese.models.checkpoint import make_card, save_checkpoint
    from bids_siamese.models.heads import build_model
    from bids_siamese.resources import model_grid

    grid = model_grid(8.0)
    torch.manual_seed(0)
    model = build_model("twin", "swin", embedding_dim=8).eval()
    card = make_card("twin", "swin", 8, grid, 0, {"fingerprint": "x"}, {"threshold_distance": 0.5}, {},
                     {"distance": "cosine"})
    folder = save_checkpoint(tmp_path / "out" / "models" / "twins_swin", model, card)
    settings = Settings(output_dir=tmp_path / "out", bids_dir=tmp_path, analysis_level="group",
                        work_dir=tmp_path / "work", resolution=8.0, task="twin", seed=0, backbone="small")
    with pytest.raises(UsageError, match="swin twin model.*fix: add --no-explain") as err:
        run_explain(settings, ["01"], model_path=tmp_path / "out" / "models" / "twins_swin")
    assert "\n" not in str(err.value) and folder is not None
