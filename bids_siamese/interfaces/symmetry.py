"""Participant-level hemispheric asymmetry (nipype interface around :mod:`bids_siamese.symmetry`).

:class:`AsymmetryAnalysis` reads the model-grid ``desc-preproc`` T1w and its mask and writes, in the node's
working directory:

* ``asymmetry_map.nii.gz`` - the smoothed, masked voxelwise asymmetry index (float32, same grid);
* ``asymmetry_regions.tsv`` - regional indices of homologous atlas regions
  (``region, left, right, asymmetry_index, n_voxels, reference_index, z_score``);
* ``asymmetry_report.json`` - ``asymmetry_score`` (against the template's asymmetry), ``focal_z``,
  ``raw_magnitude``, the peak, the top regions and, with a symmetry model, ``siamese_probability`` and
  ``siamese_p_left``.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from ..atlas import atlas_on_grid, atlas_provenance
from ..bids.derivatives import RESULT_RES, template_reference, write_json, write_tsv
from ..bids.grids import templateflow_grid_sidecar
from ..config import Settings
from ..errors import BadDataError
from ..resources import model_grid
from ..symmetry.analysis import analyse_scan
from ..symmetry.analysis import template_reference as template_asymmetry
from ..symmetry.model import predict_proba
from ..symmetry.regional import homologous_pairs
from ..symmetry.train import load_symmetry_model, model_resolution, to_model_resolution
from .base import StepInterface

#: Default smoothing (mm FWHM) of the asymmetry map.
DEFAULT_FWHM = 6.0


def map_sidecar(fwhm_mm: float = DEFAULT_FWHM, resolution_label: str = RESULT_RES) -> dict:
    """The JSON sidecar of the written asymmetry map (``…_res-2_desc-asymmetry_statmap.nii.gz``), less the
    ``Sources`` that the derivatives writer adds: the map is computed on the model grid and resampled onto
    TemplateFlow's ``res-<resolution_label>`` grid.

    Examples:
        >>> sorted(map_sidecar())
        ['Description', 'Resolution', 'SmoothingFWHM', 'SpatialReference', 'SpatialReferenceFile']
    """
    return {
        "Description": (
            "Voxelwise hemispheric asymmetry index (I - I_mirror) / (I + I_mirror) of the skull-stripped T1w, "
            "computed on the model grid mirrored about the template's mid-sagittal plane x = 0 (I: the in-mask "
            "intensities mapped linearly to a positive range, 1st percentile -> 0.1, 99th -> 1.0, and smoothed "
            "inside the brain mask), then resampled (linear) onto TemplateFlow's grid. Antisymmetric; negative "
            "where a voxel is darker than its mirror voxel; 0 outside the brain mask and its mirror. Unitless, "
            "in (-1, 1)."
        ),
        **templateflow_grid_sidecar(resolution_label),
        **template_reference(),
        "SmoothingFWHM": float(fwhm_mm),
    }


class _AsymmetryInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="model-grid desc-preproc T1w (median 0 / IQR 1 in the mask)")
    in_mask = File(exists=True, mandatory=True, desc="model-grid brain mask")
    atlas = traits.Str(Settings.atlas, usedefault=True, desc="bundled atlas name or a NIfTI with a labels table")
    fwhm = traits.Float(DEFAULT_FWHM, usedefault=True, desc="smoothing of the asymmetry map (mm FWHM)")
    model = traits.Str(desc="symmetry model checkpoint (folder, model.pt or model_card.json)")
    num_threads = traits.Int(1, usedefault=True)


class _AsymmetryOutputSpec(TraitedSpec):
    out_map = File(exists=True, desc="voxelwise asymmetry index map (NIfTI, float32)")
    out_regions = File(exists=True, desc="regional asymmetry table (TSV)")
    out_report = File(exists=True, desc="asymmetry scores (JSON)")


class AsymmetryAnalysis(StepInterface):
    """Asymmetry map, regional indices and scores of one scan (and the Siamese score with a model).

    Examples:
        >>> AsymmetryAnalysis().inputs.fwhm
        6.0
    """

    input_spec = _AsymmetryInputSpec
    output_spec = _AsymmetryOutputSpec

    def _run_step(self, runtime):
        img = nib.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        mask = np.asanyarray(nib.load(self.inputs.in_mask).dataobj) > 0
        resolution = float(abs(img.affine[0, 0]))
        grid = model_grid(resolution)
        if tuple(data.shape) != tuple(grid.shape) or not np.allclose(img.affine, grid.affine, atol=1e-3):
            raise BadDataError(f"{self.inputs.in_file} is not on the {resolution:g} mm model grid; fix: use the "
                               "participant-level desc-preproc output")
        labels, names = atlas_on_grid(self.inputs.atlas, resolution)
        reference = template_asymmetry(resolution, self.inputs.fwhm, self.inputs.atlas)
        result = analyse_scan(data, mask, resolution, labels, homologous_pairs(names), reference,
                              fwhm_mm=self.inputs.fwhm, affine=grid.affine, names=names)
        report = dict(result.report)
        report["atlas"] = self.inputs.atlas
        report["atlas_provenance"] = atlas_provenance(self.inputs.atlas)  # its files, spaces and transform
        report["asymmetry_score_definition"] = (
            "mean |z| of the 250 mm3 most deviant left-hemisphere voxels of z = (AI - template AI) / (robust sd of "
            "that difference over the scan's brain); the group level re-scores against the dataset")
        if isdefined(self.inputs.model) and self.inputs.model:
            report.update(siamese_score(data, mask, resolution, self.inputs.model, self.inputs.num_threads))
        out_map = nib.Nifti1Image(result.ai.astype(np.float32), grid.affine)
        out_map.header.set_xyzt_units("mm", "sec")
        out_map.set_qform(grid.affine, 4)
        out_map.set_sform(grid.affine, 4)
        self._results["out_map"] = os.path.abspath("asymmetry_map.nii.gz")
        nib.save(out_map, self._results["out_map"])
        self._results["out_regions"] = str(write_tsv(Path(os.path.abspath("asymmetry_regions.tsv")),
                                                     result.regions.round(6)))
        self._results["out_report"] = str(write_json(Path(os.path.abspath("asymmetry_report.json")), report))
        return runtime


def siamese_score(data: np.ndarray, mask: np.ndarray, resolution: float, model_path: str,
                  num_threads: int = 1) -> dict:
    """``siamese_probability`` (p of abnormal asymmetry) and ``siamese_p_left`` of one model-grid scan.

    Args:
        data: model-grid image.
        mask: its mask.
        resolution: its grid resolution (block-averaged to the model's).
        model_path: checkpoint.
        num_threads: torch threads.
    """
    torch.set_num_threads(max(1, int(num_threads)))
    model, card = load_symmetry_model(model_path)
    small, _ = to_model_resolution(data, mask, resolution, model_resolution(card))
    p, side = predict_proba(model, torch.from_numpy(small[None]))
    return {
        "siamese_probability": round(float(p[0]), 4),
        "siamese_p_left": round(float(side[0]), 4),
        "siamese_threshold": float(card.get("decision", {}).get("threshold", 0.5)),
        "siamese_model": str(model_path),
        "siamese_model_sha256": card.get("weights", {}).get("sha256"),
    }
