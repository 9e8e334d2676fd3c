"""Template surfaces and volume-to-surface sampling, written as GIFTI for Connectome Workbench.

Two template meshes are available offline:

* ``fsaverage5`` (10,242 vertices per hemisphere; TemplateFlow ``tpl-fsaverage`` ``den-10k`` when the user's
  cache has it, else nilearn's bundled data): ``white``, ``pial``, ``inflated``, ``sphere``; ``midthickness``
  is the mean of white and pial;
* ``fsLR`` 32k (32,492 vertices per hemisphere, the HCP/Workbench standard; ``tpl-fsLR`` from the user's
  TemplateFlow cache, else the copy of the Conte69 atlas bundled with this package, see
  :mod:`bids_siamese.resources`): ``midthickness`` and ``sphere``, with its medial-wall mask; ``inflated`` is
  computed from the midthickness surface by Laplacian smoothing (:func:`inflate`, for display).

Both meshes lie in MNI space (fsaverage: MNI305; Conte69: MNI152 nonlinear 6th generation), close enough to
MNI152NLin2009cAsym for 2 mm relevance maps, so a template-space map is sampled directly at the vertex
coordinates: on fsaverage5 along the segment from white to pial surface (5 depths, averaged), on fsLR along
the vertex normal of the midthickness surface (-1.5 to +1.5 mm, 5 depths, averaged), with trilinear
interpolation.

GIFTI files carry the metadata Workbench needs: ``AnatomicalStructurePrimary`` (``CortexLeft`` /
``CortexRight``) on the file, and for surfaces ``AnatomicalStructureSecondary`` and ``GeometricType`` on the
coordinate array.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage, sparse

from ..resources import fslr_file, fsaverage5_file

__all__ = [
    "MESHES",
    "HEMISPHERES",
    "STRUCTURES",
    "Mesh",
    "load_mesh",
    "cortex_mask",
    "vertex_normals",
    "sample_volume",
    "vol_to_surf",
    "metric_gifti",
    "surface_gifti",
    "gifti_bytes",
]

MESHES = ("fsaverage5", "fsLR")
HEMISPHERES = ("L", "R")
STRUCTURES = {"L": "CortexLeft", "R": "CortexRight"}
#: BIDS entities of each mesh (``space``, ``den``).
MESH_ENTITIES = {"fsaverage5": {"space": "fsaverage5", "den": None}, "fsLR": {"space": "fsLR", "den": "32k"}}
_SECONDARY = {"white": "GrayWhite", "pial": "Pial", "midthickness": "MidThickness", "inflated": "MidThickness",
              "sphere": "MidThickness"}
_GEOMETRIC = {"white": "Anatomical", "pial": "Anatomical", "midthickness": "Anatomical", "inflated": "Inflated",
              "sphere": "Spherical"}
_MD = nib.gifti.GiftiMetaData


@dataclass(frozen=True)
class Mesh:
    """A triangulated surface: ``coords`` (N, 3) float32 in RAS mm, ``faces`` (M, 3) int32."""

    coords: np.ndarray
    faces: np.ndarray

    @property
    def n_vertices(self) -> int:
        return int(self.coords.shape[0])


def _read_mesh(path: Path) -> Mesh:
    img = nib.load(str(path))
    coords = img.agg_data("NIFTI_INTENT_POINTSET")
    faces = img.agg_data("NIFTI_INTENT_TRIANGLE")
    return Mesh(np.asarray(coords, dtype=np.float32), np.asarray(faces, dtype=np.int32))


@lru_cache(maxsize=None)
def load_mesh(mesh: str, hemi: str, surface: str = "midthickness") -> Mesh:
    """A template surface, read offline.

    Args:
        mesh: ``fsaverage5`` or ``fsLR`` (32k).
        hemi: ``L`` or ``R``.
        surface: ``white``, ``pial``, ``midthickness``, ``inflated`` or ``sphere`` (``fsLR``: ``midthickness``
            and ``sphere`` only).

    Raises:
        NoInputError: the package carrying the mesh is missing.
        ValueError: unknown mesh, hemisphere or surface.

    Examples:
        >>> load_mesh("fsaverage5", "L", "pial").n_vertices
        10242
        >>> load_mesh("fsLR", "R").n_vertices
        32492
    """
    if hemi not in HEMISPHERES:
        raise ValueError(f"hemi must be L or R, got {hemi!r}")
    if mesh == "fsaverage5":
        if surface == "midthickness":
            white, pial = load_mesh(mesh, hemi, "white"), load_mesh(mesh, hemi, "pial")
            return Mesh(((white.coords + pial.coords) / 2).astype(np.float32), white.faces)
        if surface not in ("white", "pial", "inflated", "sphere"):
            raise ValueError(f"unknown fsaverage5 surface {surface!r}")
        return _read_mesh(fsaverage5_file(hemi, surface).path)
    if mesh == "fsLR":
        if surface == "inflated":
            return inflate(load_mesh(mesh, hemi, "midthickness"))
        if surface not in ("midthickness", "sphere"):
            raise ValueError(f"the fsLR 32k mesh has midthickness, inflated (computed) and sphere surfaces, not {surface!r}")
        return _read_mesh(fslr_file(hemi, surface).path)
    raise ValueError(f"mesh must be one of {MESHES}, got {mesh!r}")


def inflate(mesh: Mesh, iterations: int = 60, step: float = 0.5) -> Mesh:
    """An inflated copy of a surface (Laplacian smoothing of the vertex coordinates, rescaled to the original
    size), for display: sulci open up while every vertex keeps its index.

    Examples:
        >>> m = load_mesh("fsLR", "L", "midthickness")
        >>> inflate(m, iterations=5).n_vertices == m.n_vertices
        True
    """
    n = mesh.n_vertices
    f = mesh.faces
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adjacency = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    adjacency.data[:] = 1.0
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    average = sparse.diags(1.0 / np.maximum(degree, 1)) @ adjacency
    coords = mesh.coords.astype(np.float64)
    centre = coords.mean(axis=0)
    size = np.sqrt(((coords - centre) ** 2).sum(axis=1).mean())
    for _ in range(iterations):
        coords = (1 - step) * coords + step * (average @ coords)
    new_centre = coords.mean(axis=0)
    new_size = np.sqrt(((coords - new_centre) ** 2).sum(axis=1).mean())
    coords = (coords - new_centre) * (size / max(new_size, 1e-9)) + centre
    return Mesh(coords.astype(np.float32), mesh.faces)


@lru_cache(maxsize=None)
def cortex_mask(mesh: str, hemi: str) -> np.ndarray:
    """Vertices that are cortex (``False`` on the medial wall; fsaverage5: all ``True``).

    Examples:
        >>> int(cortex_mask("fsLR", "L").sum()) < 32492
        True
    """
    if mesh == "fsLR":
        # TemplateFlow's desc-nomedialwall label: non-zero on cortex, 0 on the medial wall
        mask = np.asarray(nib.load(str(fslr_file(hemi, "nomedialwall").path)).agg_data()) > 0
        mask.setflags(write=False)
        return mask
    n = load_mesh(mesh, hemi, "pial" if mesh == "fsaverage5" else "midthickness").n_vertices
    mask = np.ones(n, dtype=bool)
    mask.setflags(write=False)
    return mask


def vertex_normals(mesh: Mesh) -> np.ndarray:
    """Unit outward normals per vertex (area-weighted mean of the adjacent faces' normals).

    Examples:
        >>> tet = Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32),
        ...            np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32))
        >>> bool((vertex_normals(tet)[3] @ np.array([0, 0, 1.0])) > 0)
        True
    """
    v = mesh.coords.astype(np.float64)
    f = mesh.faces
    face_normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, f[:, k], face_normals)
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = normals / np.where(norm > 0, norm, 1.0)
    # orient outwards: most normals should point away from the hemisphere's centre
    centre = v.mean(axis=0)
    if np.mean(np.sum((v - centre) * normals, axis=1)) < 0:
        normals = -normals
    return normals.astype(np.float32)


def sample_volume(data: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of a volume at RAS-mm ``points`` (trilinear by default; 0 outside the volume).

    Examples:
        >>> vol = np.arange(8, dtype=float).reshape(2, 2, 2)
        >>> sample_volume(vol, np.eye(4), np.array([[0.5, 0.5, 0.5], [0, 0, 1]])).tolist()
        [3.5, 1.0]
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = inv[:3, :3] @ pts.T + inv[:3, 3:4]
    return ndimage.map_coordinates(np.asarray(data, dtype=np.float32), ijk, order=order, mode="constant", cval=0.0)


def vol_to_surf(data: np.ndarray, affine: np.ndarray, mesh: str, hemi: str,
                depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                normal_offsets_mm: Sequence[float] = (-1.5, -0.75, 0.0, 0.75, 1.5)) -> np.ndarray:
    """Sample a template-space volume on a template mesh (mean over cortical depths).

    Args:
        data: 3D map in MNI152NLin2009cAsym space.
        affine: its voxel-to-RAS affine.
        mesh: ``fsaverage5`` (white-to-pial segment at ``depths``) or ``fsLR`` (midthickness +/- the normal
            at ``normal_offsets_mm``).
        hemi: ``L`` or ``R``.

    Returns:
        One float32 value per vertex; 0 on the fsLR medial wall.
    """
    if mesh == "fsaverage5":
        white, pial = load_mesh(mesh, hemi, "white"), load_mesh(mesh, hemi, "pial")
        samples = [sample_volume(data, affine, white.coords + t * (pial.coords - white.coords)) for t in depths]
    else:
        mid = load_mesh(mesh, hemi, "midthickness")
        normals = vertex_normals(mid)
        samples = [sample_volume(data, affine, mid.coords + d * normals) for d in normal_offsets_mm]
    values = np.mean(samples, axis=0).astype(np.float32)
    values[~cortex_mask(mesh, hemi)] = 0.0
    return values


def metric_gifti(maps: Mapping[str, np.ndarray], hemi: str, description: str = "") -> nib.gifti.GiftiImage:
    """A GIFTI metric (``.func.gii``): one data array per named map, for one hemisphere.

    Examples:
        >>> img = metric_gifti({"relevance": np.zeros(4)}, "L")
        >>> img.meta["AnatomicalStructurePrimary"], img.darrays[0].meta["Name"]
        ('CortexLeft', 'relevance')
    """
    meta = {"AnatomicalStructurePrimary": STRUCTURES[hemi]}
    if description:
        meta["Description"] = description
    arrays = [
        nib.gifti.GiftiDataArray(np.asarray(values, dtype=np.float32), intent="NIFTI_INTENT_NONE",
                                 datatype="NIFTI_TYPE_FLOAT32", encoding="GIFTI_ENCODING_B64GZ",
                                 meta=_MD({"Name": name}))
        for name, values in maps.items()
    ]
    return nib.gifti.GiftiImage(darrays=arrays, meta=_MD(meta))


def surface_gifti(mesh: Mesh, hemi: str, surface: str = "midthickness") -> nib.gifti.GiftiImage:
    """A GIFTI surface (``.surf.gii``) with the structure/type metadata Workbench reads.

    Examples:
        >>> img = surface_gifti(load_mesh("fsaverage5", "R", "inflated"), "R", "inflated")
        >>> img.darrays[0].meta["GeometricType"], img.meta["AnatomicalStructurePrimary"]
        ('Inflated', 'CortexRight')
    """
    meta = {"AnatomicalStructurePrimary": STRUCTURES[hemi], "AnatomicalStructureSecondary": _SECONDARY[surface],
            "GeometricType": _GEOMETRIC[surface]}
    points = nib.gifti.GiftiDataArray(mesh.coords.astype(np.float32), intent="NIFTI_INTENT_POINTSET",
                                      datatype="NIFTI_TYPE_FLOAT32", encoding="GIFTI_ENCODING_B64GZ", meta=_MD(meta))
    points.coordsys = nib.gifti.GiftiCoordSystem(dataspace=3, xformspace=3, xform=np.eye(4))
    triangles = nib.gifti.GiftiDataArray(mesh.faces.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE",
                                         datatype="NIFTI_TYPE_INT32", encoding="GIFTI_ENCODING_B64GZ",
                                         meta=_MD({"TopologicalType": "Closed"}))
    return nib.gifti.GiftiImage(darrays=[points, triangles], meta=_MD({"AnatomicalStructurePrimary": STRUCTURES[hemi]}))


def gifti_bytes(img: nib.gifti.GiftiImage) -> bytes:
    """The GIFTI XML (written with :func:`bids_siamese.bids.derivatives.write_bytes`)."""
    return img.to_bytes()
