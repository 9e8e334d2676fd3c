"""Connectome Workbench specification files (``.spec``): one file that opens surfaces, volumes and maps.

The format is Workbench's ``CaretSpecFile`` XML (as written by ``wb_command -add-to-spec-file``): one
``DataFile`` element per file with its ``Structure`` (``CortexLeft``, ``CortexRight`` or ``Invalid`` for
volumes and CIFTI files) and ``DataFileType``. Paths are relative to the spec file, so the folder can be
moved or copied as a whole; opening the spec in ``wb_view`` loads everything.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

import nibabel as nib
import numpy as np

from ..bids.derivatives import (RELEVANCE_DESC, TEMPLATE_FILE, map_file_names, surface_file_name, write_bytes,
                                write_nifti, write_text)
from ..resources import template_brain_path
from .cifti import cifti_bytes, dscalar_from_volume
from .gifti import gifti_bytes, load_mesh, metric_gifti, surface_gifti, vol_to_surf

__all__ = ["SpecEntry", "FILE_TYPES", "file_type", "entry_for", "spec_xml", "surface_file_name", "map_file_names",
           "write_surface_maps", "write_workbench_bundle"]

#: Workbench ``DataFileType`` by file name ending (longest match first).
FILE_TYPES = (
    (".surf.gii", "SURFACE"),
    (".func.gii", "METRIC"),
    (".shape.gii", "METRIC"),
    (".label.gii", "LABEL"),
    (".dscalar.nii", "CONNECTIVITY_DENSE_SCALAR"),
    (".dlabel.nii", "CONNECTIVITY_DENSE_LABEL"),
    (".dtseries.nii", "CONNECTIVITY_DENSE_TIME_SERIES"),
    (".pscalar.nii", "CONNECTIVITY_PARCEL_SCALAR"),
    (".scene", "SCENE"),
    (".border", "BORDER"),
    (".nii.gz", "VOLUME"),
    (".nii", "VOLUME"),
)


@dataclass(frozen=True)
class SpecEntry:
    """One file of a spec: its path relative to the spec, Workbench type and structure."""

    path: str
    file_type: str
    structure: str = "Invalid"
    selected: bool = True


def file_type(path: str) -> str:
    """Workbench ``DataFileType`` of a file name.

    Examples:
        >>> file_type("x_hemi-L_den-32k_midthickness.surf.gii"), file_type("map.dscalar.nii"), file_type("t1.nii.gz")
        ('SURFACE', 'CONNECTIVITY_DENSE_SCALAR', 'VOLUME')
    """
    name = str(path).lower()
    for ending, kind in FILE_TYPES:
        if name.endswith(ending):
            return kind
    raise ValueError(f"no Workbench file type for {path}")


def entry_for(path: str, structure: str | None = None) -> SpecEntry:
    """A spec entry; the structure is read from a ``hemi-L``/``hemi-R`` entity for GIFTI files.

    Examples:
        >>> entry_for("surf/tpl-fsLR_den-32k_hemi-R_midthickness.surf.gii")
        SpecEntry(path='surf/tpl-fsLR_den-32k_hemi-R_midthickness.surf.gii', file_type='SURFACE', structure='CortexRight', selected=True)
    """
    kind = file_type(path)
    if structure is None:
        structure = "Invalid"
        if kind in ("SURFACE", "METRIC", "LABEL", "BORDER"):
            match = re.search(r"(?:^|[_/])hemi-([LR])(?:_|\.)", str(path))
            if not match:
                raise ValueError(f"{path}: a surface file needs hemi-L or hemi-R in its name (or a structure)")
            structure = {"L": "CortexLeft", "R": "CortexRight"}[match.group(1)]
    return SpecEntry(path=str(path), file_type=kind, structure=structure)


def spec_xml(entries: Iterable[SpecEntry], metadata: Mapping[str, str] | None = None) -> str:
    """The text of a ``.spec`` file.

    Examples:
        >>> print(spec_xml([entry_for("a_hemi-L.surf.gii")]))  # doctest: +NORMALIZE_WHITESPACE
        <?xml version="1.0" encoding="UTF-8"?>
        <CaretSpecFile Version="1.0">
           <MetaData>
           </MetaData>
           <DataFile Structure="CortexLeft"
                     DataFileType="SURFACE"
                     Selected="true">
              a_hemi-L.surf.gii
           </DataFile>
        </CaretSpecFile>
    """
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<CaretSpecFile Version="1.0">', "   <MetaData>"]
    for key, value in (metadata or {}).items():
        lines.append(f"      <MD><Name>{escape(str(key))}</Name><Value>{escape(str(value))}</Value></MD>")
    lines.append("   </MetaData>")
    for entry in entries:
        lines += [
            f"   <DataFile Structure={quoteattr(entry.structure)}",
            f"             DataFileType={quoteattr(entry.file_type)}",
            f"             Selected=\"{'true' if entry.selected else 'false'}\">",
            f"      {escape(entry.path)}",
            "   </DataFile>",
        ]
    lines.append("</CaretSpecFile>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The Workbench folder of a set of template-space maps
# ----------------------------------------------------------------------------------------------------------
BUNDLED_SURFACES = {"fsLR": ("midthickness", "inflated", "sphere"),
                    "fsaverage5": ("midthickness", "pial", "white", "inflated")}


def write_surface_maps(folder, stem: str, maps, resolution_label: str, desc: str = RELEVANCE_DESC["lrp"],
                       suffix: str = "relevance", cifti: bool = True, meshes=("fsLR", "fsaverage5")) -> dict[str, Path]:
    """Write GIFTI metrics (both meshes, both hemispheres) and a CIFTI dscalar of template-space volumes.

    Args:
        folder: destination folder.
        stem: file name start (``group`` or a scan's ``sub-..`` source).
        maps: map name -> ``(volume, affine)`` in MNI152NLin2009cAsym space (all on one grid).
        resolution_label: the ``res-`` label of the volumes.
        desc: ``desc-`` label.
        suffix: file suffix.
        cifti: also write the CIFTI-2 dense scalar file.
        meshes: which meshes to sample on.

    Returns:
        File key (``fsLR_L``, ``fsaverage5_R``, ``cifti``) -> written path.
    """
    folder = Path(folder)
    names = map_file_names(stem, desc, suffix, resolution_label)
    written: dict[str, Path] = {}
    for mesh in meshes:
        for hemi in ("L", "R"):
            values = {name: vol_to_surf(vol, aff, mesh, hemi) for name, (vol, aff) in maps.items()}
            img = metric_gifti(values, hemi, description=f"{desc} {suffix} sampled on {mesh} from MNI152NLin2009cAsym")
            key = f"{mesh}_{hemi}"
            written[key] = write_bytes(folder / names[key], gifti_bytes(img))
    if cifti:
        written["cifti"] = write_bytes(folder / names["cifti"], cifti_bytes(dscalar_from_volume(maps)))
    return written


def write_workbench_bundle(folder, maps, resolution_label: str, stem: str = "group", desc: str = RELEVANCE_DESC["lrp"],
                           suffix: str = "relevance", template_path=None) -> list[Path]:
    """A self-contained Connectome Workbench folder for template-space maps.

    Writes the maps as NIfTI (template space), GIFTI metrics on fsLR 32k and fsaverage5, a CIFTI-2 dense
    scalar file, copies of the template surfaces and of the MNI152NLin2009cAsym brain, and two spec files
    (``<stem>_fsLR.spec``, ``<stem>_fsaverage5.spec``) that open everything with relative paths.

    Args:
        folder: destination folder (created).
        maps: map name -> ``(volume, affine)`` in MNI152NLin2009cAsym space (one grid).
        resolution_label: ``res-`` label of the volumes.
        stem: file name start.
        desc: ``desc-`` label.
        suffix: file suffix.
        template_path: the template brain to copy (default: :func:`bids_siamese.resources.template_brain_path`).

    Returns:
        Every path written, the spec files last.
    """
    folder = Path(folder)
    names = map_file_names(stem, desc, suffix, resolution_label)
    written: list[Path] = []
    vols = list(maps.values())
    data = vols[0][0] if len(vols) == 1 else np.stack([v for v, _ in vols], axis=-1)
    written.append(write_nifti(folder / names["volume"], nib.Nifti1Image(np.asarray(data, np.float32), vols[0][1])))
    surface_maps = write_surface_maps(folder, stem, maps, resolution_label, desc, suffix)
    written += list(surface_maps.values())
    template = Path(template_path) if template_path else template_brain_path()
    written.append(write_bytes(folder / TEMPLATE_FILE, template.read_bytes()))
    for mesh, surfaces in BUNDLED_SURFACES.items():
        for hemi in ("L", "R"):
            for surface in surfaces:
                img = surface_gifti(load_mesh(mesh, hemi, surface), hemi, surface)
                written.append(write_bytes(folder / surface_file_name(mesh, hemi, surface), gifti_bytes(img)))
    for mesh, surfaces in BUNDLED_SURFACES.items():
        entries = [entry_for(surface_file_name(mesh, hemi, s)) for hemi in ("L", "R") for s in surfaces
                   if s != "sphere"]
        entries += [entry_for(names[f"{mesh}_{hemi}"]) for hemi in ("L", "R")]
        entries += [entry_for(TEMPLATE_FILE), entry_for(names["volume"])]
        if mesh == "fsLR":
            entries.append(entry_for(names["cifti"]))
        meta = {"Description": f"bids-siamese {desc} {suffix} maps on {mesh} and MNI152NLin2009cAsym"}
        written.append(write_text(folder / f"{stem}_{mesh}.spec", spec_xml(entries, meta)))
    return written
