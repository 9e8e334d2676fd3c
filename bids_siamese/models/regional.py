"""Atlas-region Siamese embedding (``--backbone regional``): a twin model that learns from a few dozen pairs.

The CNN backbones pool a whole brain into one vector; on registered brains whose family resemblance lives in
the *shape* of a few structures, that vector mostly describes the individual, and with tens of training
families the networks memorise them (``docs/benchmarks.md``). This model keeps the spatial pattern and learns
only *where* to compare:

1. standardise each voxel by the training population (``reference_mean``, ``reference_sd``: buffers set
   from the training scans by :meth:`RegionalEncoder.set_reference`, saved with the weights);
2. average blocks of about 4 mm (2x2x2 voxels at the default 2 mm grid; none at 4 mm or coarser);
3. per atlas region (a "part", the bundled Harvard-Oxford atlas by default, restricted to the training
   population's brain), centre the pattern and scale it to unit length;
4. weight every part by ``sqrt(softmax(logit))``, the only learned parameters (one per region).

The embedding is the concatenation of the weighted parts; it has unit length, and the cosine similarity of
two scans is the weighted mean over regions of their within-region pattern correlation. The triplet loss
learns the region weights. Because the similarity is a sum over voxels, it decomposes exactly into
per-voxel contributions (:meth:`RegionalEncoder.contributions`), which is what ``explain`` maps for this
model instead of LRP.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: ``--backbone`` names of the atlas-region models (``regional_cnn``: twin task only).
REGIONAL_MODELS = ("regional", "regional_cnn")
#: Parts with fewer pooled voxels than this are left out (their correlation is noise).
MIN_PART_VOXELS = 8
#: The voxelwise reference spread is floored at this percentile of its in-brain values.
SD_FLOOR_PERCENTILE = 10.0
#: Training scans read at once for the population reference (:meth:`RegionalEncoder.set_reference`): 64 scans
#: are 0.4 GB as float64 at 2 mm, whatever the cohort's size.
REFERENCE_CHUNK = 64


def pooled_shape(shape: Sequence[int], pool: int) -> tuple[int, int, int]:
    """Grid shape after ``pool``-voxel average pooling with ``ceil_mode``.

    Examples:
        >>> pooled_shape((84, 104, 88), 2), pooled_shape((5, 5, 5), 2)
        ((42, 52, 44), (3, 3, 3))
    """
    return tuple(-(-int(s) // pool) for s in shape)  # type: ignore[return-value]


def pooled_affine(affine: np.ndarray, pool: int) -> np.ndarray:
    """Affine of the pooled grid: voxel ``k`` is the centre of fine voxels ``pool*k .. pool*k + pool - 1``.

    Examples:
        >>> pooled_affine(np.diag([2.0, 2.0, 2.0, 1.0]), 2)[:3, 3].tolist()
        [1.0, 1.0, 1.0]
    """
    scale = np.diag([pool, pool, pool, 1.0])
    scale[:3, 3] = (pool - 1) / 2.0
    return np.asarray(affine, dtype=float) @ scale


def running_moments(volumes: np.ndarray | torch.Tensor, masks: np.ndarray | None, rows: np.ndarray,
                    chunk: int = REFERENCE_CHUNK, after_chunk: Callable[[], None] | None = None
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(n, mean, m2, inside)`` of ``volumes[rows]`` over the scans, per voxel (flat arrays): the mean and the sum of squared
    deviations (float64, merged chunk by chunk with Chan et al.'s pairwise update, so no single pass over squares
    loses precision), and how many scans have the voxel inside the brain (``masks[rows]``, or the non-zero
    voxels without masks). Reads ``chunk`` rows at a time; ``after_chunk`` runs after each.

    Examples:
        >>> v = np.arange(24, dtype=np.float32).reshape(4, 1, 6)
        >>> n, mean, m2, inside = running_moments(v, None, np.arange(4), chunk=3)
        >>> n, bool(np.allclose(mean, v.mean(0))), bool(np.allclose(m2 / n, v.var(0))), inside.ravel()[:2].tolist()
        (4, True, True, [3, 4])
    """
    count, mean, m2, inside = 0, None, None, None
    for start in range(0, len(rows), max(1, int(chunk))):
        part = rows[start:start + max(1, int(chunk))]
        x = np.array(volumes[torch.as_tensor(part)] if isinstance(volumes, torch.Tensor) else volumes[part],
                     dtype=np.float64).reshape(len(part), -1)  # a copy: squared in place below
        m = np.asarray(masks[part]).reshape(len(part), -1) if masks is not None else x != 0
        c_inside = m.sum(axis=0, dtype=np.int64)
        c_mean = x.mean(axis=0)
        x -= c_mean
        c_m2 = np.square(x, out=x).sum(axis=0)
        del x, m  # before the next chunk is read: one chunk in memory, not two
        if mean is None:
            count, mean, m2, inside = len(part), c_mean, c_m2, c_inside
        else:
            total = count + len(part)
            delta = c_mean - mean
            mean = mean + delta * (len(part) / total)
            m2 = m2 + c_m2 + delta ** 2 * (count * len(part) / total)
            count, inside = total, inside + c_inside
        if after_chunk is not None:
            after_chunk()
    if mean is None:
        raise ValueError("no training scan to take the population reference from")
    return count, mean, m2, inside


def brain_majority(masks: np.ndarray, rows: np.ndarray, chunk: int = REFERENCE_CHUNK,
                   after_chunk: Callable[[], None] | None = None,
                   inside: Callable[[np.ndarray], np.ndarray] = np.asarray) -> np.ndarray:
    """Bool ``masks.shape[1:]`` (or the shape ``inside`` gives): the voxels inside at least half of ``masks[rows]``,
    counted ``chunk`` masks at a time (no copy of all of them); ``inside`` turns a chunk into its bool masks (e.g.
    the non-zero voxels of a volume stack); ``after_chunk`` runs after each chunk.

    Examples:
        >>> brain_majority(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0]], bool), np.array([0, 1, 2]), chunk=2).tolist()
        [True, True, False]
    """
    count = None
    for start in range(0, len(rows), max(1, int(chunk))):
        part = np.asarray(inside(masks[rows[start:start + max(1, int(chunk))]])).sum(axis=0, dtype=np.int64)
        count = part if count is None else count + part
        if after_chunk is not None:
            after_chunk()
    if count is None:  # no rows: nothing is inside
        return np.zeros(np.shape(inside(masks[:0]))[1:], dtype=bool)
    return count >= 0.5 * len(rows)


class RegionParts(nn.Module):
    """Atlas regions ("parts") on a pooled model grid, shared by the regional twin and longitudinal models.

    Buffers: ``positions`` (flat pooled-grid index of every used voxel), ``part`` (its part), ``part_label``
    (atlas label of each part) and ``part_count`` (voxels per part). Each distinct label of ``part_map`` with at
    least :data:`MIN_PART_VOXELS` voxels becomes a part.

    Args:
        grid_shape: shape of the model grid the inputs live on.
        part_map: labels on the pooled grid (``pooled_shape(grid_shape, pool)``), 0 = not used.
        pool: block size of the average pooling.
    """

    def __init__(self, grid_shape: Sequence[int], part_map: np.ndarray, pool: int = 2):
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.pool = int(pool)
        if np.shape(part_map) != pooled_shape(self.grid_shape, self.pool):
            raise ValueError(f"part map shape {np.shape(part_map)} does not fit grid {self.grid_shape} pooled by {pool}")
        flat = np.asarray(part_map, dtype=np.int64).ravel()
        labels, counts = np.unique(flat[flat > 0], return_counts=True)
        labels = labels[counts >= MIN_PART_VOXELS]
        if not len(labels):
            raise ValueError(f"no atlas region has {MIN_PART_VOXELS} or more voxels inside the brain")
        positions = np.flatnonzero(np.isin(flat, labels))
        part = np.searchsorted(labels, flat[positions])
        self.register_buffer("positions", torch.as_tensor(positions, dtype=torch.long))
        self.register_buffer("part", torch.as_tensor(part, dtype=torch.long))
        self.register_buffer("part_label", torch.as_tensor(labels, dtype=torch.long))
        self.register_buffer("part_count", torch.as_tensor(np.bincount(part, minlength=len(labels)),
                                                           dtype=torch.float32))

    @property
    def n_parts(self) -> int:
        """Number of regions (parts)."""
        return int(self.part_label.numel())

    @staticmethod
    def part_map_from_state(state: Mapping[str, torch.Tensor], grid_shape: Sequence[int], pool: int) -> np.ndarray:
        """The labelled pooled grid that a saved state dict's part buffers came from."""
        shape = pooled_shape(grid_shape, pool)
        part_map = np.zeros(int(np.prod(shape)), dtype=np.int64)
        part_map[state["positions"].numpy()] = state["part_label"].numpy()[state["part"].numpy()]
        return part_map.reshape(shape)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Block averages of ``x`` ``(B, 1, X, Y, Z)`` at the used positions: ``(B, P)``."""
        return F.avg_pool3d(x, self.pool, ceil_mode=True).flatten(1)[:, self.positions]

    def part_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-part sums ``(B, R)`` of per-position values ``(B, P)``."""
        return values.new_zeros(values.shape[0], self.n_parts).index_add_(1, self.part, values)


class RegionalEncoder(RegionParts):
    """Population-standardised, per-region normalised 4 mm patterns, weighted by learned region weights.

    Args:
        grid_shape: shape of the model grid the inputs live on.
        part_map: labels on the pooled grid (``pooled_shape(grid_shape, pool)``), 0 = not used. Each distinct
            label with at least :data:`MIN_PART_VOXELS` voxels becomes a part.
        pool: block size of the average pooling (2: 4 mm parts at the 2 mm grid).

    Examples:
        >>> labels = np.zeros((4, 4, 4), int); labels[:2] = 1; labels[2:] = 2
        >>> enc = RegionalEncoder((8, 8, 8), labels)
        >>> e = enc(torch.randn(3, 1, 8, 8, 8))
        >>> e.shape, [round(float(n), 4) for n in e.norm(dim=1)]
        (torch.Size([3, 64]), [1.0, 1.0, 1.0])
    """

    name = "regional"

    def __init__(self, grid_shape: Sequence[int], part_map: np.ndarray, pool: int = 2):
        super().__init__(grid_shape, part_map, pool)
        self.register_buffer("reference_mean", torch.zeros(1, 1, *self.grid_shape))
        self.register_buffer("reference_sd", torch.ones(1, 1, *self.grid_shape))
        self.logit = nn.Parameter(torch.zeros(self.n_parts))

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding: pooled voxels inside the parts."""
        return int(self.positions.numel())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], pool: int = 2) -> "RegionalEncoder":
        """Rebuild the module a saved state dict came from (the part layout is stored in its buffers)."""
        grid_shape = tuple(state["reference_mean"].shape[2:])
        return cls(grid_shape, cls.part_map_from_state(state, grid_shape, pool), pool)

    @torch.no_grad()
    def set_reference(self, volumes: np.ndarray | torch.Tensor, masks: np.ndarray | None = None,
                      idx: Sequence[int] | None = None, chunk: int = REFERENCE_CHUNK,
                      after_chunk: Callable[[], None] | None = None) -> None:
        """Voxelwise mean and spread (population sd) of the training scans ``volumes[idx]`` (``(N, 1, X, Y, Z)``:
        an array, a tensor, or anything indexable by rows such as a memory-mapped float16 stack; default all
        rows); the spread is floored at its :data:`SD_FLOOR_PERCENTILE` th percentile inside the brain (voxels
        inside at least half of the ``masks`` ``(N, X, Y, Z)``, same rows, or else of the non-zero voxels), so
        that nearly constant voxels do not blow up.

        The statistics are accumulated ``chunk`` scans at a time in float64 (:func:`running_moments`), so memory
        holds one chunk, not a float32 copy of every training scan; ``after_chunk`` runs after each chunk (e.g.
        to let go of a memory map's pages)."""
        rows = np.arange(len(volumes)) if idx is None else np.asarray(idx, dtype=np.int64)
        count, mean, m2, inside_count = running_moments(volumes, masks, rows, chunk, after_chunk)
        shape = self.reference_mean.shape
        mean_t = torch.from_numpy(mean.astype(np.float32)).reshape(shape)
        sd = torch.from_numpy(np.sqrt(m2 / max(count, 1)).astype(np.float32)).reshape(shape)
        inside = torch.from_numpy(inside_count.ravel() >= 0.5 * count)
        values = sd.flatten()[inside] if bool(inside.any()) else sd.flatten()
        floor = torch.quantile(values.double(), SD_FLOOR_PERCENTILE / 100).float().clamp_min(1e-6)
        self.reference_mean.copy_(mean_t)
        self.reference_sd.copy_(torch.maximum(sd, floor))

    def region_weights(self) -> torch.Tensor:
        """The learned weight of every part (softmax of the logits, sums to 1)."""
        return torch.softmax(self.logit.float(), dim=0)

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Per-part centred, unit-length 4 mm patterns ``(B, P)`` (before the region weights)."""
        pooled = self.pooled((x.float() - self.reference_mean) / self.reference_sd)
        centred = pooled - (self.part_sums(pooled) / self.part_count)[:, self.part]
        return centred * torch.rsqrt(self.part_sums(centred * centred).clamp_min(1e-12))[:, self.part]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = self.patterns(x)
            e = u * self.region_weights().sqrt()[self.part]
            return F.normalize(e, dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The per-scan embedding (same as ``forward``)."""
        return self.forward(x)

    def to_grid(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-position values ``(P,)`` spread over the model grid: each pooled voxel's value is shared equally by
        its fine voxels, so sums are kept (fine voxels past the grid edge are dropped)."""
        v = torch.as_tensor(values, dtype=torch.float32).flatten()
        shape = pooled_shape(self.grid_shape, self.pool)
        coarse = torch.zeros(int(np.prod(shape)))
        coarse[self.positions.cpu()] = v.cpu()
        fine = coarse.reshape(shape).repeat_interleave(self.pool, 0).repeat_interleave(self.pool, 1)
        fine = fine.repeat_interleave(self.pool, 2)[: self.grid_shape[0], : self.grid_shape[1], : self.grid_shape[2]]
        return (fine / self.pool ** 3).numpy()

    @torch.no_grad()
    def contributions(self, e_a: torch.Tensor | np.ndarray, e_b: torch.Tensor | np.ndarray | None = None
                      ) -> np.ndarray:
        """Exact per-voxel decomposition on the model grid, from one scan's embedding ``e_a`` ``(P,)`` (or two).

        With one embedding: ``e_a**2`` (sums to 1, the squared length of the embedding: where the model looks).
        With two: ``(e_a - e_b)**2 / 2`` (sums to their cosine distance ``1 - e_a . e_b``).
        """
        e_a = torch.as_tensor(e_a, dtype=torch.float32)
        values = e_a * e_a if e_b is None else 0.5 * (e_a - torch.as_tensor(e_b, dtype=torch.float32)) ** 2
        return self.to_grid(values)


class RegionalConvEncoder(RegionalEncoder):
    """Learned 3D convolutional features pooled per atlas region (``--backbone regional_cnn``).

    The CNN twin recipe that learns from tens of pairs: a small convolutional network computes feature maps
    from the population-standardised 4 mm blocks, and every feature map is compared region by region the way
    :class:`RegionalEncoder` compares intensities (per region and channel: centred, unit length, weighted by
    ``sqrt(softmax(logit))`` over all regions and channels). Channel 0 is the standardised intensity itself, so
    the intensity comparison stays available; the other ``channels`` are learned (two 3x3x3 convolutions,
    a 20 mm receptive field at 4 mm). The network has a few thousand weights instead of the millions of a
    whole-brain encoder, and its output keeps the spatial layout, so it neither collapses the brain into one
    vector that describes the individual nor has room to memorise the training families
    (``docs/benchmarks.md``). The embedding is a sum over blocks and channels, so the exact per-voxel
    decomposition of :meth:`RegionalEncoder.contributions` still holds (channels summed per block).

    Args:
        grid_shape: shape of the model grid the inputs live on.
        part_map: labels on the pooled grid (see :class:`RegionalEncoder`).
        pool: block size of the average pooling.
        channels: learned feature channels (4: a training step costs about 3 times the ``regional`` model's on
            the 2 mm grid on a CPU; 8 costs about 9 times, ``benchmarks/twins.py``).

    Examples:
        >>> labels = np.zeros((4, 4, 4), int); labels[:2] = 1; labels[2:] = 2
        >>> enc = RegionalConvEncoder((8, 8, 8), labels, channels=3)
        >>> with torch.no_grad():
        ...     e = enc(torch.randn(2, 1, 8, 8, 8))
        >>> e.shape, [round(float(n), 4) for n in e.norm(dim=1)]
        (torch.Size([2, 256]), [1.0, 1.0])
        >>> round(float(enc.region_weights().detach().sum()), 4)
        1.0
    """

    name = "regional_cnn"
    #: Learning-rate factor of the convolution weights relative to the region/channel logits.
    FEATURE_LR_FACTOR = 0.02

    def __init__(self, grid_shape: Sequence[int], part_map: np.ndarray, pool: int = 2, channels: int = 4):
        super().__init__(grid_shape, part_map, pool)
        self.channels = int(channels)
        self.features = nn.Sequential(
            nn.Conv3d(1, self.channels, 3, padding=1), nn.GELU(),
            nn.Conv3d(self.channels, self.channels, 3, padding=1))
        self.logit = nn.Parameter(torch.zeros(self.channels + 1, self.n_parts))

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding: pooled voxels inside the parts, times the channels (intensity included)."""
        return int(self.positions.numel()) * (self.channels + 1)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], pool: int = 2) -> "RegionalConvEncoder":
        """Rebuild the module a saved state dict came from (layout in the buffers, channels from the logits)."""
        grid_shape = tuple(state["reference_mean"].shape[2:])
        return cls(grid_shape, cls.part_map_from_state(state, grid_shape, pool), pool,
                   channels=int(state["logit"].shape[0]) - 1)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: the logits at ``lr``, the convolutions at ``lr * FEATURE_LR_FACTOR``."""
        return [{"params": [self.logit], "lr": lr},
                {"params": list(self.features.parameters()), "lr": lr * self.FEATURE_LR_FACTOR}]

    def channel_weights(self) -> torch.Tensor:
        """The learned weight ``(channels + 1, R)`` of every channel and part (softmax over all, sums to 1)."""
        return torch.softmax(self.logit.float().flatten(), dim=0).reshape(self.logit.shape)

    def region_weights(self) -> torch.Tensor:
        """The learned weight of every part, summed over channels (sums to 1)."""
        return self.channel_weights().sum(dim=0)

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Per-part, per-channel centred unit-length patterns ``(B, channels + 1, P)``."""
        z = F.avg_pool3d((x.float() - self.reference_mean) / self.reference_sd, self.pool, ceil_mode=True)
        maps = torch.cat([z, self.features(z)], dim=1).flatten(2)[:, :, self.positions]
        sums = maps.new_zeros(*maps.shape[:2], self.n_parts)
        centred = maps - (sums.index_add(2, self.part, maps) / self.part_count)[:, :, self.part]
        norms = sums.index_add(2, self.part, centred * centred).clamp_min(1e-12)
        return centred * torch.rsqrt(norms)[:, :, self.part]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            e = self.patterns(x) * self.channel_weights().sqrt()[:, self.part]
            return F.normalize(e.flatten(1), dim=1)

    def to_grid(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-feature values ``((channels + 1) * P,)`` summed over channels, spread over the model grid."""
        v = torch.as_tensor(values, dtype=torch.float32).flatten()
        if v.numel() == self.embedding_dim:
            v = v.reshape(self.channels + 1, -1).sum(dim=0)
        return super().to_grid(v)


class RegionalChange(RegionParts):
    """Longitudinal ``regional`` model: shared regional encoder, difference fusion, sparse linear classifier.

    Each session is embedded as the mean intensity of every atlas region (a proxy of its volume and contrast:
    atrophy lets darker CSF into a region's border). The fused feature is the later-minus-earlier difference,
    standardised by the training pairs (``feature_mean``, ``feature_sd``), and a linear layer with an L1 penalty
    (:meth:`penalty`, added to the loss by the training loop) turns it into the logit of p(decline): with a few
    pairs it keeps a few regions (ventricles and hippocampi on the demo).

    Args:
        grid_shape: model grid shape.
        part_map: atlas labels on the pooled grid (see :class:`RegionalEncoder`).
        pool: block size of the average pooling.
        l1: weight of the L1 penalty on the classifier's coefficients.

    Examples:
        >>> labels = np.zeros((4, 4, 4), int); labels[:2] = 1; labels[2:] = 2
        >>> model = RegionalChange((8, 8, 8), labels)
        >>> x = torch.randn(3, 1, 8, 8, 8)
        >>> model.embed(x).shape, model(x, x + 1).shape
        (torch.Size([3, 2]), torch.Size([3]))
    """

    name = "regional"

    def __init__(self, grid_shape: Sequence[int], part_map: np.ndarray, pool: int = 2, l1: float = 0.03):
        super().__init__(grid_shape, part_map, pool)
        self.l1 = float(l1)
        self.register_buffer("feature_mean", torch.zeros(self.n_parts))
        self.register_buffer("feature_sd", torch.ones(self.n_parts))
        self.classifier = nn.Linear(self.n_parts, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    @property
    def embedding_dim(self) -> int:
        """Length of the per-session embedding: one mean per region."""
        return self.n_parts

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], grid_shape: Sequence[int], pool: int = 2
                        ) -> "RegionalChange":
        """Rebuild the module a saved state dict came from (``grid_shape`` from the model card)."""
        return cls(grid_shape, cls.part_map_from_state(state, grid_shape, pool), pool)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-session embedding ``(B, R)``: the mean intensity of every region."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.part_sums(self.pooled(x.float())) / self.part_count

    @torch.no_grad()
    def set_feature_scale(self, differences: torch.Tensor | np.ndarray) -> None:
        """Mean and spread (floored at 1e-6) of the training pairs' embedding differences ``(N, R)``."""
        d = torch.as_tensor(np.asarray(differences, dtype=np.float32))
        self.feature_mean.copy_(d.mean(dim=0))
        self.feature_sd.copy_(d.std(dim=0, unbiased=False).clamp_min(1e-6))

    def fuse(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        """Logits from two sessions' embeddings (earlier first)."""
        z = ((e_b.float() - e_a.float()) - self.feature_mean) / self.feature_sd
        return self.classifier(z).squeeze(1)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.embed(x_a), self.embed(x_b))

    def penalty(self) -> torch.Tensor:
        """L1 penalty on the classifier's coefficients (sparse: a few regions decide)."""
        return self.l1 * self.classifier.weight.abs().sum()


def part_map_for(grid_shape: Sequence[int], affine: np.ndarray, atlas_labels, brain: np.ndarray,
                 pool: int = 2) -> np.ndarray:
    """Atlas labels on the pooled grid, kept where at least half of the pooled block is brain.

    Args:
        grid_shape: model grid shape.
        affine: model grid affine.
        atlas_labels: a callable ``(shape, affine) -> labels`` (e.g. a bound
            :func:`bids_siamese.explain.regions.labels_on_grid`).
        brain: boolean brain mask on the model grid (the training population's).
        pool: pooling block.
    """
    shape = pooled_shape(grid_shape, pool)
    labels = np.asarray(atlas_labels(shape, pooled_affine(affine, pool)), dtype=np.int64)
    b = torch.as_tensor(np.asarray(brain, dtype=np.float32))[None, None]
    inside = F.avg_pool3d(b, pool, ceil_mode=True)[0, 0].numpy() >= 0.5
    return np.where(inside, labels, 0)
