"""The group report ``group.html``: one section per group task that ran, QC summaries and the explanations.

One self-contained HTML file at the top of OUTPUT_DIR (figures inline as SVG, raster layers embedded), built
from the record of what each group step wrote (``group_outputs.json``, see
:func:`~bids_siamese.bids.derivatives.write_group_record`): the twin and longitudinal models (test metrics,
loss and ROC curves, learned region weights, predictions), the orientation model, the symmetry results
(per-scan summary, planted-lesion evaluation), the per-scan QC and, for a twin model's explanations, the
embedding map, the group relevance map, the region ranking and statistics. Every section is shown only when
its step ran (or, for outputs from before the record, when its files exist). A task's section is built as the task
declares it (title, shown files, layout: :class:`ReportView`, recorded with its outputs by the workflow), so a new
task needs no code here: without a layout of its own it gets a heading with each shown table and figure. With ``report_subjects`` a
per-subject section lists each subject's most important regions.

Figures are drawn with :class:`matplotlib.figure.Figure` (no pyplot state). Slices are in neurological
convention (subject's left on the left, "L"/"R" marked); surfaces are fsaverage5 inflated meshes,
lateral and medial views of the fsLR 32k surface (inflated for display, medial wall grey), coloured by the
group map sampled at the cortex.
"""
from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from .. import __version__
from ..bids.derivatives import (
    GROUP_REPORT,
    REGION_WEIGHTS,
    TASK_FILES,
    group_record_entry,
    model_folder,
    read_group_record,
    write_text,
)
from ..config import Settings
from ..errors import UserError
from ..surface.gifti import load_mesh, vol_to_surf

if TYPE_CHECKING:  # explain/ is a higher layer: its result type only annotates
    from ..explain.run import ExplainResult

LOG = logging.getLogger("bids_siamese.group.report")

__all__ = ["ReportView", "step_view", "build_group_context", "render_group_report", "write_group_report", "ranking_figure",
           "embedding_figure", "slices_figure", "surface_figure", "table_view"]

CLASS_COLOURS = {"subcortical": "#d62728", "cortical": "#1f77b4", "cerebellar": "#2ca02c", "brainstem": "#9467bd",
                 "white-matter": "#8c564b"}
_SALT = "bids-siamese-group"


# ----------------------------------------------------------------------------------------------------------
# Figures (pure: arrays/tables in, SVG text out)
# ----------------------------------------------------------------------------------------------------------
def _svg(fig: Figure, dpi: int = 90) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": _SALT, "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", dpi=dpi, metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def ranking_figure(ranking: pd.DataFrame, top: int = 20) -> str:
    """Horizontal bars of the ``top`` regions' importance, coloured by structure class."""
    rows = ranking.head(top).iloc[::-1]
    fig = Figure(figsize=(7.5, 0.28 * len(rows) + 1.0))
    ax = fig.add_subplot()
    labels = [f"{r.region} ({r.hemisphere})" if r.hemisphere != "bilateral" else str(r.region)
              for r in rows.itertuples()]
    ax.barh(range(len(rows)), rows["importance"], color=[CLASS_COLOURS.get(c, "#7f7f7f") for c in rows["structure_class"]])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("importance (region mean of the 0..1 group map / largest region mean)")
    handles = [ax.bar(0, 0, color=c, label=k) for k, c in CLASS_COLOURS.items() if k in set(rows["structure_class"])]
    if handles:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _project_2d(embeddings: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    x = embeddings - embeddings.mean(axis=0)
    if method == "tsne":
        from sklearn.manifold import TSNE  # deferred: scikit-learn takes seconds to import; only t-SNE needs it

        perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    out = u[:, :2] * s[:2]
    return out if out.shape[1] == 2 else np.c_[out, np.zeros(len(out))]


def embedding_figure(table: pd.DataFrame, seed: int = 0) -> str:
    """PCA and t-SNE maps of the scan embeddings, coloured by family, family members joined by lines."""
    cols = [c for c in table.columns if re.fullmatch(r"e\d+", str(c))]
    emb = table[cols].to_numpy(float)
    methods = ["pca"] + (["tsne"] if len(table) >= 6 else [])
    fig = Figure(figsize=(5.2 * len(methods), 4.6))
    families = table["family_id"].astype(str).to_numpy()
    uniq = sorted(set(families))
    cmap = colormaps["tab20"]
    colour = {f: cmap(i % 20) for i, f in enumerate(uniq)}
    for k, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), k + 1)
        xy = _project_2d(emb, method, seed)
        for fam in uniq:
            idx = np.flatnonzero(families == fam)
            if len(idx) > 1:
                ax.plot(xy[idx, 0], xy[idx, 1], "-", color=colour[fam], lw=1, alpha=0.7)
            ax.scatter(xy[idx, 0], xy[idx, 1], color=colour[fam], s=28, edgecolor="black", linewidth=0.4)
        ax.set_title("PCA" if method == "pca" else "t-SNE", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("scan embeddings, one colour per family (lines join members of a family)", fontsize=10)
    return _svg(fig)


def _world_slices(volume: np.ndarray, affine: np.ndarray, axis: int, positions_mm: Sequence[float]) -> list[int]:
    idx = []
    for mm in positions_mm:
        k = int(round((mm - affine[axis, 3]) / affine[axis, axis]))
        idx.append(min(max(k, 0), volume.shape[axis] - 1))
    return idx


def slices_figure(group_map: np.ndarray, affine: np.ndarray, template: np.ndarray | None = None,
                  threshold: float = 0.25) -> str:
    """Axial, coronal and sagittal slices of the 0..1 group map over the template (neurological convention)."""
    views = [("axial", 2, (-30, -15, 0, 10, 25, 45, 60)), ("coronal", 1, (-70, -40, -20, -5, 10, 30)),
             ("sagittal", 0, (-45, -25, -10, 10, 25, 45))]
    n_cols = max(len(v[2]) for v in views)
    fig = Figure(figsize=(1.6 * n_cols, 1.75 * len(views) + 0.5), facecolor="black")
    under = template if template is not None else np.zeros_like(group_map)
    lo, hi = (np.percentile(under[under > 0], [2, 99.5]) if (under > 0).any() else (0.0, 1.0))
    overlay = np.ma.masked_less(group_map, threshold)
    for r, (name, axis, positions) in enumerate(views):
        for c, k in enumerate(_world_slices(group_map, affine, axis, positions)):
            ax = fig.add_subplot(len(views), n_cols, r * n_cols + c + 1)
            take = lambda v: np.take(v, k, axis=axis).T  # noqa: E731 - rows: the later axis, bottom up
            ax.imshow(take(under), cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            im = ax.imshow(take(overlay), cmap="hot", vmin=threshold, vmax=1.0, origin="lower",
                           interpolation="nearest", alpha=0.85)
            mm = affine[axis, 3] + k * affine[axis, axis]
            ax.set_title(f"{'xyz'[axis]}={mm:.0f}", color="white", fontsize=7, pad=2)
            if axis in (1, 2):
                ax.text(0.02, 0.03, "L", color="white", fontsize=7, transform=ax.transAxes)
                ax.text(0.92, 0.03, "R", color="white", fontsize=7, transform=ax.transAxes)
            ax.set_axis_off()
    cax = fig.add_axes((0.92, 0.25, 0.012, 0.5))
    cbar = fig.colorbar(im, cax=cax)
    cbar.ax.tick_params(colors="white", labelsize=7)
    cbar.set_label("group relevance (0..1)", color="white", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.9, top=0.95, bottom=0.02, wspace=0.03, hspace=0.18)
    return _svg(fig)


def _render_mesh(ax, coords: np.ndarray, faces: np.ndarray, values: np.ndarray, view: str, hemi: str,
                 threshold: float) -> None:
    camera_x = -1.0 if (hemi == "L") == (view == "lateral") else 1.0
    right = np.array([0.0, -1.0, 0.0]) if camera_x < 0 else np.array([0.0, 1.0, 0.0])
    xy = np.c_[coords @ right, coords[:, 2]]
    tri = coords[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    facing = normals[:, 0] * camera_x
    shade = 0.35 + 0.65 * np.abs(facing)
    depth = -tri[:, :, 0].mean(axis=1) * camera_x  # larger: farther from the camera
    order = np.argsort(-depth)
    face_values = values[faces].mean(axis=1)
    cmap = colormaps["hot"]
    base = np.tile(np.array([0.72, 0.72, 0.72, 1.0]), (len(faces), 1))
    hot = face_values >= threshold
    base[hot] = cmap(np.clip((face_values[hot] - threshold) / (1 - threshold), 0, 1) * 0.85)
    colours = base.copy()
    colours[:, :3] *= shade[:, None]
    coll = PolyCollection(xy[faces[order]], facecolors=colours[order], edgecolors="none", antialiased=False)
    coll.set_rasterized(True)
    ax.add_collection(coll)
    ax.set_xlim(xy[:, 0].min() - 2, xy[:, 0].max() + 2)
    ax.set_ylim(xy[:, 1].min() - 2, xy[:, 1].max() + 2)
    ax.set_aspect("equal")
    ax.set_axis_off()


def surface_figure(group_map: np.ndarray, affine: np.ndarray, threshold: float = 0.25, mesh_name: str = "fsLR") -> str:
    """Lateral and medial views of both hemispheres (inflated fsLR 32k, medial wall grey) coloured by the group map."""
    fig = Figure(figsize=(10, 5.2))
    panels = [("L", "lateral"), ("R", "lateral"), ("L", "medial"), ("R", "medial")]
    for k, (hemi, view) in enumerate(panels):
        values = vol_to_surf(group_map, affine, mesh_name, hemi)
        mesh = load_mesh(mesh_name, hemi, "inflated")
        ax = fig.add_subplot(2, 2, k + 1)
        _render_mesh(ax, mesh.coords.astype(float), mesh.faces, values, view, hemi, threshold)
        ax.set_title(f"{'left' if hemi == 'L' else 'right'} hemisphere, {view}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.94, bottom=0.01, wspace=0.02, hspace=0.12)
    return _svg(fig, dpi=80)


# ----------------------------------------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
    return str(value)


def table_view(table: pd.DataFrame | None, max_rows: int = 50, columns: Sequence[str] | None = None) -> dict | None:
    """``{"columns", "rows", "more"}`` with formatted cells (``None`` for a missing/empty table).

    Examples:
        >>> table_view(pd.DataFrame({"a": [0.123456, None]}))["rows"]
        [['0.1235'], ['n/a']]
    """
    if table is None or len(table) == 0:
        return None
    if columns:
        table = table[[c for c in columns if c in table.columns]]
    rows = [[_fmt(v) for v in row] for row in table.head(max_rows).itertuples(index=False)]
    return {"columns": [str(c) for c in table.columns], "rows": rows, "more": max(0, len(table) - max_rows)}


def _statistics_sentence(stats: pd.DataFrame | None) -> str | None:
    if stats is None or not len(stats):
        return None
    parts = []
    for row in stats.itertuples():
        parts.append(f"{row.level}: {row.comparison}, mean {_fmt(row.mean_a)} vs {_fmt(row.mean_b)}, Cohen's d = "
                     f"{_fmt(row.cohens_d)}, Welch t = {_fmt(row.welch_t)} (df {_fmt(row.welch_df)}), p = "
                     f"{_fmt(row.welch_p)}, permutation p = {_fmt(row.permutation_p)} "
                     f"({int(row.n_permutations)} permutations)")
    return "; ".join(parts) + "."


def _inline_svg(text: str | None) -> str | None:
    if not text:
        return None
    start = text.find("<svg")
    return text[start:] if start >= 0 else None


class ReportView(NamedTuple):
    """How the report shows one group step, as the step declares it (a task: its
    :class:`~bids_siamese.train.task.GroupTask` attributes, recorded in ``group_outputs.json`` by the workflow).

    Attributes:
        title: the section and ``Tasks`` table title.
        shown: the roles of its files (:data:`~bids_siamese.bids.derivatives.TASK_FILES`) the report reads;
            empty: every file the step recorded.
        section: the layout (:data:`SECTION_BUILDERS`): ``files`` (a heading, each table and figure) or one of the
            built-in tasks' layouts (``twin``, ``longitudinal``, ``orientation_model``, ``symmetry``).
    """

    title: str
    shown: tuple[str, ...] = ()
    section: str = "files"


#: The workflow's own steps (not tasks): the per-scan QC table and the explanations (their own template parts).
STEP_VIEWS = {"qc": ReportView("Scan QC", ("orientation",), "qc"),
              "explain": ReportView("Explanations", ("ranking", "statistics", "embeddings", "subjects"), "explain")}
#: The built-in tasks' views for record entries written before the record carried each task's view (and for
#: steps found only by their files); a task run by the workflow records its own (:func:`step_view`).
EARLIER_VIEWS = {"twin": ReportView("Twin model", ("metrics", "loss_figure", "roc_figure"), "twin"),
                 "longitudinal": ReportView("Longitudinal model", ("metrics", "predictions", "loss_figure",
                                                                   "roc_figure"), "longitudinal"),
                 "orientation": ReportView("Orientation model", ("table", "metrics"), "orientation_model"),
                 "symmetry": ReportView("Symmetry", ("table", "evaluation", "detection_figure"), "symmetry"),
                 "pretrain": ReportView("Self-supervised pretraining", ("losses", "losses_figure"), "files")}
#: Report order of the known steps in the ``Tasks`` table (others follow in record order).
STEP_ORDER = (*EARLIER_VIEWS, "explain", "qc")


def step_view(step: str, entry: Mapping[str, Any]) -> ReportView:
    """The view of one recorded step: the one recorded with it (``report``), else :data:`STEP_VIEWS` or
    :data:`EARLIER_VIEWS`, else every file under the step's name.

    Examples:
        >>> step_view("toy", {"report": {"title": "Toy", "shown": ["table"]}})
        ReportView(title='Toy', shown=('table',), section='files')
        >>> step_view("toy", {}).title
        'toy'
    """
    recorded = entry.get("report")
    if isinstance(recorded, Mapping):
        return ReportView(str(recorded.get("title", step)), tuple(recorded.get("shown", ())),
                          str(recorded.get("section", "files")))
    return STEP_VIEWS.get(step) or EARLIER_VIEWS.get(step) or ReportView(step)


def _model_section(tables: Mapping[str, Any], figures: Mapping[str, str | None], task: str) -> dict | None:
    """Test metrics, loss and ROC figures and region weights of the twin or longitudinal model (``None``: none)."""
    section = {"metrics": table_view(tables.get(f"{task}_metrics")),
               "loss_svg": _inline_svg(figures.get(f"{task}_loss_figure")),
               "roc_svg": _inline_svg(figures.get(f"{task}_roc_figure")),
               "region_weights": table_view(tables.get(f"{task}_region_weights"), 15,
                                            ["rank", "region", "hemisphere", "structure_class", "weight", "voxels"])}
    section["predictions"] = table_view(tables.get(f"{task}_predictions"), 30)
    return section if any(section.values()) else None


def _orientation_section(orientation: pd.DataFrame | None) -> dict | None:
    """The per-scan QC summary of ``group_orientation.tsv``."""
    if orientation is None or not len(orientation):
        return None
    flagged = orientation[orientation["lr_flip_suspected"].astype(str).str.lower() == "true"]
    checks = orientation["header_checks_failed"]  # pandas reads the TSV's "n/a" as missing
    failed = orientation[checks.notna() & ~checks.astype(str).isin(["n/a", ""])]
    status = orientation["status"].astype(str) if "status" in orientation else pd.Series("ok", orientation.index)
    not_ok = orientation[status != "ok"]
    unusable = orientation.iloc[0:0]
    if "usable" in orientation.columns:
        unusable = orientation[(status == "ok") & ~orientation["usable"].astype(str).str.lower().isin(["true", "1"])]
    undetermined = orientation.iloc[0:0]
    if "lr_flip_verdict" in orientation.columns:
        undetermined = orientation[orientation["lr_flip_verdict"].astype(str) == "undetermined"]
    return {"n": len(orientation), "flagged": len(flagged), "header_failed": len(failed),
            "status": {key: int((status == key).sum()) for key in ("ok", "failed", "missing")},
            "unusable": len(unusable), "undetermined": len(undetermined),
            "unusable_scans": [str(s) for s in unusable.get("scan", [])],
            "table": table_view(pd.concat([not_ok, unusable, flagged, undetermined, failed]).drop_duplicates(), 30)}


def _orientation_model_section(tables: Mapping[str, Any], figures: Mapping[str, str | None], step: str
                               ) -> dict | None:
    """The trained left-right model's held-out AUC and the scans it flags (``group --task orientation``)."""
    scores, metrics = tables.get(f"{step}_table"), tables.get(f"{step}_metrics")
    if scores is None or not len(scores):
        return None
    flagged = scores[scores["lr_flip_suspected"].astype(str).str.lower() == "true"]
    values = {} if metrics is None else dict(zip(metrics["metric"], metrics["value"]))
    return {"auc": _fmt(float(values["auc_mirrored_copies"])) if "auc_mirrored_copies" in values else "n/a",
            "n": len(scores), "flagged": [str(s) for s in flagged["scan"]],
            "held_out": "apply" not in set(scores["fold"].astype(str))}


def _symmetry_section(tables: Mapping[str, Any], figures: Mapping[str, str | None], step: str) -> dict | None:
    """Per-scan asymmetry summary and, after training, the planted-lesion evaluation (``group --task symmetry``)."""
    symmetry = tables.get(f"{step}_table")
    if symmetry is None or not len(symmetry):
        return None
    numeric = symmetry.select_dtypes("number")
    summary = numeric.describe().T[["mean", "std", "min", "max"]].reset_index().rename(columns={"index": "column"})
    return {"n": len(symmetry), "summary": table_view(summary, 30),
            "evaluation": table_view(tables.get(f"{step}_evaluation"), 40),
            "detection_svg": _inline_svg(figures.get(f"{step}_detection_figure"))}


def _files_section(tables: Mapping[str, Any], figures: Mapping[str, str | None], step: str) -> dict | None:
    """Any task's section: each table and figure of the step the report read (``None``: none)."""
    prefix = f"{step}_"
    shown = {"tables": [{"role": key[len(prefix):], "table": table_view(table, 30)} for key, table in tables.items()
                        if key.startswith(prefix) and table is not None and len(table)],
             "figures": [{"role": key[len(prefix):], "svg": _inline_svg(svg)} for key, svg in figures.items()
                         if key.startswith(prefix) and _inline_svg(svg)]}
    return shown if shown["tables"] or shown["figures"] else None


#: The report's section layouts (:attr:`ReportView.section`): ``(tables, figures, step) -> section or None``.
#: ``files`` sections are listed under ``task_sections``; the others fill the template part of their name.
SECTION_BUILDERS = {"twin": _model_section, "longitudinal": _model_section,
                    "orientation_model": _orientation_model_section, "symmetry": _symmetry_section,
                    "files": _files_section}


def _tasks_table(steps: Mapping[str, Mapping[str, Any]]) -> dict | None:
    """One row per recorded group step: what ran, how, in which run, and its model folder."""
    rows = [{"step": step_view(step, entry).title, "mode": entry.get("mode"), "backbone": entry.get("backbone"),
             "run": entry.get("run_id"), "finished": entry.get("finished"), "model": entry.get("model")}
            for step, entry in sorted(steps.items(), key=lambda item: STEP_ORDER.index(item[0])
                                      if item[0] in STEP_ORDER else len(STEP_ORDER))]
    return table_view(pd.DataFrame(rows)) if rows else None


def build_group_context(
    dataset: str = "",
    tables: Mapping[str, pd.DataFrame | None] | None = None,
    figures: Mapping[str, str | None] | None = None,
    relevance: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    steps: Mapping[str, Mapping[str, Any]] | None = None,
    views: Mapping[str, ReportView] | None = None,
    files: Sequence[str] = (),
    notes: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the template shows; each section and figure only when its data are given.

    Args:
        dataset: the input dataset's name.
        tables: ``<step>_<role>`` -> table, the roles of :attr:`ReportView.shown` (e.g. ``twin_metrics``,
            ``longitudinal_predictions``, ``explain_ranking``, ``qc_orientation``), and ``twin_region_weights``,
            ``longitudinal_region_weights`` (a regional model's learned weights).
        figures: ``<step>_<role>`` -> SVG text (e.g. ``twin_loss_figure``, ``symmetry_detection_figure``).
        relevance: ``(group map, affine, template underlay)`` of the explanations.
        steps: the record's entries (:func:`~bids_siamese.bids.derivatives.group_record_entry`), one per step.
        views: step -> :class:`ReportView`: each task's section is built by its layout's
            :data:`SECTION_BUILDERS` entry (none given: no task section).
        files: paths (relative to OUTPUT_DIR) listed at the end.
        notes: facts shown in the summary.
        seed: seed of the t-SNE map.
    """
    tables, figures = dict(tables or {}), dict(figures or {})
    ranking, statistics = tables.get("explain_ranking"), tables.get("explain_statistics")
    embeddings, subjects_regions = tables.get("explain_embeddings"), tables.get("explain_subjects")
    context: dict[str, Any] = {
        "title": "bids-siamese group report",
        "dataset": dataset,
        "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": dict(notes or {}),
        "tasks": _tasks_table(steps or {}),
        "twin": None,
        "longitudinal": None,
        "task_sections": [],
        "embedding_svg": None,
        "ranking_svg": None,
        "ranking": table_view(ranking, 25, ["rank", "region", "hemisphere", "structure_class", "importance", "voxels"]),
        "statistics": table_view(statistics),
        "statistics_sentence": _statistics_sentence(statistics),
        "slices_svg": None,
        "surface_svg": None,
        "orientation": _orientation_section(tables.get("qc_orientation")),
        "orientation_model": None,
        "symmetry": None,
        "subjects": [],
        "files": list(files),
    }
    for step, view in (views or {}).items():
        build = SECTION_BUILDERS.get(view.section)
        section = build(tables, figures, step) if build is not None else None  # qc, explain: built here
        if section is not None and view.section == "files":
            context["task_sections"].append({"id": f"task-{step}", "title": view.title, **section})
        elif section is not None:
            context[view.section] = section
    counts = {}
    if embeddings is not None and len(embeddings) >= 3:
        context["embedding_svg"] = embedding_figure(embeddings, seed)
        counts = {"scans": len(embeddings), "subjects": embeddings["participant_id"].nunique(),
                  "families": embeddings["family_id"].nunique()}
    context["counts"] = counts
    if ranking is not None and len(ranking):
        context["ranking_svg"] = ranking_figure(ranking)
    if relevance is not None:
        group_map, affine, template = relevance
        context["slices_svg"] = slices_figure(group_map, affine, template)
        try:
            context["surface_svg"] = surface_figure(group_map, affine)
        except (UserError, OSError) as err:  # a surface file missing or unreadable: the slices still show the map
            LOG.warning("the group report has no surface views of the relevance map (%s)", err)
    if subjects_regions is not None and len(subjects_regions):
        for pid, rows in subjects_regions.groupby("participant_id", sort=True):
            top = rows.sort_values("importance", ascending=False).head(5)
            context["subjects"].append({"id": pid, "top": table_view(top, 5, ["region", "hemisphere",
                                                                                 "structure_class", "importance"])})
    return context


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    source = resources.files("bids_siamese.reports").joinpath("templates").joinpath("group.html.j2").read_text("utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def render_group_report(context: Mapping[str, Any]) -> str:
    """The HTML of the group report (text is escaped; the SVG figures are inserted as markup)."""
    return _template().render(**context)


# ----------------------------------------------------------------------------------------------------------
# Edge: read what the group level wrote (its record), write group.html
# ----------------------------------------------------------------------------------------------------------
def _read_tsv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, sep="\t") if path.is_file() else None
    except (OSError, ValueError) as err:
        LOG.warning("cannot read %s for the report (%s)", path, err)
        return None


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def recorded_steps(output_dir: Path, settings: Settings | None = None, explain: ExplainResult | None = None
                   ) -> dict[str, dict[str, Any]]:
    """The group steps to report: the record's entries (``group_outputs.json``), the explanations of this run
    (``explain.written``, recorded by the workflow only after the report), and, for a step the record lacks
    (outputs from before the record existed, or a task function called directly), the files of
    :data:`~bids_siamese.bids.derivatives.TASK_FILES` that exist."""
    output_dir = Path(output_dir)
    steps = dict(read_group_record(output_dir)["steps"])
    if explain is not None:
        steps["explain"] = group_record_entry(output_dir, "explain", explain.written, settings)
    for step, names in TASK_FILES.items():
        present = [output_dir / name for name in names.values() if (output_dir / name).is_file()]
        if step not in steps and present:
            steps[step] = {**group_record_entry(output_dir, step, present), "finished": None}
    return steps


def _region_weights(output_dir: Path, entry: Mapping[str, Any] | None, fallbacks: Sequence[Path]) -> pd.DataFrame | None:
    """A regional model's learned weights, from the step's model folder or the first fallback folder with them."""
    folders = ([output_dir / entry["model"]] if entry and entry.get("model") else []) + list(fallbacks)
    return next((_read_tsv(f / REGION_WEIGHTS) for f in folders if (f / REGION_WEIGHTS).is_file()), None)


def dataset_name(bids_dir: Path) -> str:
    """The ``Name`` in the dataset's ``dataset_description.json``; ``""`` when it has none, and also (with a
    WARNING naming the file) when the file cannot be read: the report only shows the name.

    Examples:
        >>> dataset_name(Path("/nonexistent"))
        ''
    """
    path = Path(bids_dir) / "dataset_description.json"
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # missing, unreadable, not JSON or not UTF-8
        LOG.warning("the group report shows no dataset name: cannot read %s (%s)", path, err)
        return ""
    return str(description.get("Name", "")) if isinstance(description, dict) else ""


def write_group_report(settings: Settings, explain: ExplainResult | None = None, output_dir: Path | None = None
                       ) -> Path:
    """Write ``OUTPUT_DIR/group.html`` from what the group steps recorded (:func:`recorded_steps`).

    Args:
        settings: the run's settings (``output_dir``, ``bids_dir``, ``seed``, ``report_subjects``, ``model``).
        explain: the :class:`~bids_siamese.explain.run.ExplainResult` of this run (group map, template); without
            it the tables on disk are used and the map figures are left out.
        output_dir: overrides ``settings.output_dir``.

    Returns:
        The report path.
    """
    out = Path(output_dir or settings.output_dir)
    dataset = dataset_name(Path(settings.bids_dir))
    steps = recorded_steps(out, settings, explain)
    views = {step: step_view(step, entry) for step, entry in steps.items()}
    tables: dict[str, Any] = {}
    figures: dict[str, str | None] = {}
    for step, entry in steps.items():
        shown = views[step].shown
        for role, name in entry["files"].items():
            if (shown and role not in shown) or (role == "subjects" and not settings.report_subjects):
                continue
            if name.endswith(".svg"):
                figures[f"{step}_{role}"] = _read_text(out / name)
            elif name.endswith(".tsv"):
                tables[f"{step}_{role}"] = _read_tsv(out / name)
    if explain is not None:  # this run's tables, as computed
        tables.update(explain_ranking=explain.ranking, explain_statistics=explain.statistics,
                      explain_embeddings=explain.embeddings)
    model = Path(settings.model) if settings.model else None
    tables["twin_region_weights"] = _region_weights(out, steps.get("twin"), (
        [model if model.is_dir() else model.parent] if model else []) + [model_folder(out, "twin", "regional")])
    tables["longitudinal_region_weights"] = _region_weights(out, steps.get("longitudinal"), ())
    notes = {}
    if explain is not None:
        notes = {"relevance target": explain.target, "atlas": explain.atlas, "smoothing FWHM (mm)": f"{explain.fwhm:g}",
                 "scans explained": str(len(explain.scans))}
    files = []
    for entry in steps.values():
        files += list(entry["files"].values()) + [p for p in entry["other"] if p.endswith(".spec")]
        files += [entry["model"]] if entry.get("model") else []
    context = build_group_context(
        dataset=dataset, tables=tables, figures=figures, steps=steps, views=views,
        relevance=(explain.group_map, explain.affine, explain.template) if explain is not None else None,
        files=[f for f in dict.fromkeys(files) if (out / f).exists()], notes=notes, seed=int(settings.seed))
    return write_text(out / GROUP_REPORT, render_group_report(context))
