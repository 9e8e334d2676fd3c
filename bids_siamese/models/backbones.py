"""3D encoders (one input channel) that map a volume to a feature map.

Every backbone returns a feature map ``(B, C, d, h, w)``; the embedding head pools it globally. The large
backbones are MONAI's networks with their classification/decoder parts removed:

* ``unet``: the encoder (down path and bottom block) of MONAI's residual ``UNet``;
* ``resnet18``: MONAI's ``resnet18`` up to ``layer4``;
* ``densenet121``: MONAI's ``DenseNet121.features`` followed by its final ReLU;
* ``swin``: the Swin transformer encoder of Swin UNETR / SA-Swin (:mod:`bids_siamese.models.swin`); it normalises
  each token over its channels (layer norm), the one backbone without batch norm;
* ``small``: a 2x average-pooling stem and three strided conv blocks (batch norm, LeakyReLU); trains on a
  CPU in minutes.

All CNN backbones use batch norm. Instance (or group) norm right before global average pooling would erase what
distinguishes subjects: the spatial mean of ``act(instance_norm(x))`` is nearly the same for every input.
(MONAI's U-Net defaults to instance norm; its encoder is built here with batch norm.) The training loop
re-estimates the batch-norm statistics on the training set after every epoch (see
:func:`precise_batch_norm`, used by the twin, longitudinal and symmetry trainers).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

BACKBONES = ("small", "unet", "resnet18", "densenet121", "swin")


class Encoder(nn.Module):
    """A feature extractor with a known number of output channels.

    Args:
        body: the module mapping ``(B, in_channels, D, H, W)`` to ``(B, out_channels, d, h, w)``.
        out_channels: channels of the feature map.
        name: backbone name (recorded in the model card).

    Examples:
        >>> enc = Encoder(nn.Conv3d(1, 4, 3, padding=1), out_channels=4, name="toy")
        >>> enc(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 4, 8, 8, 8])
    """

    def __init__(self, body: nn.Module, out_channels: int, name: str):
        super().__init__()
        self.body = body
        self.out_channels = int(out_channels)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)



@contextlib.contextmanager
def precise_batch_norm(model: nn.Module) -> Iterator[int]:
    """Re-estimate the running statistics of every batch-norm layer of ``model`` ("precise BN").

    On entering, the statistics are reset, momenta set to ``None`` (a cumulative average) and the model put in
    training mode under ``torch.no_grad``; the caller then runs its forward passes inside the block, and the
    statistics become the average over them. Momenta and the training flag are restored on leaving. After few
    training steps the momentum averages still describe earlier weights; evaluation then uses these. The
    block's value is the number of layers updated (0: nothing to do, the caller may skip its passes).

    Examples:
        >>> enc = small_encoder()
        >>> with precise_batch_norm(enc) as layers:
        ...     _ = enc(torch.randn(2, 1, 16, 16, 16))
        >>> layers
        6
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches the caller runs
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            yield len(layers)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        norm(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
        conv(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
        norm(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


def small_encoder(spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                  stem_pool: int = 2) -> Encoder:
    """Average-pooling stem, then a few strided conv blocks (each halves the grid): trains on a CPU in minutes.

    The stem averages ``stem_pool``-voxel blocks (2 mm inputs are processed at 4 mm), which makes a training
    step about five times cheaper than convolving the full grid; the MONAI backbones see the full grid.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: output channels of each conv block.
        stem_pool: average-pooling factor of the stem (1: none).

    Examples:
        >>> small_encoder()(torch.zeros(2, 1, 42, 52, 44)).shape
        torch.Size([2, 64, 3, 4, 3])
    """
    pool = nn.AvgPool3d if spatial_dims == 3 else nn.AvgPool2d
    blocks: list[nn.Module] = [pool(stem_pool, ceil_mode=True)] if stem_pool > 1 else []
    cin = in_channels
    for cout in channels:
        blocks.append(_conv_block(spatial_dims, cin, cout, stride=2))
        cin = cout
    return Encoder(nn.Sequential(*blocks), out_channels=cin, name="small")


def monai_nets():
    """MONAI's ``monai.networks.nets``, imported on first use: only the MONAI backbones need it."""
    from monai.networks import nets  # deferred: monai adds seconds to every import of models/ (measured 2-5 s)

    return nets


def unet_encoder(
    spatial_dims: int = 3,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "batch",
) -> Encoder:
    """The encoder of MONAI's residual U-Net: its down-path blocks and bottom block, in order.

    The U-Net is built by MONAI (``Sequential(down, SkipConnection(subblock), up)`` nested to the bottom) and
    its down blocks are taken out of that nesting, so a segmentation U-Net's weights map onto this encoder.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: channels per level (as for ``monai.networks.nets.UNet``).
        strides: strides between levels.
        num_res_units: residual units per block.
        norm: normalisation (MONAI name); batch norm by default (see the module docstring).

    Examples:
        >>> unet_encoder()(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 256, 2, 2, 2])
    """
    unet = monai_nets().UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1,
                             channels=channels, strides=strides, num_res_units=num_res_units, norm=norm)
    layers: list[nn.Module] = []
    block: nn.Module = unet.model
    while isinstance(block, nn.Sequential) and len(block) == 3:
        layers.append(block[0])  # down path of this level
        block = block[1].submodule  # SkipConnection -> next level
    layers.append(block)  # bottom block
    if len(layers) != len(channels):  # pragma: no cover - guards against a MONAI layout change
        raise RuntimeError(f"unexpected MONAI UNet layout: found {len(layers)} encoder blocks, want {len(channels)}")
    return Encoder(nn.Sequential(*layers), out_channels=channels[-1], name="unet")


def resnet18_encoder(spatial_dims: int = 3, in_channels: int = 1) -> Encoder:
    """MONAI's ResNet-18 up to ``layer4`` (512 channels, grid / 32: the first conv has stride 2, as in the 2D
    ResNet-18; MONAI's default stride 1 would run the 7x7x7 conv with 64 channels at full resolution).

    Examples:
        >>> resnet18_encoder()(torch.zeros(2, 1, 64, 64, 64)).shape
        torch.Size([2, 512, 2, 2, 2])
    """
    net = monai_nets().resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_stride=2,
                                feed_forward=False)
    body = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return Encoder(body, out_channels=512, name="resnet18")


def densenet121_encoder(spatial_dims: int = 3, in_channels: int = 1) -> Encoder:
    """MONAI's DenseNet-121 feature extractor (1024 channels, grid / 32).

    Examples:
        >>> densenet121_encoder()(torch.zeros(1, 1, 64, 64, 64)).shape
        torch.Size([1, 1024, 2, 2, 2])
    """
    net = monai_nets().DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    body = nn.Sequential(net.features, nn.ReLU(inplace=True))
    return Encoder(body, out_channels=1024, name="densenet121")


def build_backbone(name: str, spatial_dims: int = 3, in_channels: int = 1) -> Encoder:
    """The encoder called ``name`` (one of :data:`BACKBONES`).

    Args:
        name: ``small``, ``unet``, ``resnet18``, ``densenet121`` or ``swin``.
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for a T1w volume).

    Raises:
        ValueError: unknown name.

    Examples:
        >>> build_backbone("small").out_channels
        64
    """
    builders = {
        "small": small_encoder,
        "unet": unet_encoder,
        "resnet18": resnet18_encoder,
        "densenet121": densenet121_encoder,
    }
    if name == "swin":
        from .swin import swin_encoder  # deferred: MONAI's Swin modules take seconds to import

        return swin_encoder(spatial_dims=spatial_dims, in_channels=in_channels)
    if name not in builders:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    return builders[name](spatial_dims=spatial_dims, in_channels=in_channels)
