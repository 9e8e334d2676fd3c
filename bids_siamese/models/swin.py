"""The Swin transformer encoder of Swin UNETR / SA-Swin (``--backbone swin``), built from MONAI's parts.

SA-Swin (Ma et al., "Symmetry Awareness Encoded Deep Learning Framework for Brain Imaging Analysis", MICCAI
2024) uses the encoder of Swin UNETR (Hatamizadeh et al. 2022; its self-supervised pretraining: Tang et al.,
CVPR 2022): a 2x2x2 patch embedding, then four stages of two shifted-window transformer blocks, each stage
ending in a patch merging that halves the grid and doubles the channels. With the papers' ``feature_size=48``
the encoder returns ``16 * 48 = 768`` channels on a grid 32 times coarser than the input, like ``resnet18`` and
``densenet121`` here.

The layers are MONAI's (``monai.networks.nets.swin_unetr``: ``PatchEmbed``, ``BasicLayer``), so Swin UNETR
weights map onto them. Each stage is wrapped in :class:`SwinStage`, which runs MONAI's blocks on a
channels-first map with ``torch`` permutes: MONAI's own stage forward needs the optional ``einops`` package,
which is not a dependency of this app. The encoder is a plain ``nn.Sequential`` of feature maps
``(B, C, d, h, w)``, so the symmetry model can take its middle level from it like from the CNNs.

Input size: none of the model grids (2 mm ``84x104x88`` ... 8 mm ``21x26x22``, or a hemisphere of them) is a
multiple of 32, and none needs to be. MONAI pads inside the encoder: the patch embedding pads each axis with
zeros to a multiple of ``patch_size``, each patch merging pads an odd axis by one zero voxel, and the window
attention pads each axis to a multiple of the window (padded tokens are zeros after the block's layer norm).
All padding is at the far end of an axis; the output grid is ``ceil(n / patch_size / 2**len(depths))`` per
axis (e.g. 4 mm: ``42x52x44 -> 2x2x2``). The encoder ends with a parameter-free layer norm over channels, as
MONAI's ``SwinTransformer(normalize=True)`` outputs: a per-voxel norm, which keeps the differences between
subjects that an instance norm before global pooling would erase (see :mod:`bids_siamese.models.backbones`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer, compute_mask, get_window_size
from torch import nn

from .backbones import Encoder


class SwinStage(nn.Module):
    """One MONAI Swin stage (``BasicLayer``: shifted-window blocks, then patch merging) on a channels-first map.

    The same computation as ``BasicLayer.forward`` (window sizes clipped to small grids, the shifted-window
    attention mask on the window-padded grid), with ``torch`` permutes instead of ``einops``.

    Args:
        layer: a MONAI ``BasicLayer``.

    Examples:
        >>> enc = swin_encoder(feature_size=12, depths=(2,), num_heads=(3,))
        >>> stage = enc.body[2]
        >>> stage(torch.zeros(1, 12, 5, 6, 7)).shape
        torch.Size([1, 24, 3, 3, 4])
    """

    def __init__(self, layer: BasicLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dims = x.shape[0], tuple(int(n) for n in x.shape[2:])
        window, shift = get_window_size(dims, self.layer.window_size, self.layer.shift_size)
        padded = [int(np.ceil(n / w)) * w for n, w in zip(dims, window)]
        mask = compute_mask(padded, window, shift, x.device)
        h = x.movedim(1, -1).contiguous()  # channels last, as the blocks expect
        for block in self.layer.blocks:
            h = block(h, mask)
        h = h.view(b, *dims, -1)
        if self.layer.downsample is not None:
            h = self.layer.downsample(h)
        return h.movedim(-1, 1).contiguous()


class ChannelLayerNorm(nn.Module):
    """Parameter-free layer norm over the channels of each voxel of ``(B, C, ...)`` (MONAI's ``normalize=True``).

    Examples:
        >>> y = ChannelLayerNorm()(torch.randn(2, 8, 3, 3, 3) * 5 + 1)
        >>> bool(y.mean(dim=1).abs().max() < 1e-5)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), [int(x.shape[1])]).movedim(-1, 1)


def swin_encoder(
    spatial_dims: int = 3,
    in_channels: int = 1,
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    patch_size: int = 2,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> Encoder:
    """MONAI's Swin transformer encoder (the Swin UNETR / SA-Swin backbone) as an :class:`Encoder`.

    Built by MONAI's ``SwinTransformer`` (arguments named as in ``SwinUNETR``), whose patch embedding and stages
    are taken out in order: ``Sequential(patch embedding, dropout, stage 1, ..., stage n, channel layer norm)``.
    Any input size works (MONAI pads inside; see the module docstring); the output has ``feature_size * 2**len(depths)``
    channels on a grid ``patch_size * 2**len(depths)`` times coarser (rounded up).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for a T1w volume, 2 with the symmetry model's difference channel).
        feature_size: channels after the patch embedding (48 in Swin UNETR and SA-Swin; a multiple of 12).
        depths: transformer blocks per stage (pairs of a window and a shifted-window block).
        num_heads: attention heads per stage.
        window_size: window edge in patches (7 in the papers; clipped to smaller grids).
        patch_size: patch edge in voxels.
        mlp_ratio: hidden width of the blocks' MLP relative to their width.
        drop_rate: dropout after the patch embedding and in the MLPs.
        attn_drop_rate: dropout of the attention weights.
        drop_path_rate: stochastic depth, rising linearly over the blocks.

    Examples:
        >>> enc = swin_encoder(feature_size=12)
        >>> enc.out_channels, enc.name
        (192, 'swin')
        >>> enc(torch.zeros(2, 1, 42, 52, 44)).shape  # the 4 mm model grid
        torch.Size([2, 192, 2, 2, 2])
        >>> enc(torch.zeros(1, 1, 10, 26, 22)).shape  # a hemisphere of the 8 mm grid
        torch.Size([1, 192, 1, 1, 1])
    """
    if not 1 <= len(depths) <= 4 or len(depths) != len(num_heads):
        raise ValueError(f"depths and num_heads need one entry per stage (1 to 4 stages, as MONAI builds), got "
                         f"{len(depths)} and {len(num_heads)}")
    net = SwinTransformer(
        in_chans=in_channels,
        embed_dim=feature_size,
        window_size=(window_size,) * spatial_dims,
        patch_size=(patch_size,) * spatial_dims,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        drop_path_rate=drop_path_rate,
        spatial_dims=spatial_dims,
        downsample="merging",
    )
    stages: list[nn.Module] = [net.patch_embed, net.pos_drop]
    for index in range(1, len(depths) + 1):
        stages.append(SwinStage(getattr(net, f"layers{index}")[0]))
    stages.append(ChannelLayerNorm())
    return Encoder(nn.Sequential(*stages), out_channels=feature_size * 2 ** len(depths), name="swin")
