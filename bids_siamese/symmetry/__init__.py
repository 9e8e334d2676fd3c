"""Hemispheric symmetry: asymmetry maps and indices, simulated lesions, the Siamese hemisphere model."""
from .asymmetry import (
    Reference,
    analyse_scan,
    asymmetry_map,
    atlas_on_grid,
    group_reference,
    homologous_pairs,
    mirror,
    positive_intensities,
    regional_asymmetry,
    score_scan,
    template_reference,
)
from .model import FUSIONS, SymmetrySiamese, build_symmetry_model, split_hemispheres
from .simulate import LesionConfig, curriculum_range, render_lesion, simulate_lesion

__all__ = [
    "FUSIONS",
    "LesionConfig",
    "Reference",
    "SymmetrySiamese",
    "analyse_scan",
    "asymmetry_map",
    "atlas_on_grid",
    "build_symmetry_model",
    "curriculum_range",
    "group_reference",
    "homologous_pairs",
    "mirror",
    "positive_intensities",
    "regional_asymmetry",
    "render_lesion",
    "score_scan",
    "simulate_lesion",
    "split_hemispheres",
    "template_reference",
]
