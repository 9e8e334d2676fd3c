"""Hemispheric symmetry: asymmetry maps and indices, simulated lesions, the Siamese hemisphere model."""
from ..preproc.grid import mirror
from .analysis import analyse_scan, template_reference
from .asymmetry import Reference, asymmetry_map, group_reference, positive_intensities, score_scan
from .regional import atlas_on_grid, homologous_pairs, regional_asymmetry
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
