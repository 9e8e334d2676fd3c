"""The one node that writes per-scan derivatives into OUTPUT_DIR (names from BIDS entities)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bids.derivatives import (
    FIGURE_DESCS, embedding_name, output_names, sidecar_path, template_reference, write_bytes, write_json,
    write_nifti,
)
from ..bids.grids import model_grid_sidecar, resample_to_templateflow
from ..bids.records import remove_completion_record
from ..bids.layout import bids_relative
from ..resources import Grid
from .base import StepInterface
from .symmetry import map_sidecar


class _WriteInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    bids_dir = Directory(mandatory=True)
    source_file = File(mandatory=True, desc="the raw T1w the outputs derive from")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the source (subject, session, ...)")
    resolution = traits.Float(mandatory=True)
    resolution_label = traits.Str(mandatory=True)
    brain_source = traits.Enum("deepbet", "fmriprep", "smriprep", usedefault=True)
    reuse_report = File(exists=True, desc="ReuseAnatomical's JSON: the fMRIPrep/sMRIPrep files reused (absent: none)")
    preproc = File(exists=True, mandatory=True)
    grid_mask = File(exists=True, mandatory=True)
    native_mask = File(exists=True, mandatory=True)
    xfm = File(exists=True, mandatory=True)
    orientation = File(exists=True, mandatory=True)
    figures = InputMultiObject(File(exists=True), desc="mask, registration, orientation SVGs")
    asymmetry_map = File(exists=True, desc="voxelwise asymmetry index on the model grid (written on TemplateFlow's res-2 grid)")
    asymmetry_regions = File(exists=True, desc="regional asymmetry indices (TSV)")
    asymmetry_report = File(exists=True, desc="asymmetry scores (JSON)")
    fwhm = traits.Float(6.0, usedefault=True, desc="smoothing of the asymmetry map (mm)")
    embedding = File(exists=True, desc="embedding TSV of a trained model")
    embedding_task = traits.Str(desc="the model's task, for desc-<task>")


class _WriteOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="paths written, relative to OUTPUT_DIR")
    out_orientation = File(desc="the orientation QC JSON in OUTPUT_DIR")


class WriteDerivatives(StepInterface):
    """Copy one scan's results into OUTPUT_DIR atomically, with JSON sidecars."""

    input_spec = _WriteInputSpec
    output_spec = _WriteOutputSpec

    def _run_step(self, runtime):
        out_dir = Path(self.inputs.output_dir)
        names = output_names(dict(self.inputs.entities), self.inputs.resolution_label)
        remove_completion_record(out_dir, names["status"])  # rewritten last, once everything else is written
        raw = "bids:raw:" + str(bids_relative(Path(self.inputs.source_file), Path(self.inputs.bids_dir)))
        native_mask_uri = "bids::" + str(names["native_mask"])
        reuse = json.loads(Path(self.inputs.reuse_report).read_text()) if isdefined(self.inputs.reuse_report) else None
        # the pipeline's files as bids:<name>: URIs (DatasetLinks in dataset_description.json resolves the name)
        reused_mask = [reuse[k] for k in ("brain_mask", "orig_to_reference") if reuse and reuse.get(k)]
        reused_xfm = [reuse[k] for k in ("transform", "orig_to_reference") if reuse and reuse.get(k)]
        provenance = {"AnatomicalDerivatives": {k: reuse[k] for k in (
            "pipeline", "version", "layout", "reference", "brain_mask", "transform", "transform_source")}} \
            if reuse else {}
        grid_keys = model_grid_sidecar(self.inputs.resolution)
        written = []

        def put_nifti(key: str, src: str, sidecar: dict) -> None:
            write_nifti(out_dir / names[key], nib.load(src))
            write_json(out_dir / sidecar_path(names[key]), sidecar)
            written.extend([str(names[key]), str(sidecar_path(names[key]))])

        put_nifti("preproc", self.inputs.preproc, {
            "Description": "Skull-stripped T1w affinely registered to MNI152NLin2009cAsym, resampled to the model "
                           "grid and intensity-normalised inside the brain mask (median 0, IQR 1).",
            "SkullStripped": True,
            "Sources": list(dict.fromkeys([raw, native_mask_uri, "bids::" + str(names["xfm"]), *reused_mask,
                                           *reused_xfm])),
            **template_reference(),
            **grid_keys,
            "BrainExtraction": self.inputs.brain_source,
            **provenance,
        })
        put_nifti("grid_mask", self.inputs.grid_mask, {
            "Description": "Brain mask on the model grid.",
            "Type": "Brain",
            "Sources": [native_mask_uri, "bids::" + str(names["xfm"])],
            **template_reference(),
            **grid_keys,
        })
        put_nifti("native_mask", self.inputs.native_mask, {
            "Description": f"Brain mask in the T1w space (RAS), from {self.inputs.brain_source}.",
            "Type": "Brain",
            "Sources": [raw, *reused_mask],
            **provenance,
            "SpatialReference": raw,
        })
        write_bytes(out_dir / names["xfm"], Path(self.inputs.xfm).read_bytes())
        written.append(str(names["xfm"]))

        report = json.loads(Path(self.inputs.orientation).read_text())
        ents = self.inputs.entities
        report = {
            "participant_id": f"sub-{ents['subject']}",
            "session_id": f"ses-{ents['session']}" if ents.get("session") else None,
            "scan": Path(self.inputs.source_file).name,
            "source": raw,
            **report,
            "anatomical_derivatives": reuse,
        }
        write_json(out_dir / names["orientation"], report)
        written.append(str(names["orientation"]))
        self._results["out_orientation"] = str(out_dir / names["orientation"])

        if isdefined(self.inputs.asymmetry_map):
            ai = nib.load(self.inputs.asymmetry_map)
            resampled = resample_to_templateflow(np.asanyarray(ai.dataobj), Grid(tuple(ai.shape), ai.affine))
            write_nifti(out_dir / names["asymmetry_map"], resampled)
            write_json(out_dir / sidecar_path(names["asymmetry_map"]), {
                **map_sidecar(self.inputs.fwhm),
                "Sources": ["bids::" + str(names["preproc"]), "bids::" + str(names["grid_mask"])]})
            written.extend([str(names["asymmetry_map"]), str(sidecar_path(names["asymmetry_map"]))])
            for key, src in (("asymmetry_regions", self.inputs.asymmetry_regions),
                             ("asymmetry_report", self.inputs.asymmetry_report)):
                write_bytes(out_dir / names[key], Path(src).read_bytes())
                written.append(str(names[key]))
        if isdefined(self.inputs.embedding):
            rel = embedding_name(dict(self.inputs.entities), self.inputs.embedding_task)
            write_bytes(out_dir / rel, Path(self.inputs.embedding).read_bytes())
            written.append(str(rel))
        if isdefined(self.inputs.figures):
            for desc, src in zip(FIGURE_DESCS, self.inputs.figures):
                write_bytes(out_dir / names[f"figure_{desc}"], Path(src).read_bytes())
                written.append(str(names[f"figure_{desc}"]))
        self._results["out_files"] = written
        return runtime
