"""One settings object per run, saved with every run under ``OUTPUT_DIR/logs/<run_id>/``."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__


def available_cpus() -> int:
    """CPUs this process may use (CPU affinity, as in FastSurfer's threads.py), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def available_memory_gb() -> float:
    """Physical memory in GB (cgroup limits are not inspected), 4 GB when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4.0


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmdd-HHMMSS_<8 hex>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}"


@dataclass
class Settings:
    """Everything a run depends on. Paths are absolute."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filters: dict[str, Any] = field(default_factory=dict)
    bids_filter_file: Path | None = None
    skip_bids_validation: bool = False
    #: ``--derivatives``: name -> :class:`bids_siamese.bids.fmriprep.PipelineDataset` (checked folder, version)
    derivatives: dict[str, Any] = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float = 4.0
    device: str = "cpu"
    #: group training: DataLoader workers, dtype of the in-memory volume stack, torch.compile of the model
    loader_workers: int = 0
    volume_cache: str = "float16"
    compile: bool = False
    seed: int = 0
    #: group training: deterministic torch/cuDNN/cuBLAS settings (bids_siamese.train.reproducibility)
    deterministic: bool = False
    verbosity: int = 0
    resolution: float = 2.0
    use_plugin: Path | None = None
    clean_workdir: bool = False
    # group level: Siamese models
    model: Path | None = None
    #: ``--init``: a pretrained encoder (``group --task pretrain``) that twin/longitudinal/symmetry training starts from
    init: Path | None = None
    task: str | None = None
    mode: str = "train"
    backbone: str = "small"
    embedding_dim: int = 128
    distance: str = "cosine"
    margin: float = 0.2
    dz_positives: bool = False
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    patience: int = 5
    n_draws: int = 10
    family_column: str = "family_id"
    zygosity_column: str = "zygosity"
    label_column: str = "group"
    pairs_file: Path | None = None
    top_k: int = 5
    #: bundled atlas name or NIfTI; the default covers the whole brain, cerebellum included (bids_siamese.atlas)
    atlas: str = "harvard_oxford_cerebellum"
    lrp_target: str = "embedding_abs"
    lrp_rules: str = "epsilon_plus"
    relevance_fwhm: float = 6.0
    explain_surfaces: bool = False
    explain: bool = True
    report_subjects: bool = False
    atlas_labels: Path | None = None
    symmetry_fusion: str = "difference"
    symmetry_fwhm: float = 6.0
    #: modes of normal asymmetry in the group reference (bids_siamese.symmetry.normative; 0: voxelwise median only)
    symmetry_components: int = 10
    orientation_folds: int = 5
    include_unusable: bool = False
    orientation_model: Path | None = None
    run_id: str = field(default_factory=new_run_id)
    version: str = __version__
    command_line: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in asdict(self).items()}


    @property
    def resolution_label(self) -> str:
        """BIDS ``res-`` label: ``2`` for 2.0 mm, ``2p5`` for 2.5 mm (labels are alphanumeric)."""
        text = f"{self.resolution:g}"
        return text.replace(".", "p")


def load_settings(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
