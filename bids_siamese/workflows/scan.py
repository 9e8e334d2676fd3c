"""The per-scan workflow of the participant level, composed of sub-workflows in fMRIPrep's shape.

``workflows/participant.py`` holds one :func:`init_scan_wf` per scan; each scan workflow joins five
sub-workflows, each with an ``inputnode`` and an ``outputnode`` and built from only the parameters it needs::

    init_scan_wf(scan, settings)           inputnode (t1w) ... outputnode (orientation, out_files)
      init_preproc_wf                      check_header, conform, brain_extraction | reuse_anatomical,
                                           register (unless the pipeline's transform is reused), model_grid
      init_orientation_qc_wf               register_shear_free, orientation (gate + left-right), figures
      init_asymmetry_wf                    asymmetry (with a symmetry --model: its Siamese score too)
      init_embedding_wf                    embedding (only with a twin or longitudinal --model)
      init_derivatives_wf                  write_derivatives (the one writer into OUTPUT_DIR)

Every node declares ``mem_gb`` and ``n_procs``, so that MultiProc never starts more torch models than the
memory allows.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids.fmriprep import AnatDerivatives, find_anat
from ..bids.layout import T1wScan, bids_relative
from ..config import Settings
from ..interfaces.derivatives import WriteDerivatives
from ..interfaces.embedding import ComputeEmbedding
from ..interfaces.preproc import (
    AffineRegistration,
    BrainExtraction,
    CheckHeader,
    Conform,
    ModelGrid,
    OrientationCheck,
    ReportFigures,
    ReuseAnatomical,
)
from ..interfaces.symmetry import AsymmetryAnalysis

LOG = logging.getLogger("bids_siamese.participant")

#: Memory per node in GB, measured with benchmarks/participant.py on 1 mm scans (see docs/benchmarks.md).
MEM_GB = {"light": 0.5, "conform": 1.0, "brain": 3.0, "register": 1.5, "grid": 1.0, "figures": 0.8}

#: torch threads of the affine registrations, whatever --omp-nthreads says: its float32 sums (correlation,
#: grid_sample gradients) are split across threads, so another thread count changes the last bits of the
#: transform and of everything resampled with it. One thread keeps outputs identical across --nprocs and
#: --omp-nthreads (docs/reliability.md); the registration is a few seconds per scan.
REGISTRATION_THREADS = 1


def uses_gpu(device: str) -> bool:
    """Whether torch nodes run on a CUDA device (``--device cuda[:N]``).

    Examples:
        >>> uses_gpu("cuda:1"), uses_gpu("cpu")
        (True, False)
    """
    return str(device).startswith("cuda")


def torch_node_resources(device: str, cpu_threads: int) -> tuple[dict[str, Any], int]:
    """Interface inputs (``device``, ``use_gpu``, ``num_threads``) and ``n_procs`` of a torch node.

    On a GPU the node declares GPU use, so that MultiProc runs at most ``n_gpu_procs`` of them at once, and takes
    one CPU thread (its CPU part is single-threaded); on the CPU it takes ``cpu_threads``.

    Examples:
        >>> torch_node_resources("cuda:1", 4)
        ({'device': 'cuda:1', 'use_gpu': True, 'num_threads': 1}, 1)
        >>> torch_node_resources("cpu", 4)
        ({'device': 'cpu', 'use_gpu': False, 'num_threads': 4}, 4)
    """
    threads = 1 if uses_gpu(device) else max(1, int(cpu_threads))
    return {"device": str(device), "use_gpu": uses_gpu(device), "num_threads": threads}, threads


def registration_resolution(resolution: float) -> float:
    """The finest spacing of the registrations (and of the orientation check's): the grid's, at least 2 mm."""
    return max(float(resolution), 2.0)


def hash_by_timestamp(*nodes: pe.Node) -> None:
    """Nodes whose file inputs are all written by the workflow hash them by size and modification time (nipype's
    default) instead of by content: six of them read the float32 1 mm T1w (30-65 MB), and an md5 of it in each
    cost about 0.5 CPU s per scan. A rerun still reuses them: their inputs keep their times unless an upstream
    node ran again. Nodes that read the user's files (BIDS, fMRIPrep, a model) keep the run's content hashing."""
    for node in nodes:
        node.config = {"execution": {"hash_method": "timestamp"}}


def scan_wf_name(scan: T1wScan) -> str:
    """The scan's workflow (and work-dir folder) name: ``scan_<source name, non-alphanumerics as _>_wf``.

    Examples:
        >>> from pathlib import Path
        >>> scan_wf_name(T1wScan(Path("sub-01_ses-1_T1w.nii.gz"), {"subject": "01", "session": "1"}))
        'scan_sub_01_ses_1_T1w_wf'
    """
    return "scan_" + re.sub(r"[^A-Za-z0-9]", "_", scan.name) + "_wf"


def anatomical_derivatives(settings: Settings, scan: T1wScan) -> AnatDerivatives | None:
    """The scan's fMRIPrep/sMRIPrep files (:class:`~bids_siamese.bids.fmriprep.AnatDerivatives`), or None
    without ``--derivatives`` or when the folder has none for it (logged: the scan is then processed alone)."""
    for dataset in settings.derivatives.values():
        anat = find_anat(dataset, scan.entities, scan.name)
        if anat is None:
            LOG.warning("%s: no %s anatomical outputs in %s; using deepbet and our registration", scan.name,
                        dataset.pipeline, dataset.path)
            continue
        reused = "brain mask and T1w-to-MNI transform" if anat.xfm else "brain mask (no T1w-to-MNI transform: " \
            "estimated by our registration)"
        LOG.info("%s: reusing %s %s's %s (%s reference %s)", scan.name, dataset.pipeline, dataset.version, reused,
                 anat.layout, dataset.uri(anat.preproc))
        return anat
    return None


def model_task(model: Path | None) -> str | None:
    """The task recorded in a checkpoint's model card (None without a model; None and a WARNING naming the card
    when it cannot be read: the participant level then runs without the model)."""
    if model is None:
        return None
    model = Path(model)
    card = model / "model_card.json" if model.is_dir() else model.with_name("model_card.json")
    try:
        return str(json.loads(card.read_text())["task"])
    except (OSError, ValueError, KeyError) as err:
        LOG.warning("cannot read the task from the model card %s (%s: %s): no embedding or Siamese score at the "
                    "participant level; fix: pass --model a checkpoint folder written by the group level",
                    card, type(err).__name__, err)
        return None


# ------------------------------------------------------------------------------------------------
# the sub-workflows
# ------------------------------------------------------------------------------------------------

def init_preproc_wf(*, resolution: float, mem_gb: float, omp_nthreads: int, device: str, seed: int,
                    anat: AnatDerivatives | None = None, source: str | None = None,
                    name: str = "preproc_wf") -> pe.Workflow:
    """Header checks, conform (RAS), brain mask, template registration and the model grid of one T1w.

    Args:
        resolution: the model grid's spacing in mm (``--resolution``).
        mem_gb: the memory the run may use (``--mem-gb``): a larger image, by its header, is rejected.
        omp_nthreads: CPU threads of the brain extraction.
        device: torch device of the brain extraction and the registration.
        seed: seeds the registration's sampling of template voxels.
        anat: the scan's fMRIPrep/sMRIPrep files to reuse (mask, and the transform when it has one), or None:
            deepbet and our registration.
        source: the raw scan relative to BIDS_DIR (recorded with ``anat``).
        name: the workflow's name.

    Inputs ``t1w``. Outputs ``header_checks`` (JSON), ``t1w`` (conformed), ``native_mask``, ``xfm_matrix`` and
    ``xfm_itk`` (template-to-T1w), ``grid_t1w``, ``grid_mask``, and with ``anat`` ``reuse_report``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    fields = ["header_checks", "t1w", "native_mask", "xfm_matrix", "xfm_itk", "grid_t1w", "grid_mask"]
    outputnode = pe.Node(niu.IdentityInterface(fields=fields + (["reuse_report"] if anat else [])),
                         name="outputnode")
    check = pe.Node(CheckHeader(max_gb=mem_gb), name="check_header", mem_gb=MEM_GB["conform"], n_procs=1)
    conform = pe.Node(Conform(), name="conform", mem_gb=MEM_GB["conform"], n_procs=1)
    grid = pe.Node(ModelGrid(resolution=resolution), name="model_grid", mem_gb=MEM_GB["grid"], n_procs=1)
    # every scan keeps its own raw image (its orientation, figures and model-grid volume): a pipeline's reference
    # made from several sessions gives each session only its mask and transform, moved onto the session's image
    if anat is None:
        brain_inputs, brain_procs = torch_node_resources(device, omp_nthreads)
        brain = pe.Node(BrainExtraction(**brain_inputs), name="brain_extraction", mem_gb=MEM_GB["brain"],
                        n_procs=brain_procs)
        hash_by_timestamp(brain)
    else:
        brain = pe.Node(ReuseAnatomical(anat=anat.as_dict(), anat_files=[str(p) for p in anat.files()],
                                        scan=str(source)),
                        name="reuse_anatomical", mem_gb=MEM_GB["conform"], n_procs=1)
        wf.connect([(brain, outputnode, [("out_report", "reuse_report")])])
    wf.connect([
        (inputnode, check, [("t1w", "in_file")]),
        (check, conform, [("out_file", "in_file")]),
        (conform, brain, [("out_file", "in_file")]),
        (conform, grid, [("out_file", "in_file")]),
        (brain, grid, [("out_mask", "in_mask")]),
        (check, outputnode, [("out_checks", "header_checks")]),
        (conform, outputnode, [("out_file", "t1w")]),
        (brain, outputnode, [("out_mask", "native_mask")]),
        (grid, outputnode, [("out_file", "grid_t1w"), ("out_mask", "grid_mask")]),
    ])
    transform = brain
    if anat is None or anat.xfm is None:
        # one thread (REGISTRATION_THREADS: outputs do not depend on the thread count); the tensors are small
        # (<= 60,000 points), extra threads only stall; the orientation check's shear-free registration refines
        # this one's matrix (init_orientation_qc_wf's refine_initial)
        reg_inputs, reg_procs = torch_node_resources(device, REGISTRATION_THREADS)
        transform = pe.Node(AffineRegistration(resolution=registration_resolution(resolution), seed=seed,
                                               **reg_inputs),
                            name="register", mem_gb=MEM_GB["register"], n_procs=reg_procs)
        wf.connect([(conform, transform, [("out_file", "in_file")]), (brain, transform, [("out_mask", "in_mask")])])
        hash_by_timestamp(transform)
    wf.connect([(transform, grid, [("out_matrix", "in_matrix")]),
                (transform, outputnode, [("out_matrix", "xfm_matrix"), ("out_itk", "xfm_itk")])])
    hash_by_timestamp(grid)
    return wf


def init_orientation_qc_wf(*, resolution: float, seed: int, device: str, orientation_model: str | None = None,
                           refine_initial: bool = False, name: str = "orientation_qc_wf") -> pe.Workflow:
    """The usable-scan gate, the left-right orientation check and the QC figures of one scan.

    The check needs a shear-free registration (shears imitate the brain's torque asymmetry): its own 9-dof
    ``register_shear_free``, which refines the preprocessing's 12-dof matrix (input ``initial_matrix``) when
    ``refine_initial`` is set, instead of searching from scratch. The ``orientation`` node (:class:`~bids_siamese.interfaces.preproc.OrientationCheck`)
    registers the mirrored image as well: one thread, as the registrations, so outputs do not depend on
    ``--omp-nthreads``.

    Args:
        resolution: the model grid's spacing in mm (the registrations use at least 2 mm).
        seed: seeds the registrations.
        device: torch device of the registrations.
        orientation_model: a ``group --task orientation`` checkpoint (``--orientation-model``), or None.
        refine_initial: start the shear-free registration from ``inputnode.initial_matrix`` (our own 12-dof
            registration's matrix; not set when fMRIPrep's transform is reused, whose matrix is not ours).
        name: the workflow's name.

    Inputs ``header_checks``, ``t1w`` (conformed), ``native_mask``, ``grid_t1w``, ``initial_matrix``. Outputs ``report`` (the QC
    JSON) and ``figures`` (brain-mask, registration and orientation SVGs, in that order).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["header_checks", "t1w", "native_mask", "grid_t1w",
                                                      "initial_matrix"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["report", "figures"]), name="outputnode")
    reg_inputs, reg_procs = torch_node_resources(device, REGISTRATION_THREADS)
    register_qc = pe.Node(AffineRegistration(resolution=registration_resolution(resolution), seed=seed, dof=9,
                                             **reg_inputs),
                          name="register_shear_free", mem_gb=MEM_GB["register"], n_procs=reg_procs)
    orient = pe.Node(OrientationCheck(resolution=registration_resolution(resolution), seed=seed, device=device,
                                      num_threads=REGISTRATION_THREADS),
                     name="orientation", mem_gb=MEM_GB["register"], n_procs=REGISTRATION_THREADS)
    if refine_initial:
        wf.connect([(inputnode, register_qc, [("initial_matrix", "in_initial")])])
    if orientation_model:
        orient.inputs.orientation_model = str(orientation_model)
        wf.connect([(inputnode, orient, [("grid_t1w", "grid_file")])])
    figures = pe.Node(ReportFigures(), name="figures", mem_gb=MEM_GB["figures"], n_procs=1)
    merge_figs = pe.Node(niu.Merge(3), name="merge_figures", mem_gb=MEM_GB["light"], n_procs=1)
    wf.connect([
        (inputnode, register_qc, [("t1w", "in_file"), ("native_mask", "in_mask")]),
        (inputnode, orient, [("header_checks", "in_checks"), ("t1w", "t1w"), ("native_mask", "native_mask")]),
        (register_qc, orient, [("out_matrix", "in_matrix")]),
        (inputnode, figures, [("t1w", "t1w"), ("native_mask", "native_mask"), ("grid_t1w", "grid_file")]),
        (figures, merge_figs, [("out_mask_svg", "in1"), ("out_reg_svg", "in2"), ("out_orient_svg", "in3")]),
        (orient, outputnode, [("out_report", "report")]),
        (merge_figs, outputnode, [("out", "figures")]),
    ])
    hash_by_timestamp(register_qc, orient, figures, merge_figs)
    return wf


def init_asymmetry_wf(*, atlas: str, omp_nthreads: int, model: str | None = None,
                      name: str = "asymmetry_wf") -> pe.Workflow:
    """Asymmetry map, regional indices and scores of one scan on the model grid.

    Args:
        atlas: the atlas of the regional indices (``--atlas``).
        omp_nthreads: torch threads of the Siamese symmetry model (the node holds as many slots).
        model: a ``group --task symmetry`` checkpoint, or None (no Siamese score, one thread).
        name: the workflow's name.

    Inputs ``grid_t1w``, ``grid_mask``. Outputs ``map``, ``regions`` (TSV), ``report`` (JSON).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["grid_t1w", "grid_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["map", "regions", "report"]), name="outputnode")
    # torch threads only for the Siamese symmetry model; the slots it holds match the threads it uses
    threads = omp_nthreads if model else 1
    asymmetry = pe.Node(AsymmetryAnalysis(atlas=atlas, num_threads=threads), name="asymmetry",
                        mem_gb=MEM_GB["grid"], n_procs=threads)
    if model:
        asymmetry.inputs.model = str(model)
    else:  # the model file is the user's: content hashing with a model
        hash_by_timestamp(asymmetry)
    wf.connect([
        (inputnode, asymmetry, [("grid_t1w", "in_file"), ("grid_mask", "in_mask")]),
        (asymmetry, outputnode, [("out_map", "map"), ("out_regions", "regions"), ("out_report", "report")]),
    ])
    return wf


def init_embedding_wf(*, model: str, device: str, omp_nthreads: int, name: str = "embedding_wf") -> pe.Workflow:
    """The embedding of one scan by a twin or longitudinal checkpoint (``--model``).

    Inputs ``grid_t1w``. Outputs ``embedding`` (one-row TSV) and ``task`` (the model's, for ``desc-<task>``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["grid_t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["embedding", "task"]), name="outputnode")
    embed_inputs, embed_procs = torch_node_resources(device, omp_nthreads)
    embed = pe.Node(ComputeEmbedding(model=str(model), **embed_inputs), name="embedding", mem_gb=MEM_GB["brain"],
                    n_procs=embed_procs)
    wf.connect([(inputnode, embed, [("grid_t1w", "in_file")]),
                (embed, outputnode, [("out_tsv", "embedding"), ("out_task", "task")])])
    return wf


def init_derivatives_wf(*, output_dir: Path, bids_dir: Path, source_file: Path, entities: dict[str, str],
                        resolution: float, resolution_label: str, brain_source: str | None = None,
                        embedding: bool = False, name: str = "derivatives_wf") -> pe.Workflow:
    """The one writer into OUTPUT_DIR: every file of one scan, named by ``bids/derivatives.py``.

    Args:
        output_dir, bids_dir: OUTPUT_DIR and BIDS_DIR.
        source_file: the raw T1w; ``entities``: its BIDS entities (the names come from them).
        resolution, resolution_label: the model grid's spacing and its label (``--resolution``).
        brain_source: the pipeline whose mask and transform are reused (``fmriprep``, ``smriprep``), or None
            (deepbet); with it, the input ``reuse_report``.
        embedding: whether the inputs ``embedding`` and ``embedding_task`` come (a twin or longitudinal model).
        name: the workflow's name.

    Inputs ``preproc``, ``grid_mask``, ``native_mask``, ``xfm``, ``orientation``, ``figures``, ``asymmetry_map``,
    ``asymmetry_regions``, ``asymmetry_report`` (+ the optional ones above). Outputs ``orientation`` (the QC
    JSON in OUTPUT_DIR) and ``out_files`` (every path written, relative to OUTPUT_DIR).
    """
    fields = ["preproc", "grid_mask", "native_mask", "xfm", "orientation", "figures", "asymmetry_map",
              "asymmetry_regions", "asymmetry_report"]
    fields += ["reuse_report"] if brain_source else []
    fields += ["embedding", "embedding_task"] if embedding else []
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["orientation", "out_files"]), name="outputnode")
    sink = pe.Node(
        WriteDerivatives(output_dir=str(output_dir), bids_dir=str(bids_dir), source_file=str(source_file),
                         entities=dict(entities), resolution=resolution, resolution_label=resolution_label),
        name="write_derivatives", mem_gb=MEM_GB["light"], n_procs=1, overwrite=True,
    )
    if brain_source:
        sink.inputs.brain_source = brain_source
    wf.connect([(inputnode, sink, [(field, field) for field in fields]),
                (sink, outputnode, [("out_orientation", "orientation"), ("out_files", "out_files")])])
    hash_by_timestamp(sink)
    return wf


def init_scan_wf(scan: T1wScan, settings: Settings, name: str | None = None) -> pe.Workflow:
    """One T1w scan: preprocessing, orientation QC, asymmetry, embedding (with a twin or longitudinal model) and
    derivatives, each a sub-workflow built from the settings it needs."""
    anat = anatomical_derivatives(settings, scan)
    task = model_task(settings.model)
    wf = pe.Workflow(name=name or scan_wf_name(scan))
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    inputnode.inputs.t1w = str(scan.path)
    outputnode = pe.Node(niu.IdentityInterface(fields=["orientation", "out_files"]), name="outputnode")

    preproc_wf = init_preproc_wf(resolution=settings.resolution, mem_gb=settings.mem_gb,
                                 omp_nthreads=settings.omp_nthreads, device=settings.device, seed=settings.seed,
                                 anat=anat, source=str(bids_relative(scan.path, settings.bids_dir)) if anat else None)
    qc_wf = init_orientation_qc_wf(resolution=settings.resolution, seed=settings.seed, device=settings.device,
                                   orientation_model=str(settings.orientation_model) if settings.orientation_model
                                   else None, refine_initial=anat is None or anat.xfm is None)
    asymmetry_wf = init_asymmetry_wf(atlas=settings.atlas, omp_nthreads=settings.omp_nthreads,
                                     model=str(settings.model) if task == "symmetry" else None)
    embeds = task in ("twin", "longitudinal")
    derivatives_wf = init_derivatives_wf(
        output_dir=settings.output_dir, bids_dir=settings.bids_dir, source_file=scan.path, entities=scan.entities,
        resolution=settings.resolution, resolution_label=settings.resolution_label,
        brain_source=anat.dataset.name if anat else None, embedding=embeds)
    wf.connect([
        (inputnode, preproc_wf, [("t1w", "inputnode.t1w")]),
        (preproc_wf, qc_wf, [("outputnode.header_checks", "inputnode.header_checks"),
                             ("outputnode.t1w", "inputnode.t1w"), ("outputnode.native_mask", "inputnode.native_mask"),
                             ("outputnode.grid_t1w", "inputnode.grid_t1w"),
                             ("outputnode.xfm_matrix", "inputnode.initial_matrix")]),
        (preproc_wf, asymmetry_wf, [("outputnode.grid_t1w", "inputnode.grid_t1w"),
                                    ("outputnode.grid_mask", "inputnode.grid_mask")]),
        (preproc_wf, derivatives_wf, [("outputnode.grid_t1w", "inputnode.preproc"),
                                      ("outputnode.grid_mask", "inputnode.grid_mask"),
                                      ("outputnode.native_mask", "inputnode.native_mask"),
                                      ("outputnode.xfm_itk", "inputnode.xfm")]),
        (qc_wf, derivatives_wf, [("outputnode.report", "inputnode.orientation"),
                                 ("outputnode.figures", "inputnode.figures")]),
        (asymmetry_wf, derivatives_wf, [("outputnode.map", "inputnode.asymmetry_map"),
                                        ("outputnode.regions", "inputnode.asymmetry_regions"),
                                        ("outputnode.report", "inputnode.asymmetry_report")]),
        (derivatives_wf, outputnode, [("outputnode.orientation", "orientation"),
                                      ("outputnode.out_files", "out_files")]),
    ])
    if anat:
        wf.connect([(preproc_wf, derivatives_wf, [("outputnode.reuse_report", "inputnode.reuse_report")])])
    if embeds:
        embedding_wf = init_embedding_wf(model=str(settings.model), device=settings.device,
                                         omp_nthreads=settings.omp_nthreads)
        wf.connect([(preproc_wf, embedding_wf, [("outputnode.grid_t1w", "inputnode.grid_t1w")]),
                    (embedding_wf, derivatives_wf, [("outputnode.embedding", "inputnode.embedding"),
                                                    ("outputnode.task", "inputnode.embedding_task")])])
    return wf


