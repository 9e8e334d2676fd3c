"""Embedding distances and the batch-hard triplet loss with relative-aware negative mining."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISTANCES = ("cosine", "euclidean")


def pairwise_distance(embeddings: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """All pairwise distances ``(N, N)`` between rows of ``embeddings`` ``(N, D)``.

    ``cosine`` is ``1 - cos(a, b)`` (0..2); ``euclidean`` is the L2 distance (with a small epsilon inside the
    square root so that its gradient is finite at 0).

    Examples:
        >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> pairwise_distance(e, "cosine").round(decimals=3).tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
        >>> round(float(pairwise_distance(e, "euclidean")[0, 1]), 3)
        1.414
    """
    if distance == "cosine":
        unit = F.normalize(embeddings, dim=1)
        return (1.0 - unit @ unit.T).clamp_min(0.0)
    if distance == "euclidean":
        sq = (embeddings * embeddings).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)
        return torch.sqrt(d2 + 1e-12)
    raise ValueError(f"unknown distance '{distance}'; choose one of {', '.join(DISTANCES)}")


def pair_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Row-wise distance between ``a`` and ``b`` (both ``(N, D)``), same definitions as :func:`pairwise_distance`.

    Examples:
        >>> float(pair_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), "cosine")[0])
        1.0
    """
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(a, b, dim=1)).clamp_min(0.0)
    if distance == "euclidean":
        return torch.sqrt(((a - b) ** 2).sum(dim=1) + 1e-12)
    raise ValueError(f"unknown distance '{distance}'; choose one of {', '.join(DISTANCES)}")


@dataclass
class TripletOutput:
    """Loss and mining statistics of one batch.

    Attributes:
        loss: mean hinge loss over anchors that have a positive and a negative (0 with grad when none).
        n_anchors: anchors that contributed.
        active_fraction: fraction of those anchors with a non-zero loss.
        positive_distance: mean anchor-positive distance (of the mined positives).
        negative_distance: mean anchor-negative distance (of the mined negatives).
        negative_index: per anchor, the index of the mined negative (-1 where the anchor was not used).
    """

    loss: torch.Tensor
    n_anchors: int
    active_fraction: float
    positive_distance: float
    negative_distance: float
    negative_index: torch.Tensor


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    positive: torch.Tensor,
    related: torch.Tensor,
    margin: float = 0.2,
    distance: str = "cosine",
) -> TripletOutput:
    """Triplet loss with batch-hard mining: hardest positive, closest non-relative as the negative.

    For every anchor ``i`` with at least one positive and one non-relative in the batch, the loss is
    ``max_p relu(d(i, p) - d(i, n) + margin * w(i, p))`` where ``n`` is the *closest* subject that is not a
    relative of ``i`` (relatives - co-twins, siblings, the anchor itself - can never be negatives, however
    close they are) and ``w`` is the positive's weight (1 for MZ co-twins, less for weaker DZ positives).

    Args:
        embeddings: ``(N, D)``.
        positive: ``(N, N)`` float weights, > 0 where ``j`` is a positive of ``i`` (e.g. 1 MZ, 0.5 DZ), else 0.
        related: ``(N, N)`` bool, True where ``i`` and ``j`` are relatives (same family) or ``i == j``.
        margin: hinge margin (scaled by the positive's weight).
        distance: ``cosine`` or ``euclidean``.

    Returns:
        :class:`TripletOutput`.

    Examples:
        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0]])
        >>> pos = torch.zeros(4, 4); pos[0, 1] = pos[1, 0] = 1.0
        >>> rel = torch.eye(4, dtype=torch.bool); rel[0, 1] = rel[1, 0] = True
        >>> out = batch_hard_triplet_loss(e, pos, rel, margin=0.2)
        >>> out.negative_index.tolist()  # subject 2 is the closest non-relative of both 0 and 1
        [2, 2, -1, -1]
    """
    n = embeddings.shape[0]
    dist = pairwise_distance(embeddings, distance)
    positive = positive.to(dist.dtype)
    related = related.bool() | torch.eye(n, dtype=torch.bool, device=dist.device)
    is_pos = (positive > 0) & ~torch.eye(n, dtype=torch.bool, device=dist.device)
    is_neg = ~related
    anchors = is_pos.any(dim=1) & is_neg.any(dim=1)
    neg_index = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    if not bool(anchors.any()):
        zero = embeddings.sum() * 0.0
        return TripletOutput(zero, 0, 0.0, float("nan"), float("nan"), neg_index)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    neg_dist = torch.where(is_neg, dist, inf)
    d_an, n_idx = neg_dist.min(dim=1)  # the closest non-relative: the hardest negative
    hinge = F.relu(dist - d_an[:, None] + margin * positive)
    hinge = torch.where(is_pos, hinge, torch.zeros_like(hinge))
    per_anchor, p_idx = hinge.max(dim=1)  # the hardest positive
    # where all hinges are 0 the argmax is arbitrary: report the farthest positive instead
    pos_dist_masked = torch.where(is_pos, dist, -inf)
    far_pos = pos_dist_masked.argmax(dim=1)
    p_idx = torch.where(per_anchor > 0, p_idx, far_pos)
    loss = per_anchor[anchors].mean()
    neg_index[anchors] = n_idx[anchors]
    rows = torch.nonzero(anchors).squeeze(1)
    with torch.no_grad():
        d_ap = dist[rows, p_idx[rows]]
        stats = (
            float((per_anchor[anchors] > 0).float().mean()),
            float(d_ap.mean()),
            float(d_an[anchors].mean()),
        )
    return TripletOutput(loss, int(anchors.sum()), *stats, negative_index=neg_index)


def relation_matrices(
    family: torch.Tensor, pair_weight: dict[tuple[int, int], float], n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``positive`` and ``related`` matrices for :func:`batch_hard_triplet_loss` from batch metadata.

    Args:
        family: ``(N,)`` integer family index of each batch member (same value = relatives).
        pair_weight: ``{(i, j): weight}`` for positive pairs, by batch position (symmetric entries are added).
        n: batch size (default ``len(family)``).

    Examples:
        >>> pos, rel = relation_matrices(torch.tensor([0, 0, 1]), {(0, 1): 1.0})
        >>> pos.tolist(), rel.int().tolist()
        ([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    """
    n = int(family.shape[0]) if n is None else n
    related = family[:, None] == family[None, :]
    positive = torch.zeros((n, n), dtype=torch.float32)
    for (i, j), w in pair_weight.items():
        positive[i, j] = positive[j, i] = float(w)
    return positive, related
