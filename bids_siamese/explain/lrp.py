"""Layer-wise relevance propagation (LRP) for the 3D Siamese encoders, through captum: the explained targets.

The network is first canonised (:mod:`bids_siamese.explain.canonize`: an equivalent graph that captum's
:class:`~captum.attr.LRP` handles exactly) and given its rules (:mod:`bids_siamese.explain.rules`:
``epsilon_plus`` by default, ``epsilon`` for exact conservation). Here the target is added as a last layer,
a fixed readout ``sum_k w_k e_k`` of the embedding, and its relevance is propagated to the voxels.

Relevance *targets* (what is explained), from the scan's embedding ``u`` (unit length when the model
L2-normalises; the normalisation itself, being scale-free, is not propagated through: relevance is
assigned to the pre-normalisation embedding, which is proportional to ``u``):

* ``embedding`` (as in the twin-identification paper): the embedding summed over its dimensions,
  ``sum_k u_k``;
* ``embedding_abs`` (the default of :func:`bids_siamese.explain.run.run_explain`): ``sum_k |u_k|``. The sign of
  an embedding dimension is arbitrary, so with the signed sum dimensions of opposite sign cancel and a
  scan's target can be near zero or negative; with the absolute values every dimension contributes its
  magnitude. On the demo dataset this target ranks the planted family regions highest (docs/benchmarks.md);
* ``distance``: the distance of a pair of scans. Both distances decompose exactly over embedding
  dimensions (cosine: ``1 - u.v = sum_k (u_k - v_k)^2 / 2``; euclidean: ``d = sum_k (e_k - f_k)^2 / d``);
  each scan of the pair receives half of every dimension's share, which LRP propagates to its voxels, so
  the two maps together sum to ``d``.

Every target is written as per-dimension *shares* ``c_k`` of the explained value (``sum_k c_k``); the readout
weights are ``w_k = c_k / e_k``. :func:`relevance_maps` explains a batch of scans, each with its own shares, in
one LRP pass on the model's device (per-scan normalisations: one scan at a time).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from captum.attr import LRP
from torch import nn

from .canonize import CanonicalModel, ScanReadout, canonize
from .rules import attach_rules

__all__ = [
    "TARGETS",
    "distance_shares",
    "embedding_network",
    "embedding_shares",
    "lrp_memory_gb",
    "relevance_distance_to",
    "relevance_embedding",
    "relevance_maps",
    "relevance_pair_distance",
]

TARGETS = ("embedding", "embedding_abs", "distance")


def embedding_network(model: nn.Module) -> tuple[nn.Module, bool]:
    """The part of a bids-siamese model that maps one scan to its *pre-normalisation* embedding.

    Args:
        model: a :class:`~bids_siamese.models.heads.SiameseEncoder`, a
            :class:`~bids_siamese.models.heads.LongitudinalSiamese` (its shared encoder) or any network mapping
            ``(B, 1, X, Y, Z)`` to ``(B, D)``.

    Returns:
        ``(network, normalised)``: a copy without the final L2 normalisation, and whether the model's
        embeddings are L2-normalised.
    """
    net = getattr(model, "module", model)
    if hasattr(net, "encoder") and hasattr(net, "fuse"):
        net = net.encoder
    net = copy.deepcopy(net).eval()
    head = getattr(net, "head", None)
    normalised = bool(getattr(head, "normalize", False))
    if head is not None and hasattr(head, "normalize"):
        head.normalize = False
    return net, normalised


class _Explained(nn.Module):
    """Canonised network followed by the per-scan readout (the LRP target)."""

    def __init__(self, body: nn.Module, weights: torch.Tensor):
        super().__init__()
        self.body = body
        self.readout = ScanReadout(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.body(x))


def _as_batch(volumes: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Scans as a float32 ``(B, 1, X, Y, Z)`` tensor: one volume ``(X, Y, Z)``, a stack ``(B, X, Y, Z)`` or a batch."""
    x = volumes if isinstance(volumes, torch.Tensor) else torch.as_tensor(np.asarray(volumes, dtype=np.float32))
    x = x.float()
    if x.dim() == 3:
        x = x[None, None]
    elif x.dim() == 4:
        x = x[:, None]
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"scans must be (X, Y, Z), (B, X, Y, Z) or (B, 1, X, Y, Z), got {tuple(x.shape)}")
    return x.to(device) if device is not None else x


def _single(volume: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    x = _as_batch(volume, device)
    if x.shape[0] != 1:
        raise ValueError("explain one scan at a time (a 3D volume or a (1, 1, X, Y, Z) tensor)")
    return x


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    ok = den.abs() > tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _canonical(model: nn.Module | CanonicalModel) -> CanonicalModel:
    return model if isinstance(model, CanonicalModel) else canonize(model)


def embedding_shares(e: torch.Tensor, target: str = "embedding", normalised: bool = True) -> torch.Tensor:
    """Per-dimension shares of an embedding target, per scan.

    Args:
        e: pre-normalisation embeddings ``(B, D)`` (or ``(D,)``).
        target: ``embedding`` (``sum_k u_k``) or ``embedding_abs`` (``sum_k |u_k|``).
        normalised: whether the model's embeddings are unit length (``u = e / |e|``); else ``u = e``.

    Examples:
        >>> embedding_shares(torch.tensor([[3.0, -4.0]]), "embedding_abs").tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if target not in ("embedding", "embedding_abs"):
        raise ValueError(f"target must be embedding or embedding_abs here, got {target!r}")
    u = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalised else e
    return u.abs() if target == "embedding_abs" else u


def relevance_maps(canon: CanonicalModel, volumes: np.ndarray | torch.Tensor, shares: torch.Tensor,
                   embeddings: torch.Tensor | None = None, rules: str = "epsilon_plus", epsilon: float = 1e-9
                   ) -> np.ndarray:
    """LRP relevance maps of a batch of scans, each for its own target ``sum_k shares_bk``.

    Runs on the canonised model's device. Per-scan normalisations (``canon.needs_calibration``) are explained
    one scan at a time, anything else in one pass; the maps are the same either way (the rules' stabilisers are
    per scan).

    Args:
        canon: the canonised embedding network (:func:`canonize` of :func:`embedding_network`).
        volumes: the scans on the model grid, ``(X, Y, Z)``, ``(B, X, Y, Z)`` or ``(B, 1, X, Y, Z)``.
        shares: per-dimension shares of each scan's target, ``(B, D)`` (:func:`embedding_shares`,
            :func:`distance_shares`).
        embeddings: the scans' pre-normalisation embeddings ``(B, D)`` when already computed (saves a forward
            pass); computed here otherwise.
        rules: rule set (``epsilon_plus`` or ``epsilon``).
        epsilon: the rules' absolute stabiliser.

    Returns:
        Relevance per voxel, ``(B, X, Y, Z)`` float32 on the CPU; each map sums (up to bias absorption and the
        rules' stabilisers) to ``shares[b].sum()``.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(1), nn.Linear(8, 3, bias=False))
        >>> vols = np.random.default_rng(0).random((2, 2, 2, 2)).astype(np.float32)
        >>> canon = canonize(net)
        >>> e = canon.embed(torch.as_tensor(vols)[:, None])
        >>> maps = relevance_maps(canon, vols, e, e, rules="epsilon")
        >>> np.allclose(maps.reshape(2, -1).sum(1), e.sum(1).numpy(), rtol=1e-4)
        True
    """
    device = canon.device
    x = _as_batch(volumes, device)
    shares = torch.as_tensor(shares, dtype=torch.float32).reshape(x.shape[0], -1).to(device)
    if canon.needs_calibration:  # the merged weights hold one scan's statistics
        return np.concatenate([relevance_maps(canon, x[i:i + 1], shares[i:i + 1], None, rules, epsilon)
                               for i in range(x.shape[0])])
    e = canon.embed(x) if embeddings is None else torch.as_tensor(embeddings, dtype=torch.float32).to(device)
    weights = _safe_ratio(shares, e.reshape(x.shape[0], -1))
    explained = _Explained(canon.module, weights).eval()
    attach_rules(explained, rules=rules, epsilon=epsilon)
    relevance = LRP(explained).attribute(x.clone().requires_grad_(True), target=0)
    return relevance.detach()[:, 0].cpu().numpy().astype(np.float32)


#: Memory of one scan's LRP pass, relative to the scan's input and leaf-layer outputs (captum keeps every layer's
#: input and output, autograd their gradients; measured 3.4-6.8x for small and 4.0-4.7x for resnet18 at 2 mm, CPU).
LRP_MEMORY_FACTOR = 8.0


def lrp_memory_gb(canon: CanonicalModel, shape: Sequence[int]) -> float:
    """Estimated memory (GB) of explaining one scan of spatial ``shape``: :data:`LRP_MEMORY_FACTOR` times the
    bytes of its input and of every leaf layer's output, counted in one forward pass (on the model's device).

    Examples:
        >>> canon = canonize(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(1)))
        >>> round(lrp_memory_gb(canon, (64, 64, 64)) * 1024 ** 3 / LRP_MEMORY_FACTOR / 64 ** 3 / 4)  # input, conv, ReLU
        5
    """
    sizes = [int(np.prod(shape)) * 4]
    leaves = [m for m in canon.module.modules() if len(list(m.children())) == 0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in leaves]
    try:
        canon.embed(torch.zeros((1, 1, *shape), device=canon.device))
    finally:
        for hook in hooks:
            hook.remove()
    return LRP_MEMORY_FACTOR * sum(sizes) / 1024 ** 3


def relevance_embedding(model: nn.Module | CanonicalModel, volume: np.ndarray | torch.Tensor, target: str = "embedding",
                        normalised: bool = True, rules: str = "epsilon_plus", epsilon: float = 1e-9) -> np.ndarray:
    """LRP relevance map of one scan for its embedding.

    Args:
        model: the embedding network (pre-normalisation, see :func:`embedding_network`) or its
            :func:`canonize` result (faster when explaining many scans).
        volume: the scan on the model grid, ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)``.
        target: ``embedding`` (``sum_k u_k``) or ``embedding_abs`` (``sum_k |u_k|``).
        normalised: whether the model's embeddings are unit length (``u = e / |e|``); else ``u = e``.
        rules: rule set (``epsilon_plus`` or ``epsilon``).
        epsilon: the epsilon rule's stabiliser.

    Returns:
        Relevance per voxel, same spatial shape as ``volume`` (float32), summing (up to bias absorption)
        to the target.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Conv3d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(1),
        ...                     nn.Linear(2 * 6 ** 3, 4, bias=False))
        >>> vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
        >>> r = relevance_embedding(net, vol, normalised=False, rules="epsilon")
        >>> e = net(torch.as_tensor(vol)[None, None]).sum().item()
        >>> bool(abs(r.sum() - e) < 1e-3 * max(1.0, abs(e)))
        True
    """
    if target not in ("embedding", "embedding_abs"):
        raise ValueError(f"target must be embedding or embedding_abs here, got {target!r}")
    canon = _canonical(model)
    x = _single(volume, canon.device)
    e = canon.embed(x)
    return relevance_maps(canon, x, embedding_shares(e, target, normalised), e, rules, epsilon)[0]


def distance_shares(e_a: torch.Tensor, e_b: torch.Tensor, distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-dimension decomposition of a pair distance, half to each scan.

    Args:
        e_a: embedding of the first scan (pre-normalisation), shape ``(D,)`` (or ``(B, D)``: one pair per row).
        e_b: embedding of the second scan.
        distance: ``cosine`` (``1 - cos``) or ``euclidean``.

    Returns:
        ``(c_a, c_b)``, each ``(D,)`` and non-negative, with ``c_a.sum() + c_b.sum()`` equal to the distance.

    Examples:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> ca, cb = distance_shares(a, b, "cosine")
        >>> round(float(ca.sum() + cb.sum()), 6)
        1.0
        >>> ca, cb = distance_shares(a, b, "euclidean")
        >>> round(float(ca.sum() + cb.sum()), 4)
        2.2361
    """
    if distance == "cosine":
        u = e_a / e_a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        v = e_b / e_b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        per_dim = (u - v) ** 2 / 2.0
    elif distance == "euclidean":
        diff2 = (e_a - e_b) ** 2
        per_dim = diff2 / diff2.sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    else:
        raise ValueError(f"distance must be cosine or euclidean, got {distance!r}")
    return per_dim / 2.0, per_dim / 2.0


def relevance_pair_distance(model: nn.Module | CanonicalModel, volume_a: np.ndarray | torch.Tensor,
                            volume_b: np.ndarray | torch.Tensor, distance: str = "cosine",
                            rules: str = "epsilon_plus", epsilon: float = 1e-9) -> tuple[np.ndarray, np.ndarray, float]:
    """LRP relevance maps of a pair of scans for their embedding distance.

    Args:
        model: the embedding network (pre-normalisation) or its :func:`canonize` result.
        volume_a: first scan on the model grid.
        volume_b: second scan.
        distance: ``cosine`` or ``euclidean`` (as the model was trained).
        rules: rule set.
        epsilon: the epsilon rule's stabiliser.

    Returns:
        ``(relevance_a, relevance_b, distance_value)``; the two maps together sum (up to bias absorption) to
        the distance.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(1), nn.Linear(27, 3, bias=False))
        >>> rng = np.random.default_rng(1)
        >>> ra, rb, d = relevance_pair_distance(net, rng.random((3, 3, 3)), rng.random((3, 3, 3)), rules="epsilon")
        >>> bool(abs(ra.sum() + rb.sum() - d) < 1e-4)
        True
    """
    canon = _canonical(model)
    x = torch.cat([_single(volume_a, canon.device), _single(volume_b, canon.device)])
    e = canon.embed(x)
    ca, cb = distance_shares(e[0], e[1], distance)
    maps = relevance_maps(canon, x, torch.stack([ca, cb]), e, rules, epsilon)
    return maps[0], maps[1], float(ca.sum() + cb.sum())


def relevance_distance_to(model: nn.Module | CanonicalModel, volume: np.ndarray | torch.Tensor,
                          other_embedding: torch.Tensor | np.ndarray, distance: str = "cosine",
                          rules: str = "epsilon_plus", epsilon: float = 1e-9) -> tuple[np.ndarray, float]:
    """LRP map of one scan for its share of the distance to another scan's (pre-normalisation) embedding.

    The same as the first map of :func:`relevance_pair_distance`, without propagating the other scan.

    Returns:
        ``(relevance, the scan's share of the distance)`` (the share is half the distance).

    Examples:
        >>> net = nn.Sequential(nn.Flatten(1), nn.Linear(8, 3, bias=False))
        >>> rng = np.random.default_rng(2)
        >>> a, b = rng.random((2, 2, 2)), rng.random((2, 2, 2))
        >>> eb = net(torch.as_tensor(b, dtype=torch.float32).reshape(1, 1, 2, 2, 2))[0].detach()
        >>> r, share = relevance_distance_to(net, a, eb, rules="epsilon")
        >>> bool(abs(r.sum() - share) < 1e-5)
        True
    """
    canon = _canonical(model)
    x = _single(volume, canon.device)
    e = canon.embed(x)
    other = torch.as_tensor(np.asarray(other_embedding), dtype=e.dtype).reshape(1, -1).to(e.device)
    c, _ = distance_shares(e, other, distance)
    return relevance_maps(canon, x, c, e, rules, epsilon)[0], float(c.sum())


def explain_scans(model: nn.Module, volumes: Iterable[np.ndarray], target: str = "embedding",
                  rules: str = "epsilon_plus") -> list[np.ndarray]:
    """Relevance maps of several scans for a bids-siamese model (embedding targets).

    Args:
        model: a trained bids-siamese model (see :func:`embedding_network`).
        volumes: scans on the model grid.
        target: ``embedding`` or ``embedding_abs``.
        rules: rule set.
    """
    net, normalised = embedding_network(model)
    canon = canonize(net)
    return [relevance_embedding(canon, v, target=target, normalised=normalised, rules=rules) for v in volumes]
