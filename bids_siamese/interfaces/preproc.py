"""Thin nipype interfaces around the pure preprocessing and QC steps.

Each interface reads its inputs, calls one pure function and writes its outputs into the node's
working directory; the derivatives are written by :class:`WriteDerivatives` only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib  # loaded by nipype already
import numpy as np
import torch
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bids.fmriprep import (
    MASK_DSEG_MIN_DICE,
    MATCH_MIN_CORRELATION,
    AnatDerivatives,
    check_sources,
    match_correlation,
    tissue_summary,
)
from ..errors import BadDataError
from ..models.checkpoint import load_checkpoint
from ..models.orientation import p_flipped
from ..preproc.brain import brain_mask, mask_from_image
from ..preproc.conform import conform, header_checks, load_t1w
from ..preproc.grid import normalise_intensity, resample_to_grid, template_on_grid
from ..preproc.register import read_itk_transform, register_affine, write_itk_affine
from ..qc.orientation import scan_orientation_report, with_model_verdict
from ..reports.figures import mask_contour_mosaic, orientation_figure, registration_mosaic
from ..resources import Grid, model_grid, read_itk_affine, template_brain_path
from .base import StepInterface


def _mask(path: str) -> np.ndarray:
    """A mask file as a boolean array."""
    return np.asanyarray(nib.load(path).dataobj) > 0


def _save(img, name: str) -> str:
    path = os.path.abspath(name)
    nib.save(img, path)
    return path


class _CheckHeaderInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw T1w image")
    max_gb = traits.Float(desc="memory the run may use (--mem-gb): a larger image, by its header, is rejected "
                               "before its data are read")


class _CheckHeaderOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image, squeezed to 3D when it had one volume")
    out_checks = File(exists=True, desc="JSON list of {name, passed, detail}")


class CheckHeader(StepInterface):
    """Load a T1w image (rejecting unusable files) and record its header checks."""

    input_spec = _CheckHeaderInputSpec
    output_spec = _CheckHeaderOutputSpec

    def _run_step(self, runtime):
        img = load_t1w(self.inputs.in_file, max_gb=self.inputs.max_gb if isdefined(self.inputs.max_gb) else None)
        checks = header_checks(img)
        out_checks = os.path.abspath("header_checks.json")
        Path(out_checks).write_text(json.dumps(checks, indent=2))
        self._results["out_checks"] = out_checks
        if len(nib.load(self.inputs.in_file).shape) == 3:
            self._results["out_file"] = str(self.inputs.in_file)
        else:  # a 4D file with a single volume, squeezed by load_t1w
            self._results["out_file"] = _save(img, "t1w_3d.nii.gz")
        return runtime


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="T1w in RAS (closest canonical), float32, same world coordinates")


class Conform(StepInterface):
    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_step(self, runtime):
        # uncompressed: this float32 image is read by six nodes, and gzip would cost seconds per 1 mm scan
        self._results["out_file"] = _save(conform(load_t1w(self.inputs.in_file)), "t1w_ras.nii")
        return runtime


class _BrainInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed T1w")
    device = traits.Str("cpu", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="runs on a GPU (nipype's MultiProc counts it in n_gpu_procs)")
    num_threads = traits.Int(1, usedefault=True)


class _BrainOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="native-space brain mask (uint8)")


class BrainExtraction(StepInterface):
    """deepbet brain extraction (weights ship in its wheel)."""

    uses_torch = True
    input_spec = _BrainInputSpec
    output_spec = _BrainOutputSpec

    def _run_step(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = brain_mask(img, device=self.inputs.device)  # the node writes the mask only
        out = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
        out.header.set_xyzt_units("mm", "sec")
        self._results["out_mask"] = _save(out, "brain_mask.nii.gz")
        return runtime


class _ReuseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the raw T1w, conformed (same world space as the raw file)")
    anat = traits.Dict(mandatory=True, desc="AnatDerivatives.as_dict() of bids_siamese.bids.fmriprep")
    scan = traits.Str(mandatory=True, desc="the raw scan's path relative to BIDS_DIR")
    anat_files = InputMultiObject(File(exists=True), desc="the files named in anat (their content enters the hash)")


class _ReuseOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="the pipeline's brain mask on the raw scan's conformed grid (uint8)")
    out_matrix = File(desc="template-to-T1w matrix (text) from the pipeline's transform (absent: none found)")
    out_itk = File(desc="the same as an ITK affine text transform")
    out_report = File(exists=True, desc="JSON: what was reused, from which pipeline and version, and the checks")


class ReuseAnatomical(StepInterface):
    """fMRIPrep/sMRIPrep's mask and T1w-to-MNI transform for one raw scan, after checking they belong to it.

    Checks (a failure is :class:`~bids_siamese.errors.BadDataError`, exit 65 for the scan, with the reason):
    the reference's ``Sources`` name the scan (when present); the raw scan moved into the reference with the
    pipeline's own ``from-orig_to-T1w`` transform correlates with its ``desc-preproc_T1w`` inside its mask
    (:data:`~bids_siamese.bids.fmriprep.MATCH_MIN_CORRELATION`); its mask agrees with its ``dseg``. The
    mask and the transform are then expressed on the raw scan, so each session keeps its own image.
    """

    input_spec = _ReuseInputSpec
    output_spec = _ReuseOutputSpec

    def _run_step(self, runtime):
        anat = AnatDerivatives.from_dict(dict(self.inputs.anat))
        ds = anat.dataset
        who = f"{ds.pipeline} {ds.version}'s {anat.preproc.name}"
        fix = (f"fix: point --derivatives {ds.name}= at the {ds.pipeline} outputs of this dataset, or leave the "
               "option out to process the scan on its own")
        scan = str(self.inputs.scan)
        reason = check_sources(anat.sources, scan)
        if reason:
            raise BadDataError(f"{scan}: {who} was not made from this scan ({reason}); {fix}")
        orig_from_ref = read_itk_affine(anat.orig_xfm) if anat.orig_xfm else np.eye(4)
        raw = nib.load(self.inputs.in_file)
        ref, ref_mask = nib.load(anat.preproc), nib.load(anat.mask)
        corr = match_correlation(raw, ref, ref_mask, orig_from_ref)
        if not corr >= MATCH_MIN_CORRELATION:
            raise BadDataError(f"{scan}: {who} does not match this scan (correlation {corr:.2f} inside its brain "
                               f"mask after its own transform, below {MATCH_MIN_CORRELATION}); {fix}")
        tissue = tissue_summary(ref_mask, nib.load(anat.dseg) if anat.dseg else None,
                                {t: nib.load(p) for t, p in anat.probseg.items()})
        if tissue["mask_dseg_dice"] is not None and tissue["mask_dseg_dice"] < MASK_DSEG_MIN_DICE:
            raise BadDataError(f"{scan}: {ds.pipeline}'s {anat.mask.name} and {anat.dseg.name} disagree (Dice "
                               f"{tissue['mask_dseg_dice']:.2f} < {MASK_DSEG_MIN_DICE}); {fix}")
        # the reference mask placed in the raw scan's world (its affine composed with the transform), resampled
        mask = mask_from_image(nib.Nifti1Image(np.asanyarray(ref_mask.dataobj), orig_from_ref @ ref_mask.affine), raw)
        if not mask.any():
            raise BadDataError(f"{scan}: {ds.pipeline}'s {anat.mask.name} does not overlap this scan; {fix}")
        out = nib.Nifti1Image(mask.astype(np.uint8), raw.affine)
        out.header.set_xyzt_units("mm", "sec")
        self._results["out_mask"] = _save(out, "brain_mask.nii.gz")

        dropped: list[str] = []
        if anat.xfm is not None:
            ref_from_template, dropped = read_itk_transform(anat.xfm)
            matrix = orig_from_ref @ ref_from_template  # template -> reference -> this scan
            self._results["out_matrix"] = os.path.abspath("template_to_t1w.txt")
            np.savetxt(self._results["out_matrix"], matrix, fmt="%.10f")
            self._results["out_itk"] = os.path.abspath("from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt")
            write_itk_affine(matrix, self._results["out_itk"])
        uri = ds.uri
        report = {
            "name": ds.name, "pipeline": ds.pipeline, "version": ds.version, "layout": anat.layout,
            "reference": uri(anat.preproc),
            "brain_mask": uri(anat.mask),
            "transform": uri(anat.xfm) if anat.xfm else None,
            "transform_source": ds.name if anat.xfm else "estimated",
            "transform_nonlinear_not_used": dropped,
            "orig_to_reference": uri(anat.orig_xfm) if anat.orig_xfm else None,
            "segmentation": [uri(p) for p in ([anat.dseg] if anat.dseg else []) + list(anat.probseg.values())],
            "not_used": [uri(p) for p in (anat.mni_preproc, anat.mni_mask) if p is not None],
            "sources_checked": bool(anat.sources),
            "match_correlation": round(corr, 4),
            "match_threshold": MATCH_MIN_CORRELATION,
            **tissue,
        }
        self._results["out_report"] = os.path.abspath("anatomical_reuse.json")
        Path(self._results["out_report"]).write_text(json.dumps(report, indent=2))
        return runtime


class _RegisterInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask")
    resolution = traits.Float(2.0, usedefault=True, desc="working resolution in mm")
    seed = traits.Int(0, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="runs on a GPU (nipype's MultiProc counts it in n_gpu_procs)")
    num_threads = traits.Int(1, usedefault=True)
    dof = traits.Enum(12, 9, 7, 6, usedefault=True, desc="12 affine; 9 shear-free (the orientation check's)")
    in_initial = File(exists=True, desc="template-to-T1w matrix (text) to refine instead of searching from scratch")


class _RegisterOutputSpec(TraitedSpec):
    out_matrix = File(exists=True, desc="4x4 matrix (text) mapping template mm to T1w mm")
    out_itk = File(exists=True, desc="ITK affine transform file")


class AffineRegistration(StepInterface):
    """Affine registration of the brain to the MNI152NLin2009cAsym brain."""

    uses_torch = True
    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_step(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = _mask(self.inputs.in_mask)
        initial = np.loadtxt(self.inputs.in_initial) if isdefined(self.inputs.in_initial) else None
        # register_affine masks the image itself (and caches the template side once per process)
        matrix = register_affine(
            img, mask, nib.load(template_brain_path()), resolution=self.inputs.resolution,
            seed=self.inputs.seed, device=self.inputs.device, n_threads=self.inputs.num_threads,
            dof=self.inputs.dof, initial=initial,
        )
        out_matrix = os.path.abspath("template_to_t1w.txt")
        np.savetxt(out_matrix, matrix, fmt="%.10f")
        self._results["out_matrix"] = out_matrix
        self._results["out_itk"] = os.path.abspath("from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.txt")
        write_itk_affine(matrix, self._results["out_itk"])
        return runtime


class _GridInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed T1w")
    in_mask = File(exists=True, mandatory=True, desc="its brain mask")
    in_matrix = File(exists=True, mandatory=True, desc="template-to-T1w matrix")
    resolution = traits.Float(2.0, usedefault=True)


class _GridOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="skull-stripped, normalised T1w on the model grid")
    out_mask = File(exists=True, desc="brain mask on the model grid")


class ModelGrid(StepInterface):
    """Resample to the fixed template-aligned model grid and normalise intensities in the mask."""

    input_spec = _GridInputSpec
    output_spec = _GridOutputSpec

    def _run_step(self, runtime):
        grid = model_grid(self.inputs.resolution)
        matrix = np.loadtxt(self.inputs.in_matrix)
        img = nib.load(self.inputs.in_file)
        mask_img = nib.load(self.inputs.in_mask)
        mask = resample_to_grid(mask_img, matrix, grid, order=1) > 0.5
        data = resample_to_grid(img, matrix, grid, order=1)
        data = normalise_intensity(data, mask).astype(np.float32)
        out = nib.Nifti1Image(data, grid.affine)
        out_mask = nib.Nifti1Image(mask.astype(np.uint8), grid.affine)
        for im in (out, out_mask):
            im.header.set_xyzt_units("mm", "sec")
            im.set_qform(grid.affine, 4)  # 4 = MNI152 template space
            im.set_sform(grid.affine, 4)
        self._results["out_file"] = _save(out, "preproc_grid.nii.gz")
        self._results["out_mask"] = _save(out_mask, "mask_grid.nii.gz")
        return runtime


class _OrientationInputSpec(BaseInterfaceInputSpec):
    in_checks = File(exists=True, mandatory=True, desc="header checks JSON")
    t1w = File(exists=True, mandatory=True, desc="conformed native T1w")
    native_mask = File(exists=True, mandatory=True, desc="native-space brain mask")
    in_matrix = File(exists=True, mandatory=True, desc="shear-free (9-dof) template-to-T1w matrix")
    resolution = traits.Float(2.0, usedefault=True, desc="registration resolution in mm (at least 2)")
    seed = traits.Int(0, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    orientation_model = traits.Str("", usedefault=True, desc="checkpoint of group --task orientation (optional)")
    grid_file = File(exists=True, desc="normalised T1w on the model grid (needed with orientation_model)")


class _OrientationOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="orientation QC JSON")


class OrientationCheck(StepInterface):
    """Usable-scan gate, header verdict and the paired image-based left-right test (scan vs its mirror)."""

    uses_torch = True
    input_spec = _OrientationInputSpec
    output_spec = _OrientationOutputSpec

    def _run_step(self, runtime):
        native_mask = _mask(self.inputs.native_mask)
        report = scan_orientation_report(
            nib.load(self.inputs.t1w), native_mask, json.loads(Path(self.inputs.in_checks).read_text()),
            resolution=self.inputs.resolution, seed=self.inputs.seed, n_threads=self.inputs.num_threads,
            device=self.inputs.device, matrix=np.loadtxt(self.inputs.in_matrix),
        )
        if self.inputs.orientation_model:
            model, card = load_checkpoint(self.inputs.orientation_model, task="orientation")
            volume = np.asanyarray(nib.load(self.inputs.grid_file).dataobj, dtype=np.float32)
            with torch.inference_mode():
                p_stored, p_mirrored = p_flipped(model, np.stack([volume, volume[::-1]]))
            report = with_model_verdict(report, float(p_stored), float(p_mirrored),
                                        f"{self.inputs.orientation_model} (sha256 {card['weights']['sha256'][:12]})")
        out = os.path.abspath("orientation_qc.json")
        Path(out).write_text(json.dumps(report, indent=2))
        self._results["out_report"] = out
        return runtime


class _FiguresInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="conformed native T1w")
    native_mask = File(exists=True, mandatory=True)
    grid_file = File(exists=True, mandatory=True, desc="normalised T1w on the model grid")


class _FiguresOutputSpec(TraitedSpec):
    out_mask_svg = File(exists=True)
    out_reg_svg = File(exists=True)
    out_orient_svg = File(exists=True)


class ReportFigures(StepInterface):
    """SVG figures for the per-subject report."""

    input_spec = _FiguresInputSpec
    output_spec = _FiguresOutputSpec

    def _run_step(self, runtime):
        t1 = nib.load(self.inputs.t1w)
        mask = _mask(self.inputs.native_mask)
        grid_img = nib.load(self.inputs.grid_file)
        moving = np.asanyarray(grid_img.dataobj, dtype=np.float32)
        grid = Grid(shape=tuple(int(s) for s in grid_img.shape), affine=grid_img.affine)
        template, _ = template_on_grid(grid)
        figures = {
            "out_mask_svg": mask_contour_mosaic(np.asanyarray(t1.dataobj, dtype=np.float32), mask,
                                                zooms=tuple(float(z) for z in t1.header.get_zooms()[:3])),
            "out_reg_svg": registration_mosaic(moving, template),
            "out_orient_svg": orientation_figure(moving, template),
        }
        for key, svg in figures.items():
            path = os.path.abspath(key[4:] + ".svg")
            Path(path).write_text(svg)
            self._results[key] = path
        return runtime
