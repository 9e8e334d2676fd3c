"""Self-supervised pretraining objectives of SA-Swin for any encoder: learning from every scan, labels or not.

The seed papers pretrain a Swin encoder with proxy tasks on unlabelled scans before fine-tuning it on few labels:
Tang et al. (CVPR 2022, Swin UNETR) with masked-volume inpainting, rotation prediction and contrastive coding
between two augmented sub-volumes of a scan, summed with equal weights; SA-Swin (Ma et al., MICCAI 2024) adds a
symmetry proxy task for the brain's two hemispheres. Here the same four kinds of objective work on any
:class:`~bids_siamese.models.backbones.Encoder` (``small``, ``unet``, ``resnet18``, ``densenet121``, ``swin``),
on whole model-grid volumes, with small heads (:class:`PretrainHeads`) that are dropped after pretraining:

contrastive (:func:`info_nce`)
    two views of each scan (independent random shifts, intensity scale/offset and noise, from the trainer's
    augmentation, e.g. ``bids_siamese.train.data.augment``, then each its own rotation and masked cubes) are
    projected to unit vectors; InfoNCE with temperature 0.07 makes the two views of a scan closer to each other
    than to the other scans of the batch (both directions averaged). This is what the twin and longitudinal
    tasks need: a scan's embedding that is stable under acquisition noise and distinguishes individuals.
rotation (:func:`rotate_sagittal`)
    each view is rotated by 0, 90, 180 or 270 degrees in the sagittal (y-z) plane, about the left-right axis;
    a linear head names the rotation (4 classes, cross-entropy). Tang et al. rotate about the z axis; rotating
    about the left-right axis keeps the mid-sagittal plane at x = 0 in every view, so the left-right term and
    the symmetry model's hemisphere split stay valid. The grid is padded with zeros to a square y-z plane
    (:func:`square_sagittal`) so that every rotation has the same shape.
inpainting (:func:`cube_mask`, :func:`inpainting_loss`)
    random cubes covering a fraction of each view (30 % by default) are zeroed before the encoder sees it; a
    light decoder (:meth:`PretrainHeads.reconstruct`: two convolution stages and trilinear upsampling from the
    encoder's feature map) restores the view, scored by the L1 error on the masked voxels only. The encoder
    must describe anatomy it cannot see from the surrounding context.
left-right (:func:`mirror_loss`)
    the same scan's two views are both mirrored left-right (x flipped) with probability 1/2, and a linear head
    says whether they were. The contrastive term alone would not care about the side, and flip augmentation
    would teach the encoder that a brain and its mirror are alike; this term instead keeps the difference
    between a hemisphere and its mirrored homologue in the features, which the symmetry model (and SA-Swin's
    cross-attention between an image and its mirror) compares. It is learnable because the population's
    normal asymmetries (petalia, the larger left planum temporale, ventricle asymmetry; the MNI152 2009c Asym
    template has them) point the same way in every registered scan, but it is a subtle cue: a true mirror of
    a nearly symmetric brain differs only there. So the head reads the features' left-minus-right difference
    (the left half of the feature map minus the mirrored right half, averaged), which flips its sign under a
    mirror when the features follow the anatomy, next to the globally pooled features. Expect this loss to
    fall slower than the others: on the tiny demo's 7 scans at 8 mm it stayed at chance over 300 ``small``
    steps while the rotation head reached 85-98 % accuracy (docs/benchmarks.md). Both views share the mirror
    so the contrastive term does not push the projection to be mirror-invariant.

The total is the weighted sum (:data:`DEFAULT_WEIGHTS`: all 1, as Tang et al. weight their three losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Encoder
from .heads import BatchNorm1dAnyBatch

#: InfoNCE temperature of the seed papers.
TEMPERATURE = 0.07
#: Number of rotation classes (0, 90, 180, 270 degrees).
ROTATIONS = 4
#: Loss names, in the order of the returned dict (``total`` last).
LOSSES = ("contrastive", "rotation", "inpainting", "mirror")
#: Weights of the total loss (equal, as in Tang et al.).
DEFAULT_WEIGHTS: dict[str, float] = {name: 1.0 for name in LOSSES}
#: Axes of a batch ``(B, C, X, Y, Z)``: x is left-right (RAS model grid), the sagittal plane is (y, z).
LR_AXIS = 2
SAGITTAL_AXES = (3, 4)

#: An augmentation ``(batch, generator) -> batch`` (e.g. :func:`bids_siamese.train.data.augment`).
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE between two views: row ``i`` of ``z1`` and of ``z2`` come from the same scan (the positive pair),
    the other rows of the batch are the negatives. Cosine similarities divided by ``temperature``, cross-entropy
    towards the matching row, averaged over both directions (view 1 -> 2 and 2 -> 1).

    Args:
        z1: ``(B, D)`` projections of the first views (normalised here).
        z2: ``(B, D)`` projections of the second views.
        temperature: softmax temperature (0.07 in the seed papers).

    Examples:
        >>> z = torch.eye(3)  # orthonormal, identical views: the loss is log(1 + 2 exp(-1 / 0.07))
        >>> round(float(info_nce(z, z)), 8) == round(float(torch.log(1 + 2 * torch.exp(torch.tensor(-1 / 0.07)))), 8)
        True
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"need two (B, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2.0


def square_sagittal(x: torch.Tensor) -> torch.Tensor:
    """Pad the sagittal plane (y, z) of ``(B, C, X, Y, Z)`` with zeros to a square, centred (the extra voxel of an
    odd difference at the far end), so that every 90-degree rotation keeps the shape.

    Examples:
        >>> square_sagittal(torch.ones(1, 1, 4, 6, 3)).shape
        torch.Size([1, 1, 4, 6, 6])
    """
    ny, nz = x.shape[SAGITTAL_AXES[0]], x.shape[SAGITTAL_AXES[1]]
    side = max(ny, nz)
    pad_y, pad_z = side - ny, side - nz
    return F.pad(x, (pad_z // 2, pad_z - pad_z // 2, pad_y // 2, pad_y - pad_y // 2))


def rotate_sagittal(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate ``(..., X, Y, Z)`` by ``k`` x 90 degrees in the sagittal (y-z) plane (about the left-right axis),
    from +y (anterior) towards +z (superior): the rotation class ``k`` of the rotation objective.

    Examples:
        >>> x = torch.zeros(1, 1, 1, 3, 3); x[0, 0, 0, 2, 1] = 1.0  # anterior of the centre
        >>> torch.nonzero(rotate_sagittal(x, 1)[0, 0, 0]).tolist()  # now superior of it
        [[1, 2]]
    """
    return torch.rot90(x, int(k) % ROTATIONS, dims=(x.dim() - 2, x.dim() - 1))


def cube_mask(shape: tuple[int, ...], fraction: float, cube: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean masks ``(B, 1, X, Y, Z)`` of random cubes: each volume's grid is cut into ``cube``-voxel blocks and
    ``round(fraction * blocks)`` of them, drawn without replacement, are masked. The masked share of the voxels is
    ``fraction`` (to the nearest block) when ``cube`` divides the grid; partial blocks at the far edges make it
    differ slightly otherwise.

    Args:
        shape: ``(B, C, X, Y, Z)`` of the batch.
        fraction: share of the blocks to mask, in [0, 1].
        cube: block edge in voxels.
        generator: CPU random generator.

    Examples:
        >>> m = cube_mask((2, 1, 16, 16, 16), 0.25, 4, torch.Generator().manual_seed(0))
        >>> m.shape, m.float().mean(dim=(1, 2, 3, 4)).tolist()
        (torch.Size([2, 1, 16, 16, 16]), [0.25, 0.25])
    """
    if not 0.0 <= fraction <= 1.0 or cube < 1:
        raise ValueError(f"need 0 <= fraction <= 1 and cube >= 1, got {fraction} and {cube}")
    b, spatial = shape[0], tuple(shape[2:])
    blocks = tuple(-(-n // cube) for n in spatial)
    n_blocks = int(torch.tensor(blocks).prod())
    n_masked = int(round(fraction * n_blocks))
    coarse = torch.zeros(b, n_blocks, dtype=torch.bool)
    for i in range(b):
        coarse[i, torch.randperm(n_blocks, generator=generator)[:n_masked]] = True
    fine = coarse.reshape(b, 1, *blocks)
    for axis in range(len(spatial)):
        fine = fine.repeat_interleave(cube, dim=2 + axis)
    return fine[(slice(None), slice(None), *(slice(0, n) for n in spatial))].contiguous()


def inpainting_loss(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked voxels only (0 when nothing is masked).

    Examples:
        >>> t = torch.ones(1, 1, 2, 2, 2); m = torch.zeros_like(t, dtype=torch.bool); m[..., 0] = True
        >>> float(inpainting_loss(torch.zeros_like(t), t, m)), float(inpainting_loss(t, t, m))
        (1.0, 0.0)
    """
    masked = mask.expand_as(target)
    if not bool(masked.any()):
        return reconstruction.sum() * 0.0
    return (reconstruction - target).abs()[masked].mean()


def mirror_loss(logits: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the left-right head: ``logits > 0`` says the view was mirrored.

    Examples:
        >>> round(float(mirror_loss(torch.zeros(4), torch.tensor([True, False, True, False]))), 4)  # log 2
        0.6931
    """
    return F.binary_cross_entropy_with_logits(logits, mirrored.to(logits.dtype))


def left_right_difference(features: torch.Tensor) -> torch.Tensor:
    """``(B, C)``: the average of the left half of a feature map minus its mirrored right half (x axis; zeros when
    the map is one voxel wide). Antisymmetric: the features of a mirrored map give the negative.

    Examples:
        >>> f = torch.randn(2, 3, 4, 2, 2)
        >>> bool(torch.allclose(left_right_difference(torch.flip(f, dims=[2])), -left_right_difference(f)))
        True
    """
    half = features.shape[LR_AXIS] // 2
    if half == 0:
        return features.new_zeros(features.shape[:2])
    diff = features - torch.flip(features, dims=[LR_AXIS])
    return diff[:, :, :half].mean(dim=(2, 3, 4))


class PretrainHeads(nn.Module):
    """The proxy-task heads over an encoder's feature map ``(B, C, d, h, w)``; dropped after pretraining.

    Args:
        channels: the encoder's output channels (``Encoder.out_channels``).
        projection_dim: size of the contrastive projection.
        hidden: width of the projection MLP.
        decoder_channels: width of the inpainting decoder's first stage (its second has half).

    Examples:
        >>> heads = PretrainHeads(8, projection_dim=16)
        >>> f = torch.randn(2, 8, 2, 2, 2)
        >>> tuple(heads.project(f).shape), tuple(heads.rotation(f).shape), tuple(heads.mirror(f).shape)
        ((2, 16), (2, 4), (2,))
        >>> heads.reconstruct(f, (16, 16, 16)).shape
        torch.Size([2, 1, 16, 16, 16])
    """

    def __init__(self, channels: int, projection_dim: int = 128, hidden: int = 256, decoder_channels: int = 32):
        super().__init__()
        # batch norm, as in SimCLR's projection head and the EmbeddingHead: registered brains share most of their
        # pooled features; centred across the batch, the projections of different scans start apart
        self.projection = nn.Sequential(BatchNorm1dAnyBatch(channels), nn.Linear(channels, hidden),
                                        BatchNorm1dAnyBatch(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, projection_dim))
        self.rotation_head = nn.Linear(channels, ROTATIONS)
        self.mirror_head = nn.Linear(2 * channels, 1)
        half = max(1, decoder_channels // 2)
        self.decode_coarse = nn.Sequential(
            nn.Conv3d(channels, decoder_channels, 1), nn.GELU(),
            nn.Conv3d(decoder_channels, decoder_channels, 3, padding=1), nn.GELU(),
        )
        self.decode_mid = nn.Sequential(nn.Conv3d(decoder_channels, half, 3, padding=1), nn.GELU())
        self.decode_out = nn.Conv3d(half, 1, 3, padding=1)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average of the feature map, ``(B, C)``."""
        return features.flatten(2).mean(dim=2)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Contrastive projection ``(B, projection_dim)`` (not normalised; :func:`info_nce` does it)."""
        return self.projection(self.pool(features))

    def rotation(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the 4 rotation classes, ``(B, 4)``."""
        return self.rotation_head(self.pool(features))

    def mirror(self, features: torch.Tensor) -> torch.Tensor:
        """Logit that the view was mirrored left-right, ``(B,)``, from the pooled features and their
        left-minus-right difference (:func:`left_right_difference`)."""
        return self.mirror_head(torch.cat([self.pool(features), left_right_difference(features)], dim=1)).squeeze(1)

    def reconstruct(self, features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """The inpainted volume ``(B, 1, *size)``: convolutions on the feature grid, trilinear upsampling to a
        quarter of ``size``, a convolution, upsampling to ``size``, a last convolution."""
        h = self.decode_coarse(features)
        h = F.interpolate(h, size=tuple(max(1, n // 4) for n in size), mode="trilinear", align_corners=False)
        h = self.decode_mid(h)
        h = F.interpolate(h, size=tuple(size), mode="trilinear", align_corners=False)
        return self.decode_out(h)


@dataclass
class PretrainViews:
    """Two views of each scan of a batch, stacked ``[view 1 of every scan, view 2 of every scan]`` (``2B``).

    Attributes:
        inputs: what the encoder sees: augmented, mirrored or not, rotated, cubes zeroed.
        targets: the same views before the cubes were zeroed (the inpainting target).
        masks: the zeroed cubes (boolean, one channel).
        rotations: rotation class of each view (``k`` x 90 degrees, :func:`rotate_sagittal`).
        mirrored: whether each view was mirrored left-right (both views of a scan alike).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor
    rotations: torch.Tensor
    mirrored: torch.Tensor


def make_views(volumes: torch.Tensor, generator: torch.Generator, augment: Augment, mask_fraction: float = 0.3,
               cube: int = 8) -> PretrainViews:
    """Two views per scan for the proxy tasks (see the module docstring for each step).

    Per view: ``augment`` (independently for each view), the scan's left-right mirror (shared by its two views,
    probability 1/2), zero padding of the sagittal plane to a square, a random rotation in it, then random cubes
    zeroed (``mask_fraction`` of ``cube``-voxel blocks).

    Args:
        volumes: ``(B, 1, X, Y, Z)`` model-grid volumes.
        generator: CPU random generator (seeded by the caller).
        augment: shift/intensity/noise augmentation ``(batch, generator) -> batch``.
        mask_fraction: share of each view hidden for the inpainting task.
        cube: edge of the hidden cubes in voxels (8 voxels: 32 mm at 4 mm).

    Examples:
        >>> v = make_views(torch.randn(2, 1, 8, 10, 6), torch.Generator().manual_seed(0), lambda x, g: x, 0.5, 2)
        >>> v.inputs.shape, v.rotations.shape, bool((v.inputs[v.masks.expand_as(v.inputs)] == 0).all())
        (torch.Size([4, 1, 8, 10, 10]), torch.Size([4]), True)
    """
    b = volumes.shape[0]
    mirrored = (torch.rand(b, generator=generator) < 0.5).repeat(2)
    rotations = torch.randint(0, ROTATIONS, (2 * b,), generator=generator)
    views = torch.cat([augment(volumes, generator), augment(volumes, generator)], dim=0)
    flip = mirrored.to(views.device)[:, None, None, None, None]
    views = square_sagittal(torch.where(flip, torch.flip(views, dims=[LR_AXIS]), views))
    targets = torch.stack([rotate_sagittal(views[i], int(k)) for i, k in enumerate(rotations)])
    masks = cube_mask(tuple(targets.shape), mask_fraction, cube, generator).to(targets.device)
    inputs = targets.masked_fill(masks, 0.0)
    return PretrainViews(inputs=inputs, targets=targets, masks=masks, rotations=rotations.to(volumes.device),
                         mirrored=mirrored.to(volumes.device))


def pretrain_losses(encoder: Encoder, heads: PretrainHeads, volumes: torch.Tensor, generator: torch.Generator,
                    weights: Mapping[str, float] | None = None, *, augment: Augment, mask_fraction: float = 0.3,
                    cube: int = 8) -> dict[str, torch.Tensor]:
    """The four proxy losses of a batch and their weighted ``total`` (one encoder pass over ``2B`` views).

    Args:
        encoder: any backbone :class:`~bids_siamese.models.backbones.Encoder` (one input channel).
        heads: :class:`PretrainHeads` built for ``encoder.out_channels``.
        volumes: ``(B, 1, X, Y, Z)`` model-grid volumes, ``B >= 2`` (the other scans are the negatives).
        generator: CPU random generator for the views.
        weights: per-loss weights (missing names: :data:`DEFAULT_WEIGHTS`; 0 leaves a loss out of the total).
        augment: shift/intensity/noise augmentation, e.g. :func:`bids_siamese.train.data.augment`.
        mask_fraction: share of each view hidden for inpainting.
        cube: edge of the hidden cubes in voxels.

    Returns:
        ``{"contrastive", "rotation", "inpainting", "mirror", "total"}`` scalar tensors.

    Examples:
        >>> from bids_siamese.models.backbones import small_encoder
        >>> enc = small_encoder(channels=(4, 8), stem_pool=1)
        >>> losses = pretrain_losses(enc, PretrainHeads(8, projection_dim=8), torch.randn(2, 1, 16, 16, 16),
        ...                          torch.Generator().manual_seed(0), augment=lambda x, g: x, cube=4)
        >>> list(losses), all(bool(torch.isfinite(v)) for v in losses.values())
        (['contrastive', 'rotation', 'inpainting', 'mirror', 'total'], True)
    """
    if volumes.dim() != 5 or volumes.shape[0] < 2:
        raise ValueError(f"need a batch (B >= 2, 1, X, Y, Z) of volumes, got {tuple(volumes.shape)}")
    check_weights(weights)
    return view_losses(encoder, heads, make_views(volumes, generator, augment, mask_fraction, cube), weights)


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The loss weights with the defaults filled in (:data:`DEFAULT_WEIGHTS`).

    Raises:
        ValueError: a name that is not one of :data:`LOSSES`.

    Examples:
        >>> check_weights({"mirror": 0.0})["mirror"], check_weights(None)["rotation"]
        (0.0, 1.0)
    """
    unknown = set(weights or {}) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; the losses are {', '.join(LOSSES)}")
    return {**DEFAULT_WEIGHTS, **dict(weights or {})}


def view_losses(encoder: Callable[[torch.Tensor], torch.Tensor], heads: PretrainHeads, views: PretrainViews,
                weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The four proxy losses and their weighted ``total`` for views already made (:func:`make_views`; a trainer
    makes them where it assembles its batches, e.g. in a DataLoader worker): one encoder pass over the ``2B``
    views. The heads' outputs are cast to float32 before the losses, so the losses are float32 under a bf16
    autocast too.

    Args:
        encoder: what maps the views to a feature map: an :class:`~bids_siamese.models.backbones.Encoder`, or a
            wrapper that runs one (compiled, DistributedDataParallel).
        heads: :class:`PretrainHeads` for the encoder's output channels.
        views: the two views of ``B >= 2`` scans, on the device.
        weights: per-loss weights (see :func:`pretrain_losses`).
    """
    w = check_weights(weights)
    features = encoder(views.inputs)
    b = views.inputs.shape[0] // 2
    projections = heads.project(features).float()
    reconstruction = heads.reconstruct(features, tuple(views.targets.shape[2:])).float()
    out = {
        "contrastive": info_nce(projections[:b], projections[b:]),
        "rotation": F.cross_entropy(heads.rotation(features).float(), views.rotations),
        "inpainting": inpainting_loss(reconstruction, views.targets.float(), views.masks),
        "mirror": mirror_loss(heads.mirror(features).float(), views.mirrored),
    }
    out["total"] = sum(float(w[name]) * out[name] for name in LOSSES)
    return out


def pretrain_step(encoder: Encoder, heads: PretrainHeads, optimizer: torch.optim.Optimizer, volumes: torch.Tensor,
                  generator: torch.Generator, weights: Mapping[str, float] | None = None, *, augment: Augment,
                  mask_fraction: float = 0.3, cube: int = 8) -> dict[str, float]:
    """One optimisation step of the encoder and the heads on a batch (:func:`pretrain_losses`, backward, step).

    The caller puts the modules in training mode, moves them and ``volumes`` to the device and, if it wants,
    wraps the call in an autocast context. Returns the losses as floats (for the loss curves).

    Examples:
        >>> from bids_siamese.models.backbones import small_encoder
        >>> enc, heads = small_encoder(channels=(4, 8), stem_pool=1), PretrainHeads(8, projection_dim=8)
        >>> opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=1e-3)
        >>> out = pretrain_step(enc, heads, opt, torch.randn(2, 1, 16, 16, 16), torch.Generator().manual_seed(0),
        ...                     augment=lambda x, g: x, cube=4)
        >>> sorted(out) == sorted(["contrastive", "rotation", "inpainting", "mirror", "total"])
        True
    """
    optimizer.zero_grad(set_to_none=True)
    losses = pretrain_losses(encoder, heads, volumes, generator, weights, augment=augment,
                             mask_fraction=mask_fraction, cube=cube)
    losses["total"].backward()
    optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}
