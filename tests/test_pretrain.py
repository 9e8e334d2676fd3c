"""Self-supervised pretraining objectives (bids_siamese.models.pretrain) and the swin backbone, on tiny volumes."""
from __future__ import annotations

import math

import pytest
import torch

from bids_siamese.cli.parser import parse_args
from bids_siamese.errors import UsageError
from bids_siamese.models.backbones import BACKBONES, build_backbone, small_encoder
from bids_siamese.models.pretrain import (
    LOSSES,
    ROTATIONS,
    TEMPERATURE,
    PretrainHeads,
    cube_mask,
    info_nce,
    inpainting_loss,
    left_right_difference,
    make_views,
    mirror_loss,
    pretrain_losses,
    pretrain_step,
    rotate_sagittal,
    square_sagittal,
)
from bids_siamese.models.swin import SwinStage, swin_encoder
from bids_siamese.resources import model_grid
from bids_siamese.symmetry.model import SymmetrySiamese
from bids_siamese.train.data import augment


def identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def brains(n: int = 4, shape=(16, 18, 14), seed: int = 0) -> torch.Tensor:
    """Blobs of different size and brightness inside a zero background, like model-grid volumes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, *shape)
    for i in range(n):
        r = 3 + i % 3
        c = [s // 2 for s in shape]
        x[i, 0, c[0] - r:c[0] + r, c[1] - r:c[1] + r + 1, c[2] - r:c[2] + r] = 1.0 + 0.5 * i
        x[i, 0, 2:5, 3:6, 2:4] += 2.0  # an asymmetric landmark in the left hemisphere
    return x + 0.05 * torch.randn(x.shape, generator=g) * (x != 0)


def test_info_nce_identical_views_score_the_analytic_value_and_below_random_views():
    b = 6
    z = torch.eye(b, 16)
    expected = math.log(1 + (b - 1) * math.exp(-1 / TEMPERATURE))
    assert float(info_nce(z, z)) == pytest.approx(expected, abs=1e-6)
    assert float(info_nce(z, z, temperature=1.0)) == pytest.approx(math.log(1 + (b - 1) * math.exp(-1)), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    random = info_nce(torch.randn(b, 16, generator=g), torch.randn(b, 16, generator=g))
    assert float(info_nce(z, z)) < 1e-3 < float(random)
    # swapped positives: every row's match is another scan, the loss is about 1/T above the matched one
    assert float(info_nce(z, z.roll(1, dims=0))) > 1 / TEMPERATURE - 1
    with pytest.raises(ValueError, match="same shape"):
        info_nce(z, z[:3])


def test_rotation_classes_are_the_quarter_turns_in_the_sagittal_plane():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(1, 2, 3, 5, 5)
    assert torch.equal(rotate_sagittal(x, 0), x)
    assert torch.equal(rotate_sagittal(x, 2), torch.flip(x, dims=[3, 4]))
    assert torch.equal(rotate_sagittal(rotate_sagittal(x, 1), 3), x)
    assert torch.equal(rotate_sagittal(x, 1), torch.rot90(x, 1, dims=(3, 4)))
    # the x (left-right) axis is untouched: every rotation commutes with the mirror
    for k in range(ROTATIONS):
        assert torch.equal(rotate_sagittal(torch.flip(x, dims=[2]), k), torch.flip(rotate_sagittal(x, k), dims=[2]))


def test_views_carry_labels_that_undo_their_rotation_and_mirror():
    volumes = brains(3)
    v = make_views(volumes, torch.Generator().manual_seed(1), identity, mask_fraction=0.25, cube=2)
    padded = square_sagittal(volumes).repeat(2, 1, 1, 1, 1)
    assert v.inputs.shape == padded.shape == (6, 1, 16, 18, 18)
    assert torch.equal(v.mirrored[:3], v.mirrored[3:])  # both views of a scan share the mirror
    assert len(set(v.rotations.tolist())) > 1
    for i in range(6):
        back = rotate_sagittal(v.targets[i], -int(v.rotations[i]))
        if v.mirrored[i]:
            back = torch.flip(back, dims=[1])
        assert torch.equal(back, padded[i])
    assert torch.equal(v.inputs[~v.masks.expand_as(v.inputs)], v.targets[~v.masks.expand_as(v.targets)])
    assert bool((v.inputs[v.masks.expand_as(v.inputs)] == 0).all())


@pytest.mark.parametrize("fraction", [0.0, 0.125, 0.3, 1.0])
def test_cube_mask_covers_the_requested_fraction(fraction):
    g = torch.Generator().manual_seed(0)
    exact = cube_mask((3, 1, 32, 32, 32), fraction, 8, g).float().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(exact, torch.full((3,), round(fraction * 64) / 64))
    grid = model_grid(4.0).shape  # 42x52x44: partial blocks at the edges
    approx = cube_mask((2, 1, *grid), fraction, 8, g).float().mean()
    assert abs(float(approx) - fraction) < 0.06
    masks = cube_mask((2, 1, 32, 32, 32), 0.5, 8, g)
    assert not torch.equal(masks[0], masks[1])  # drawn per volume


def test_inpainting_and_mirror_losses_have_their_values():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2] = 3.0
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., 0] = True
    assert float(inpainting_loss(torch.zeros_like(target), target, mask)) == pytest.approx(3.0)
    assert float(inpainting_loss(target, target, mask)) == 0.0
    # errors outside the mask do not count
    assert float(inpainting_loss(target + 5.0 * (~mask), target, mask)) == 0.0
    labels = torch.tensor([True, False])
    assert float(mirror_loss(torch.tensor([20.0, -20.0]), labels)) < 1e-6
    assert float(mirror_loss(torch.tensor([-20.0, 20.0]), labels)) > 19.0


def test_left_right_head_sees_the_sign_of_a_mirror():
    f = torch.zeros(1, 2, 4, 1, 1)
    f[0, 0, 0] = 1.0  # channel 0 active on the left only
    assert left_right_difference(f).tolist() == [[0.5, 0.0]]
    assert left_right_difference(torch.flip(f, dims=[2])).tolist() == [[-0.5, 0.0]]
    assert left_right_difference(torch.ones(1, 2, 1, 3, 3)).tolist() == [[0.0, 0.0]]  # one voxel wide


def test_losses_are_finite_and_a_few_steps_reduce_the_total(one_torch_thread):
    torch.manual_seed(0)
    encoder = small_encoder(channels=(8, 16), stem_pool=1)
    heads = PretrainHeads(encoder.out_channels, projection_dim=16, hidden=32, decoder_channels=8)
    volumes = brains(4)
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=3e-3)

    def fixed_views() -> torch.Generator:  # the same views every step: the objective is deterministic
        return torch.Generator().manual_seed(7)

    with pytest.raises(ValueError, match="unknown loss weight"):
        pretrain_losses(encoder, heads, volumes, fixed_views(), {"rotations": 1.0}, augment=augment)
    with torch.no_grad():
        first = pretrain_losses(encoder, heads, volumes, fixed_views(), augment=augment, cube=4)
    assert list(first) == [*LOSSES, "total"]
    assert all(bool(torch.isfinite(v)) for v in first.values())
    assert float(first["total"]) == pytest.approx(sum(float(first[n]) for n in LOSSES), rel=1e-5)
    assert float(first["rotation"]) == pytest.approx(math.log(ROTATIONS), abs=0.5)  # untrained: near chance
    with torch.no_grad():
        weighted = pretrain_losses(encoder, heads, volumes, fixed_views(), {"mirror": 0.0, "inpainting": 2.0},
                                   augment=augment, cube=4)
    expected = sum(float(weighted[n]) * w for n, w in
                   {"contrastive": 1.0, "rotation": 1.0, "inpainting": 2.0, "mirror": 0.0}.items())
    assert float(weighted["total"]) == pytest.approx(expected, rel=1e-5)
    totals = [pretrain_step(encoder, heads, optimizer, volumes, fixed_views(), augment=augment, cube=4)["total"]
              for _ in range(8)]
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0], totals


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in {"resnet18", "densenet121", "swin"}
                                  else n for n in BACKBONES])
def test_every_backbone_gives_the_heads_their_shapes(name, one_torch_thread):
    torch.manual_seed(0)
    encoder = build_backbone(name)
    heads = PretrainHeads(encoder.out_channels, projection_dim=32)
    v = make_views(brains(2, shape=(32, 32, 28)), torch.Generator().manual_seed(0), augment, cube=8)
    features = encoder(v.inputs)
    assert features.shape[:2] == (4, encoder.out_channels)
    assert heads.project(features).shape == (4, 32)
    assert heads.rotation(features).shape == (4, ROTATIONS)
    assert heads.mirror(features).shape == (4,)
    assert heads.reconstruct(features, tuple(v.targets.shape[2:])).shape == v.targets.shape


@pytest.mark.slow
def test_swin_encoder_takes_every_model_grid_and_hemisphere():
    encoder = swin_encoder(feature_size=12).eval()
    assert encoder.out_channels == 12 * 16
    with torch.no_grad():
        for resolution in (4.0, 8.0):
            shape = model_grid(resolution).shape
            for volume in (shape, (shape[0] // 2, *shape[1:])):  # whole brain, one hemisphere
                out = encoder(torch.zeros(1, 1, *volume))
                assert out.shape[:2] == (1, 192)
                assert list(out.shape[2:]) == [math.ceil(n / 32) for n in volume]
                assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="one entry per stage"):
        swin_encoder(depths=(2, 2), num_heads=(3,))


def test_cli_takes_swin_for_the_three_tasks_and_asks_for_no_explain_with_twin(mini_bids, tmp_path):
    out = tmp_path / "out"
    for task, extra in (("twin", ["--no-explain"]), ("longitudinal", []),
                        ("symmetry", ["--symmetry-fusion", "cross_attention"])):
        s = parse_args([str(mini_bids), str(out), "group", "--task", task, "--backbone", "swin", *extra])
        assert (s.backbone, s.epochs, s.batch_size) == ("swin", 30, 8)  # the CNN training defaults
    with pytest.raises(UsageError, match=r"--backbone swin has no LRP explanation .*; fix: add --no-explain"):
        parse_args([str(mini_bids), str(out), "group", "--task", "twin", "--backbone", "swin"])


@pytest.mark.slow
def test_sa_swin_cross_attention_on_swin_keeps_the_side_antisymmetric():
    """SymmetrySiamese runs the swin body stage by stage (its middle level is a Swin stage's output)."""
    torch.manual_seed(0)
    model = SymmetrySiamese(swin_encoder(in_channels=2, feature_size=12), fusion="cross_attention",
                            embedding_dim=16, difference_channel=True).eval()
    assert isinstance(model.encoder.body[model.mid_index], SwinStage)
    x = torch.randn(2, 1, *model_grid(8.0).shape)
    with torch.no_grad():
        out = model.forward_all(x)
        _, side_flipped = model(torch.flip(x, dims=[2]))
    assert out["logit"].shape == out["side"].shape == (2,)
    assert torch.allclose(out["side"], -side_flipped, atol=1e-4)
