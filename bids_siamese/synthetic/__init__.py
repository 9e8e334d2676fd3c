"""Synthetic BIDS demo dataset with ground truth (``bids-siamese-demo``).

The generator turns the skull-stripped MNI152NLin2009cAsym template into a set of simulated T1w head scans
that carry known, learnable signal for every task of the app:

* **families** - monozygotic (MZ) and dizygotic (DZ) twin pairs and singletons. Each subject is the template
  warped by a smooth displacement field = individual part + family part. The family part lives in a few
  subcortical regions (default thalamus, brainstem, hippocampus); MZ co-twins share it, DZ co-twins share half
  of it (correlation 0.5);
* **longitudinal decline** - some subjects have a second session 1-3 years later; decliners lose hippocampal
  volume and gain ventricular volume, stable subjects only get scan-rescan noise;
* **lesions** - unilateral hypointense blobs of known volume planted in some single-session scans;
* **orientation errors** - a few scans have the voxel array flipped left-right with an unchanged header;
* **acquisition variety** - random head pose, voxel size, storage orientation, bias field and Rician noise.

All anatomy lives in *template space* (``t``, MNI mm) on a padded 1 mm grid; a scan is rendered with a single
interpolation from the scan voxel grid through ``scan voxel -> scanner world -> t -> t + U(t) -> head image``,
where ``U`` is the subject's (and session's) total displacement field (pull-back convention: the subject image
at ``t`` shows the template at ``t + U(t)``).

The ground truth is written outside the BIDS data proper (``OUTDIR/sourcedata/truth`` by default); see
``docs/demo_dataset.md`` and the generated ``truth/README.md`` for its columns.

Modules, one job each: :mod:`.params` (sizes, signal parameters), :mod:`.fields` (displacement-field helpers),
:mod:`.anatomy` and :mod:`.head` (template, atlas, simulated head), :mod:`.model` (structure-volume fields),
:mod:`.family` (twin signal), :mod:`.longitudinal` (decline), :mod:`.lesions`, :mod:`.scan` (pose, rendering,
acquisition), :mod:`.plan` (the design), :mod:`.synthesize` (one subject's scans, flips included),
:mod:`.bids_files` (BIDS writing), :mod:`.truth` (ground truth), :mod:`.dataset` (:func:`generate`) and
:mod:`.cli` (:func:`main`).
"""
from __future__ import annotations

from ..resources import template_brain_path
from .anatomy import Anatomy, build_anatomy, load_atlas, load_template
from .cli import build_parser, main
from .dataset import generate
from .fields import exponentiate, jacobian_determinant, smooth_displacement, upsample_linear, warp
from .head import make_head
from .lesions import Lesion, lesion_measures, place_lesion, plant_lesion
from .model import Model, build_model, get_model
from .params import GENERATOR_NAME, SIZES, SignalParams, SizeSpec
from .plan import ScanPlan, SubjectPlan, plan_dataset
from .scan import ScanGeometry, add_rician_noise, bias_field, make_geometry, render_scan, template_to_world
from .synthesize import ScanResult, synthesize_scan, synthesize_subject

__all__ = [
    "GENERATOR_NAME", "SIZES", "Anatomy", "Lesion", "Model", "ScanGeometry", "ScanPlan", "ScanResult",
    "SignalParams", "SizeSpec", "SubjectPlan", "add_rician_noise", "bias_field", "build_anatomy", "build_model",
    "build_parser", "exponentiate", "generate", "get_model", "jacobian_determinant", "lesion_measures",
    "load_atlas", "load_template", "main", "make_geometry", "make_head", "place_lesion", "plan_dataset",
    "plant_lesion", "render_scan", "smooth_displacement", "synthesize_scan", "synthesize_subject",
    "template_brain_path", "template_to_world", "upsample_linear", "warp",
]
