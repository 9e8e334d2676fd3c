"""Hemispheric symmetry: asymmetry maps and indices, simulated lesions, the Siamese hemisphere model.

The names below are imported on first use (PEP 562), so that importing one light module of the package (e.g.
``bids_siamese.symmetry.simulate`` from the demo generator) does not bring in torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "mirror": "..preproc.grid",
    "analyse_scan": ".analysis", "template_reference": ".analysis",
    "Reference": ".asymmetry", "asymmetry_map": ".asymmetry", "group_reference": ".asymmetry",
    "positive_intensities": ".asymmetry", "score_scan": ".asymmetry",
    "atlas_on_grid": "..atlas", "homologous_pairs": ".regional", "regional_asymmetry": ".regional",
    "FUSIONS": ".model", "SymmetrySiamese": ".model", "build_symmetry_model": ".model",
    "split_hemispheres": ".model",
    "LesionConfig": ".simulate", "curriculum_range": ".simulate", "render_lesion": ".simulate",
    "simulate_lesion": ".simulate",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
