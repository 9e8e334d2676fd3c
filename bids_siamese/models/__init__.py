"""3D Siamese models: backbones, embedding/longitudinal heads, losses and checkpoints."""
from .backbones import BACKBONES, Encoder, build_backbone
from .heads import TASKS, EmbeddingHead, LongitudinalSiamese, SiameseEncoder, build_model
from .regional import RegionalEncoder
from .losses import batch_hard_triplet_loss, pair_distance, pairwise_distance, relation_matrices

__all__ = [
    "BACKBONES",
    "TASKS",
    "Encoder",
    "EmbeddingHead",
    "LongitudinalSiamese",
    "RegionalEncoder",
    "SiameseEncoder",
    "batch_hard_triplet_loss",
    "build_backbone",
    "build_model",
    "pair_distance",
    "pairwise_distance",
    "relation_matrices",
]
