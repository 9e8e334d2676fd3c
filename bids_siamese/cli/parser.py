"""BIDS-Apps command line: ``bids-siamese BIDS_DIR OUTPUT_DIR {participant,group} [options]``."""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..bids.fmriprep import PIPELINES, PipelineDataset, read_pipeline_dataset
from ..bids.layout import clean_label, load_filter_file
from ..config import Settings, available_cpus, available_memory_gb
from ..errors import EXIT_CODES, AnalysisLevelError, NoInputError, UsageError
from ..resources import model_grid

ANALYSIS_LEVELS = ("participant", "group")


class TaskChoices:
    """The ``--task`` choices, read from their one source (:func:`bids_siamese.bids.derivatives.group_tasks`, the
    tasks' output names) only when argparse checks a ``--task`` value or prints them (``--help``)."""

    def names(self) -> tuple[str, ...]:
        """The task names."""
        from ..bids.derivatives import group_tasks  # deferred: pandas and pybids (~1 s) only when --task is used

        return group_tasks()

    def __contains__(self, value: object) -> bool:
        return value in self.names()

    def __iter__(self):
        return iter(self.names())


TASKS = TaskChoices()
BACKBONES = ("small", "unet", "resnet18", "densenet121", "swin")
#: ``--backbone`` choices: the CNN encoders and the atlas-region models (bids_siamese.models.regional).
MODEL_CHOICES = (*BACKBONES, "regional", "regional_cnn")
#: Training defaults when an option is not given: the atlas-region twin model learns one weight per region from
#: few pairs (larger steps, more epochs, whole-population batches, no augmentation: it compares each voxel
#: with the training population, so shifted or rescaled inputs would be false differences).
TRAINING_DEFAULTS = {
    "cnn": {"epochs": 30, "batch_size": 8, "lr": 1e-3, "patience": 5},
    "regional": {"epochs": 100, "batch_size": 32, "lr": 0.05, "patience": 50},
}
#: ``--lrp-rules`` and ``--symmetry-fusion`` choices (bids_siamese.explain.rules.RULE_SETS and
#: bids_siamese.symmetry.model.FUSIONS; written out here so that parsing never imports torch or captum).
LRP_RULE_SETS = ("epsilon_plus", "epsilon")
SYMMETRY_FUSIONS = ("difference", "embedding", "cross_attention")
#: ``--volume-cache`` choices (bids_siamese.train.data.VOLUME_CACHE_DTYPES).
VOLUME_CACHE_DTYPES = ("float16", "float32")
#: ``--loader-workers`` default on CUDA: at most this many DataLoader workers (and one CPU left to the trainer).
CUDA_LOADER_WORKERS = 4
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (exit 64) instead of exiting with 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message}; fix: see {self.prog} --help")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show ``(default: X)`` once, only for informative defaults the help text does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        uninformative = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or uninformative or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: {default})"


def program_name(argv0: str | None = None) -> str:
    """The name the user typed: ``run.py``, ``bids-siamese``, ... (``python -m bids_siamese`` for -m)."""
    name = os.path.basename(sys.argv[0] if argv0 is None and sys.argv else (argv0 or ""))
    if name in ("__main__.py", "-m"):
        return "python -m bids_siamese"
    return name or "bids-siamese"


def help_epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
    return ("exit codes:\n" + codes + "\n\nFull documentation: docs/usage.md (options, exit codes), docs/outputs.md "
            "(every file written),\ndocs/reliability.md (what happens on failures, kills and concurrent runs).")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog or program_name(),
        description="Siamese networks for brain MRI, as a BIDS App. participant: preprocessing into "
        "MNI152NLin2009cAsym and orientation QC per T1w scan; group: collects per-scan results and, with --task, "
        "trains or applies a model. Default models: the atlas-region models ('regional') for --task twin and "
        "--task longitudinal; 3D CNN encoders by --backbone ('small' is the default for --task symmetry).",
        formatter_class=_HelpFormatter,
        epilog=help_epilog(),
    )
    p.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="where derivatives are written")
    p.add_argument("analysis_level", help="participant or group")
    p.add_argument("--version", action="version", version=f"bids-siamese {__version__}")

    sel = p.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                     help="subjects to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", nargs="+", default=[], metavar="LABEL",
                     help="sessions to process, with or without 'ses-' (default: all)")
    sel.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                     help='JSON query in fMRIPrep format, e.g. {"t1w": {"session": "01", "acquisition": null}}')
    sel.add_argument("--skip-bids-validation", action="store_true", help="do not run bids-validator-deno")
    sel.add_argument("--derivatives", nargs="+", default=[], metavar="NAME=PATH",
                     help="reuse fMRIPrep's or sMRIPrep's anatomical derivatives (brain mask, T1w-to-MNI152NLin2009cAsym "
                          "transform), e.g. fmriprep=/data/derivatives/fmriprep or smriprep=PATH; the folder's "
                          "dataset_description.json must name that pipeline in GeneratedBy (see docs/usage.md)")

    proc = p.add_argument_group("processing")
    proc.add_argument("--resolution", type=float, default=2.0, help="model grid spacing in mm")
    proc.add_argument("--model", type=Path, metavar="PATH",
                      help="a trained checkpoint (folder with model card); participant level also writes embeddings")
    proc.add_argument("--init", type=Path, metavar="PATH",
                      help="group --task twin, longitudinal or symmetry (--mode train): start the encoder from a "
                           "pretrained one (the folder written by group --task pretrain, its model.pt or "
                           "model_card.json); its backbone and --resolution must be the run's")
    proc.add_argument("--orientation-model", type=Path, metavar="PATH",
                      help="participant level: a checkpoint of 'group --task orientation' that gives the left-right "
                           "verdict (the image-based test is still recorded)")

    grp = p.add_argument_group("group level: Siamese models")
    grp.add_argument("--task", choices=TASKS, help="group analysis to run (default: only collect participant tables)")
    grp.add_argument("--mode", choices=("train", "apply"), default="train", help="train a model or apply --model")
    grp.add_argument("--backbone", choices=MODEL_CHOICES, default=None,
                     help="model; 'regional' (twin, longitudinal): atlas-region model with few parameters that "
                          "learns from few pairs (default for --task twin and longitudinal; small for symmetry); "
                          "'regional_cnn' (twin): a small 3D CNN whose feature maps are compared region by region")
    grp.add_argument("--embedding-dim", type=int, default=128, help="embedding size")
    grp.add_argument("--distance", choices=("cosine", "euclidean"), default="cosine", help="embedding distance")
    grp.add_argument("--margin", type=float, default=0.2, help="triplet loss margin")
    grp.add_argument("--dz-positives", action="store_true", help="use DZ co-twins as weaker positives")
    grp.add_argument("--epochs", type=int, default=None, help="maximum training epochs (default 30; regional 100)")
    grp.add_argument("--batch-size", type=int, default=None, help="training batch size (default 8; regional 32)")
    grp.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; regional 0.05)")
    grp.add_argument("--patience", type=int, default=None,
                     help="early stopping patience in epochs (default 5; regional 50)")
    grp.add_argument("--n-draws", type=int, default=10, help="random draws of non-twin test pairs for mean +- std")
    grp.add_argument("--family-column", default="family_id", help="participants.tsv column with family ids")
    grp.add_argument("--zygosity-column", default="zygosity", help="participants.tsv column with MZ/DZ")
    grp.add_argument("--label-column", default="group", help="participants.tsv column with decline/stable")
    grp.add_argument("--pairs-file", type=Path, metavar="TSV", help="twin pairs TSV instead of family columns")
    grp.add_argument("--top-k", type=int, default=5,
                     help="--task twin: closest relatives listed per scan (group_twins_relatives.tsv)")
    grp.add_argument("--atlas", default=Settings.atlas,
                     help="bundled atlas name (harvard_oxford_cerebellum: Harvard-Oxford with AAL's cerebellum, the "
                          "default; harvard_oxford, aal, desikan_killiany, neuromorphometrics) or a NIfTI with a "
                          "label TSV")
    grp.add_argument("--lrp-target", choices=("embedding_abs", "embedding", "distance"), default="embedding_abs",
                     help="what LRP explains (see docs/outputs.md)")
    grp.add_argument("--relevance-fwhm", type=float, default=6.0, help="smoothing of the group relevance map (mm)")
    grp.add_argument("--lrp-rules", choices=LRP_RULE_SETS, default="epsilon_plus",
                     help="LRP rules for the CNNs: epsilon_plus (w^2 on the first convolution, z+ on the other "
                          "convolutions, epsilon on linear layers) or epsilon (LRP-0); see docs/outputs.md")
    grp.add_argument("--report-subjects", action="store_true",
                     help="group.html: a section per subject with its most relevant regions")
    grp.add_argument("--atlas-labels", type=Path, metavar="TSV",
                     help="label table (index, name) of an --atlas given as a NIfTI file")
    grp.add_argument("--symmetry-fusion", choices=SYMMETRY_FUSIONS, default="difference",
                     help="--task symmetry: how the two hemispheres' features meet (cross_attention: SA-Swin style)")
    grp.add_argument("--symmetry-fwhm", type=float, default=6.0, help="--task symmetry: smoothing of the asymmetry "
                     "maps (mm)")
    grp.add_argument("--symmetry-components", type=int, default=10, metavar="N",
                     help="--task symmetry: modes of normal asymmetry each scan is compared beyond (0: one voxelwise "
                          "median and spread for everyone; see docs/outputs.md#symmetry)")
    grp.add_argument("--orientation-folds", type=int, default=5,
                     help="--task orientation: family-aware folds (ensemble members); fewer with fewer families")
    grp.add_argument("--explain-surfaces", action="store_true", help="also project per-scan relevance to surfaces")
    grp.add_argument("--no-explain", dest="explain", action="store_false",
                     help="skip LRP, region ranking and Workbench files after --task twin")
    grp.add_argument("--include-unusable", action="store_true",
                     help="keep scans that failed the usable-scan gate (usable: false) in group training and scoring")

    perf = p.add_argument_group("performance and reproducibility")
    perf.add_argument("-w", "--work-dir", type=Path,
                      help="intermediate files (default: a folder in the system temp dir keyed by OUTPUT_DIR)")
    perf.add_argument("--clean-workdir", action="store_true",
                      help="remove this run's intermediate files from the work dir after a successful run")
    perf.add_argument("--nprocs", "--n-cpus", type=int, default=None, help="parallel processes (default: CPUs available)")
    perf.add_argument("--omp-nthreads", type=int, default=None, help="threads per process (default: min(8, nprocs))")
    perf.add_argument("--mem-gb", type=float, default=None, help="memory limit for the scheduler in GB")
    perf.add_argument("--use-plugin", type=Path, metavar="FILE",
                      help="nipype plugin settings (YAML/JSON: plugin, plugin_args), e.g. for SLURM")
    perf.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    perf.add_argument("--loader-workers", type=int, default=None, metavar="N",
                      help="group training (twin, longitudinal, orientation, symmetry): DataLoader worker processes "
                           f"that assemble the training batches (default: 0 on the CPU; min({CUDA_LOADER_WORKERS}, "
                           "nprocs - 1) on CUDA)")
    perf.add_argument("--volume-cache", choices=VOLUME_CACHE_DTYPES, default="float16",
                      help="group training (twin, longitudinal, orientation, symmetry): precision of the in-memory "
                           "stack of model-grid volumes (float16 halves its memory; float32 reproduces earlier "
                           "releases bit for bit)")
    perf.add_argument("--compile", action="store_true",
                      help="group training (twin, longitudinal, orientation, symmetry): torch.compile the model "
                           "(eager with a warning when compiling fails)")
    perf.add_argument("--seed", type=int, default=0, help="random seed")
    perf.add_argument("--deterministic", action="store_true",
                      help="group training: torch's deterministic algorithms where they exist, deterministic cuDNN "
                           "and CUBLAS_WORKSPACE_CONFIG on CUDA; one training thread on the CPU, so the result does "
                           "not depend on --omp-nthreads (slower; see docs/reliability.md)")
    perf.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0, help="more output (repeatable)")
    return p


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; check an explicit CUDA request."""
    if not DEVICE_RE.match(requested):
        raise UsageError(f"invalid --device '{requested}'; fix: use auto, cpu, cuda or cuda:N")
    if requested == "cpu":
        return "cpu"
    # ask NVML, not the CUDA runtime: a process that initialised CUDA cannot fork workers that use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch  # deferred: keeps the CLI's --help fast; only a device other than cpu needs it

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UsageError(f"--device {requested} asked for, but no CUDA device is usable; fix: use --device cpu or auto")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s); fix: pick a valid index")
    return requested


def parse_derivatives(items: Sequence[str]) -> dict[str, PipelineDataset]:
    """``NAME=PATH`` items -> checked derivative datasets (one anatomical source: fmriprep or smriprep)."""
    out: dict[str, PipelineDataset] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--derivatives '{item}' must be NAME=PATH; fix: e.g. --derivatives fmriprep=/out/fmriprep")
        if name not in PIPELINES:
            raise UsageError(f"--derivatives: unknown name '{name}'; fix: use one of {', '.join(PIPELINES)}")
        out[name] = read_pipeline_dataset(name, Path(value))
    if len(out) > 1:
        raise UsageError(f"--derivatives {' and '.join(out)}: both give the anatomical reference; fix: pass one of them")
    return out


def default_work_dir(output_dir: Path) -> Path:
    key = hashlib.sha1(str(output_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bids-siamese-work-{key}"


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse and check the command line; raise a :class:`UserError` for anything the user must fix."""
    args = build_parser().parse_args(argv)
    if args.analysis_level not in ANALYSIS_LEVELS:
        raise AnalysisLevelError(
            f"analysis level '{args.analysis_level}' is not one of {', '.join(ANALYSIS_LEVELS)}; fix: use participant or group"
        )
    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise NoInputError(f"BIDS_DIR {bids_dir} does not exist; fix: give the path of a BIDS dataset")
    if not (bids_dir / "dataset_description.json").is_file():
        raise NoInputError(f"{bids_dir} has no dataset_description.json; fix: point BIDS_DIR at the root of a BIDS dataset")
    output_dir = args.output_dir.expanduser().resolve()
    if output_dir == bids_dir or (
        _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives")
    ) or output_dir == bids_dir / "derivatives":
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is inside BIDS_DIR; fix: use a folder outside it or BIDS_DIR/derivatives/<name>"
        )
    work_dir = (args.work_dir.expanduser().resolve() if args.work_dir else default_work_dir(output_dir))
    if _is_within(work_dir, bids_dir):
        raise UsageError(f"work dir {work_dir} is inside BIDS_DIR; fix: pass -w with a folder outside the dataset")
    if _is_within(work_dir, output_dir) or _is_within(output_dir, work_dir):
        raise UsageError(f"work dir {work_dir} and OUTPUT_DIR {output_dir} overlap; fix: keep them apart")
    if args.resolution <= 0 or args.resolution > 8:
        raise UsageError(f"--resolution {args.resolution} mm is out of range; fix: use a value in (0, 8], e.g. 2")

    cpus = available_cpus()
    nprocs = args.nprocs if args.nprocs is not None else cpus
    if nprocs < 1:
        raise UsageError(f"--nprocs {nprocs} must be at least 1; fix: pass a positive number, or leave it out to use "
                         f"the {cpus} CPU(s) this process may use")
    if nprocs > cpus:  # more workers than CPUs only adds memory and forks (and --nprocs 1000 forked 388 workers)
        print(f"bids-siamese: warning: --nprocs {nprocs} is more than the {cpus} CPU(s) this process may use "
              f"(CPU affinity); using {cpus}", file=sys.stderr, flush=True)
        nprocs = cpus
    omp = args.omp_nthreads if args.omp_nthreads is not None else min(8, nprocs)
    if omp < 1:
        raise UsageError(f"--omp-nthreads {omp} must be at least 1; fix: pass a positive number, or leave it out")
    mem_gb = args.mem_gb if args.mem_gb is not None else round(0.9 * available_memory_gb(), 1)
    if mem_gb <= 0:
        raise UsageError(f"--mem-gb {args.mem_gb:g} must be positive; fix: pass the memory of the job in GB (e.g. "
                         f"--mem-gb 16), or leave it out to use 90% of this machine's")
    if args.loader_workers is not None and args.loader_workers < 0:
        raise UsageError(f"--loader-workers {args.loader_workers} must not be negative")
    filters = load_filter_file(args.bids_filter_file) if args.bids_filter_file else {}
    if args.model is not None and not args.model.exists():
        raise NoInputError(f"--model {args.model} not found; fix: give a checkpoint written by --mode train")
    if args.orientation_model is not None:  # an orientation checkpoint for this model grid
        from ..models.checkpoint import check_card, read_card  # deferred: torch, only with --orientation-model

        check_card(read_card(args.orientation_model), "orientation", model_grid(float(args.resolution)),
                   source=f"--orientation-model {args.orientation_model}")
    if args.task == "pretrain" and args.mode == "apply":
        raise UsageError("--task pretrain has no --mode apply (it writes an encoder for --init, not predictions); "
                         "fix: use --mode train, then --init models/pretrain_<backbone> with --task twin, "
                         "longitudinal or symmetry")
    if args.task == "pretrain" and args.backbone in ("regional", "regional_cnn"):
        raise UsageError(f"--backbone {args.backbone} has no convolutional or transformer encoder to pretrain; fix: "
                         f"choose one of {', '.join(BACKBONES)} for --task pretrain")
    if args.mode == "apply" and args.task and args.model is None:
        raise UsageError("--mode apply needs --model PATH; fix: pass the checkpoint of a trained model")
    if args.pairs_file is not None and not args.pairs_file.is_file():
        raise NoInputError(f"--pairs-file {args.pairs_file} not found; fix: give an existing TSV")
    backbone = args.backbone or ("regional" if args.task in ("twin", "longitudinal") else "small")
    if backbone == "regional" and args.task == "symmetry":
        raise UsageError(f"--backbone regional has no symmetry model; fix: choose one of {', '.join(BACKBONES)} for "
                         "--task symmetry")
    if backbone == "regional_cnn" and args.task in ("longitudinal", "symmetry"):
        raise UsageError(f"--backbone regional_cnn is a twin model; fix: choose one of {', '.join(MODEL_CHOICES[:-1])} "
                         f"for --task {args.task}")
    if backbone == "swin" and args.task == "twin" and args.explain:
        raise UsageError("--backbone swin has no LRP explanation (the LRP rules cover the CNN encoders); fix: add "
                         "--no-explain to --task twin")
    if args.init is not None:  # a pretrained encoder that fits this run, checked before any scan is read
        from ..models.init import check_init_options, pretrained_card  # deferred: torch, only with --init

        check_init_options(args.init, args.task, args.mode, backbone)
        if not args.init.exists():
            raise NoInputError(f"--init {args.init} not found; fix: give the folder written by group --task pretrain")
        pretrained_card(args.init, backbone=backbone, grid=model_grid(float(args.resolution)),
                        in_channels=2 if args.task == "symmetry" else 1)
    for name, value in TRAINING_DEFAULTS["cnn" if backbone in BACKBONES else "regional"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "embedding_dim", "n_draws", "top_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.orientation_folds < 3:
        raise UsageError("--orientation-folds must be at least 3 (train, validation and held-out folds)")
    if args.symmetry_fwhm < 0:
        raise UsageError(f"--symmetry-fwhm {args.symmetry_fwhm} must not be negative")
    if args.symmetry_components < 0:
        raise UsageError(f"--symmetry-components {args.symmetry_components} must not be negative")
    if args.atlas_labels is not None and not args.atlas_labels.is_file():
        raise NoInputError(f"--atlas-labels {args.atlas_labels} not found; fix: give the atlas's label TSV")
    if args.use_plugin is not None:
        from ..workflows.plugin import load_plugin_file  # deferred: nipype, only with --use-plugin

        load_plugin_file(args.use_plugin)  # one-line error (64/66) before any work

    device = resolve_device(args.device)
    workers = args.loader_workers
    if workers is None:  # the CPU trains with all its threads; on CUDA the CPUs can assemble batches meanwhile
        workers = 0 if device == "cpu" else min(CUDA_LOADER_WORKERS, nprocs - 1)

    computed = dict(
        bids_dir=bids_dir,
        output_dir=output_dir,
        work_dir=work_dir,
        participant_label=[clean_label(x, "sub-") for x in args.participant_label],
        session_label=[clean_label(x, "ses-") for x in args.session_label],
        bids_filters=filters,
        derivatives=parse_derivatives(args.derivatives),
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_gb=mem_gb,
        device=device,
        loader_workers=workers,
        resolution=float(args.resolution),
        backbone=backbone,
    )
    # every other setting is its option's value, a path option made absolute
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if f.name not in computed and hasattr(args, f.name)}
    return Settings(**computed, **{k: v.resolve() if isinstance(v, Path) else v for k, v in given.items()})
