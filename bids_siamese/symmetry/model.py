"""The Siamese hemisphere model: one shared 3D encoder on the left hemisphere and on the mirrored right
hemisphere, a fusion of the two, and two outputs:

* ``logit`` of p(abnormal asymmetry) - symmetric in the two hemispheres (swapping them changes nothing);
* ``side_logit`` of p(the abnormality is in the left hemisphere | abnormal) - antisymmetric by construction
  (swapping the hemispheres flips its sign), so the model cannot prefer a side.

The encoder is one of the backbones of :mod:`bids_siamese.models.backbones`, which return a feature map.
Because the right hemisphere is mirrored before it is encoded, the two feature maps are spatially aligned:
feature voxel ``v`` of both describes the same homologous place. Fusions (``fusion=``):

``difference`` (default)
    ``D = F_left - F_right`` voxel by voxel; average and maximum pooling of ``|D|`` and ``D`` feed a small
    MLP. Focal differences survive the maximum pooling, which a global embedding would average away.
``embedding``
    The classic Siamese: each hemisphere's feature map becomes an embedding (global pooling + MLP, the
    :class:`~bids_siamese.models.heads.EmbeddingHead`), fused as ``[|e_l - e_r|, e_l * e_r]``.
``cross_attention``
    In the spirit of SA-Swin (symmetry-aware cross-attention between an image and its mirror, MICCAI 2024):
    the feature voxels become tokens (projection + a learned encoding of their normalised position); each
    hemisphere's tokens attend to the other hemisphere's tokens (shared multi-head attention), so every place
    is compared with the best-matching content around its homologue rather than with exactly the mirrored
    voxel (robust to imperfect registration and normal anatomical shifts). ``D = token - attended`` is pooled
    as in ``difference``, in both directions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from ..models.backbones import Encoder, build_backbone
from ..models.heads import EmbeddingHead
from ..models.registry import register_model

FUSIONS = ("difference", "embedding", "cross_attention")
#: Largest magnitude of the standardised difference channel.
REFERENCE_CLIP = 10.0


#: Values of the training volumes read at once by :meth:`SymmetrySiamese.set_reference` (2**25 float32: 128 MB).
REFERENCE_CHUNK_VALUES = 2 ** 25


def split_hemispheres(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, mirrored right)`` halves of a batch ``(B, C, X, Y, Z)`` on a grid symmetric about x = 0.

    The left hemisphere is ``x[..., :X // 2, :, :]``; the right one is flipped along x so that both halves
    have the same orientation (medial side last). An odd middle slice is dropped.

    Examples:
        >>> x = torch.arange(4.0).reshape(1, 1, 4, 1, 1)
        >>> [h.flatten().tolist() for h in split_hemispheres(x)]
        [[0.0, 1.0], [3.0, 2.0]]
    """
    nx = x.shape[2]
    half = nx // 2
    left = x[:, :, :half]
    right = torch.flip(x[:, :, nx - half:], dims=[2])
    return left, right


def _layers(module: nn.Module) -> list[nn.Module]:
    """The layers of a plain ``nn.Sequential``, nested plain sequences flattened (same computation)."""
    if type(module) is not nn.Sequential:
        return [module]
    out: list[nn.Module] = []
    for child in module:
        out.extend(_layers(child))
    return out


def _middle_level(layers: list[nn.Module], in_channels: int, stride: int = 8) -> tuple[int, int]:
    """Index and channels of the deepest layer whose output grid is at most ``stride`` times coarser than the
    input (found with a dry run on a 32^3 volume); -1 and the input channels when none is."""
    best, channels = -1, in_channels
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    with torch.no_grad():
        h = torch.zeros(1, in_channels, 32, 32, 32)
        for index, layer in enumerate(layers):
            h = layer(h)
            if h.dim() == 5 and min(h.shape[2:]) >= 32 // stride:
                best, channels = index, int(h.shape[1])
    for m, mode in zip(layers, modes):
        m.train(mode)
    return best, channels


def _pool_stats(d: torch.Tensor) -> torch.Tensor:
    """``[mean |d|, max |d|, mean d, max d]`` over the spatial/token axis of ``(B, C, N)``."""
    a = d.abs()
    return torch.cat([a.mean(dim=2), a.amax(dim=2), d.mean(dim=2), d.amax(dim=2)], dim=1)


class CrossHemisphereAttention(nn.Module):
    """Tokens of hemisphere ``a`` attend to the tokens of hemisphere ``b``; returns ``content_a - attended``.

    Args:
        channels: encoder feature channels.
        dim: token width.
        heads: attention heads.

    Examples:
        >>> att = CrossHemisphereAttention(8, dim=16, heads=2)
        >>> f = torch.randn(2, 8, 2, 3, 2)
        >>> att(f, f).shape
        torch.Size([2, 16, 12])
    """

    def __init__(self, channels: int, dim: int = 64, heads: int = 4):
        super().__init__()
        self.content = nn.Linear(channels, dim)
        self.position = nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    @staticmethod
    def _coords(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
                for n in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        pos = self.position(self._coords(tuple(f_a.shape[2:]), f_a.device))[None]
        c_a = self.content(f_a.flatten(2).transpose(1, 2))
        c_b = self.content(f_b.flatten(2).transpose(1, 2))
        attended, _ = self.attention(self.norm_q(c_a + pos), self.norm_k(c_b + pos), c_b, need_weights=False)
        return (c_a - attended).transpose(1, 2)


class SymmetrySiamese(nn.Module):
    """Shared encoder on both hemispheres, fusion, abnormality and side logits (see the module docstring).

    Args:
        encoder: a backbone :class:`~bids_siamese.models.backbones.Encoder` (shared by both hemispheres).
        fusion: ``difference``, ``embedding`` or ``cross_attention``.
        embedding_dim: embedding size (``embedding`` fusion) or token width (``cross_attention``).
        hidden: width of the MLPs.
        heads: attention heads (``cross_attention``).
        dropout: dropout in the MLPs.
        difference_channel: encode each hemisphere as two channels, itself and its difference from the
            mirrored other hemisphere (``[l, l - r]`` and ``[r, r - l]``), with an encoder built for two input
            channels. The weights stay shared and swapping the hemispheres still swaps the inputs, so the
            symmetry properties hold; the explicit difference makes a focal asymmetry visible to the first
            convolution, which trains much faster on a CPU than letting the encoder discover it. After
            :meth:`set_reference` the difference is standardised by the training population.

    Examples:
        >>> from bids_siamese.models.backbones import small_encoder
        >>> x = torch.randn(2, 1, 16, 16, 16)
        >>> for fusion in FUSIONS:
        ...     m = SymmetrySiamese(small_encoder(channels=(4, 8)), fusion=fusion, embedding_dim=16).eval()
        ...     logit, side = m(x)
        ...     _, side_flipped = m(torch.flip(x, dims=[2]))
        ...     print(fusion, tuple(logit.shape), bool(torch.allclose(side, -side_flipped, atol=1e-5)))
        difference (2,) True
        embedding (2,) True
        cross_attention (2,) True
    """

    def __init__(self, encoder: Encoder, fusion: str = "difference", embedding_dim: int = 64, hidden: int = 64,
                 heads: int = 4, dropout: float = 0.2, difference_channel: bool = False):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}'; choose one of {', '.join(FUSIONS)}")
        self.encoder = encoder
        self.backbone_name = getattr(encoder, "name", "custom")  # build_symmetry_model names it
        self.embedding_dim = int(embedding_dim)
        self.difference_channel = bool(difference_channel)
        # reference of the hemisphere difference (set_reference); empty = none
        self.register_buffer("reference_mean", torch.zeros(0))
        self.register_buffer("reference_sd", torch.zeros(0))
        self.fusion = fusion
        channels = encoder.out_channels
        self._body = _layers(encoder.body)  # plain list: the modules stay registered under ``encoder``
        self.mid_index, mid_channels = _middle_level(self._body, 2 if difference_channel else 1)
        if fusion == "embedding":
            self.embed = EmbeddingHead(channels, out_channels=embedding_dim, normalize=False, pooling="avgmax")
            width = 2 * embedding_dim
            self.side = nn.Linear(embedding_dim, 1, bias=False)
        else:
            if fusion == "cross_attention":
                self.cross = CrossHemisphereAttention(channels, dim=embedding_dim, heads=heads)
                channels = embedding_dim
            width = 4 * (channels + mid_channels)
            self.side = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
            self.position_head = nn.Linear(mid_channels, 1)
        self.classifier = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    @torch.no_grad()
    def set_reference(self, volumes: torch.Tensor | np.ndarray, smooth_vox: float = 1.0) -> None:
        """Standardise the difference channel by the lesion-free ``volumes`` ``(N, 1, X, Y, Z)`` or
        ``(N, X, Y, Z)``: their voxelwise median left-minus-mirrored-right difference and its robust spread (1.4826
        MAD, Gaussian-smoothed by ``smooth_vox`` voxels, floored at its 5th percentile), stored as buffers (saved
        with the weights). The channel then shows how unusual each voxel's asymmetry is for this population, as the
        asymmetry score's z-map does, instead of the raw difference in which normal anatomical asymmetry dominates.

        ``volumes`` (a tensor, an array or a memory-mapped stack) is read a few y planes of every scan at a time
        (:data:`REFERENCE_CHUNK_VALUES` values): the medians are per voxel, so the result is the same as from all
        volumes at once, with the memory of one chunk (issue 27)."""
        arr = volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else volumes
        if np.ndim(arr) == 5:
            arr = arr[:, 0]
        n, nx, ny, nz = np.shape(arr)
        planes = int(np.clip(REFERENCE_CHUNK_VALUES // max(1, n * nx * nz), 1, ny))
        mean, sd = torch.empty(nx // 2, ny, nz), torch.empty(nx // 2, ny, nz)
        for y0 in range(0, ny, planes):
            chunk = torch.from_numpy(np.asarray(arr[:, :, y0:y0 + planes], np.float32))[:, None]
            left, right = split_hemispheres(chunk)
            diff = (left - right)[:, 0]
            mean[:, y0:y0 + planes] = centre = diff.median(dim=0).values
            sd[:, y0:y0 + planes] = 1.4826 * (diff - centre).abs().median(dim=0).values
            del chunk, left, right, diff
        sd = sd.contiguous()
        if smooth_vox > 0:
            sd = torch.from_numpy(ndi.gaussian_filter(sd.numpy(), smooth_vox)).to(sd)
        inside = sd > 0
        floor = float(torch.quantile(sd[inside], 0.05)) if bool(inside.any()) else 1.0
        self.reference_mean = mean
        self.reference_sd = sd.clamp_min(max(floor, 1e-3))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final and middle feature maps of the left and the mirrored right hemisphere (one encoder pass on
        both): ``(final_left, final_right, middle_left, middle_right)``."""
        left, right = split_hemispheres(x)
        if self.difference_channel:
            diff = left - right
            if self.reference_mean.numel() and tuple(self.reference_mean.shape) == tuple(diff.shape[2:]):
                diff = ((diff - self.reference_mean) / self.reference_sd).clamp(-REFERENCE_CLIP, REFERENCE_CLIP)
            left, right = torch.cat([left, diff], dim=1), torch.cat([right, -diff], dim=1)
        h = torch.cat([left, right], dim=0)
        middle = h
        for index, layer in enumerate(self._body):
            h = layer(h)
            if index == self.mid_index:
                middle = h
        n = x.shape[0]
        return h[:n], h[n:], middle[:n], middle[n:]

    def forward(self, x: torch.Tensor, all_outputs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        """``(logit, side_logit)``, each of shape ``(B,)``; ``side_logit > 0`` means left. With ``all_outputs``:
        :meth:`forward_all`'s dict (the training forward: through ``model(x, all_outputs=True)`` it also runs in a
        DDP or ``torch.compile`` wrapper, which only have ``forward``)."""
        out = self.forward_all(x)
        return out if all_outputs else (out["logit"], out["side"])

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logit``, ``side`` and, except for the ``embedding`` fusion, ``positions``: one asymmetry logit per
        feature-map position in hemisphere coordinates ``(B, d, h, w)``, symmetric in the two hemispheres.
        Training supervises the positions with the simulated lesion (deep supervision), which teaches the shared
        encoder what a focal asymmetry looks like far faster than the image label alone."""
        f_l, f_r, m_l, m_r = self.features(x)
        if self.fusion == "embedding":
            e_l, e_r = self.embed(f_l), self.embed(f_r)
            logit = self.classifier(torch.cat([(e_l - e_r).abs(), e_l * e_r], dim=1)).squeeze(1)
            return {"logit": logit, "side": self.side(e_l - e_r).squeeze(1)}
        if self.fusion == "cross_attention":
            d_lr, d_rl = self.cross(f_l, f_r), self.cross(f_r, f_l)
        else:
            d_lr = (f_l - f_r).flatten(2)
            d_rl = -d_lr
        m_lr = (m_l - m_r).flatten(2)
        s_lr = torch.cat([_pool_stats(d_lr), _pool_stats(m_lr)], dim=1)
        s_rl = torch.cat([_pool_stats(d_rl), _pool_stats(-m_lr)], dim=1)
        logit = (self.classifier(s_lr) + self.classifier(s_rl)).squeeze(1) / 2.0
        side = (self.side(s_lr) - self.side(s_rl)).squeeze(1)
        positions = self.position_head(m_lr.abs().transpose(1, 2)).squeeze(2).reshape(x.shape[0], *m_l.shape[2:])
        return {"logit": logit, "side": side, "positions": positions}


def build_symmetry_model(backbone: str = "small", fusion: str = "difference", embedding_dim: int = 64,
                         hidden: int = 64, heads: int = 4, difference_channel: bool = False) -> SymmetrySiamese:
    """A fresh :class:`SymmetrySiamese` with the named backbone.

    Examples:
        >>> build_symmetry_model("small").fusion
        'difference'
    """
    encoder = build_backbone(backbone, spatial_dims=3, in_channels=2 if difference_channel else 1)
    model = SymmetrySiamese(encoder, fusion=fusion, embedding_dim=embedding_dim, hidden=hidden, heads=heads,
                            difference_channel=difference_channel)
    model.backbone_name = backbone
    return model


def symmetry_model_from_card(card: dict, state: dict) -> SymmetrySiamese:
    """An untrained :class:`SymmetrySiamese` shaped like a checkpoint's (its card and its weights, whose
    reference buffers are sized by the training grid), ready for ``load_state_dict``.

    Examples:
        >>> m = build_symmetry_model("small", difference_channel=True)
        >>> card = {"backbone": "small", "embedding_dim": 64, "hyperparameters": {"difference_channel": True}}
        >>> symmetry_model_from_card(card, m.state_dict()).difference_channel
        True
    """
    hyper = card.get("hyperparameters", {})
    model = build_symmetry_model(card["backbone"], hyper.get("fusion", "difference"), int(card["embedding_dim"]),
                                 difference_channel=bool(hyper.get("difference_channel", False)))
    for name in ("reference_mean", "reference_sd"):
        if name in state:
            setattr(model, name, torch.zeros_like(state[name]))
    return model


#: load_checkpoint rebuilds symmetry checkpoints with this factory (registered on import of this module).
register_model(symmetry_model_from_card, task="symmetry")


def predict_logits(model: SymmetrySiamese, volumes: torch.Tensor,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logit, side_logit)`` for a stack of model-grid volumes ``(N, X, Y, Z)`` or ``(N, 1, X, Y, Z)``, in eval
    mode. The logits keep the ranking that float32 probabilities lose once they saturate at 1.

    Examples:
        >>> m = build_symmetry_model("small").eval()
        >>> logit, side = predict_logits(m, torch.randn(3, 32, 32, 32))
        >>> tuple(logit.shape), tuple(side.shape)
        ((3,), (3,))
    """
    if volumes.dim() == 4:
        volumes = volumes[:, None]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # CPU inputs go where the model is; the results come back to the CPU
    logits, sides = [], []
    with torch.no_grad():
        for start in range(0, volumes.shape[0], batch_size):
            logit, side = model(volumes[start:start + batch_size].float().to(device))
            logits.append(logit.float().cpu())
            sides.append(side.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(sides)


def predict_proba(model: SymmetrySiamese, volumes: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_abnormal, p_left)`` for a stack of model-grid volumes ``(N, X, Y, Z)`` or ``(N, 1, X, Y, Z)``.

    Examples:
        >>> m = build_symmetry_model("small").eval()
        >>> p, side = predict_proba(m, torch.randn(3, 32, 32, 32))
        >>> tuple(p.shape), bool(((p >= 0) & (p <= 1)).all())
        ((3,), True)
    """
    logit, side = predict_logits(model, volumes, batch_size)
    return torch.sigmoid(logit), torch.sigmoid(side)


def side_loss(side_logit: torch.Tensor, label: torch.Tensor, is_left: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the side, counted only on abnormal samples (0 when there are none).

    Examples:
        >>> float(side_loss(torch.zeros(2), torch.zeros(2), torch.ones(2)))
        0.0
    """
    keep = label > 0.5
    if not bool(keep.any()):
        return side_logit.sum() * 0.0
    return F.binary_cross_entropy_with_logits(side_logit[keep], is_left[keep].float())
