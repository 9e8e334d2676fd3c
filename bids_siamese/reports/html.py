"""The per-subject HTML report (``sub-<label>.html``), in the spirit of fMRIPrep's.

:func:`render_subject_report` turns plain per-scan dictionaries into one self-contained HTML page:
a summary table (one row per scan), then for each scan a verdict banner, the left-right flip
probability, the header checks and the figures. Figures are *referenced* (``<img src>``) rather than
inlined, so the page stays small; their paths are relative to the report's folder.

The page needs no JavaScript, fonts, stylesheets or anything else from the network, and it carries no
timestamp: the same inputs always give byte-identical output.

Scan dictionary contract
------------------------
``name`` (str, required)
    Scan identifier shown to the user, e.g. ``"sub-01_ses-01_T1w"``.
``source`` (str)
    Path of the input file.
``header_checks`` (list of dict)
    Each ``{"name": str, "passed": bool, "detail": str}``.
``orientation`` (dict)
    ``{"lr_flip_probability": float | None, "lr_flip_suspected": bool, "threshold": float}``, and
    optionally the three-way verdict and the usable-scan gate of ``*_desc-orientation_qc.json``:
    ``lr_flip_verdict`` (``ok | flipped | undetermined``), ``lr_flip_confidence``, ``lr_flip_source``,
    ``lr_flip_statistic``, ``lr_flip_statistic_mirrored``, ``lr_flip_difference``, ``lr_flip_margin``,
    ``qc_status`` (``pass | warn | fail``), ``usable``, ``qc_reasons``. When ``lr_flip_suspected`` is
    missing it is derived as ``probability >= threshold``; when ``lr_flip_verdict`` is missing, from
    ``lr_flip_suspected``.
``figures`` (dict)
    Label -> path of an SVG relative to the report's folder, e.g.
    ``{"Brain mask": "sub-01/figures/sub-01_ses-01_desc-brainmask_T1w.svg"}``. Known labels
    (``"Brain mask"``, ``"Registration"``, ``"Orientation"``) get an explanatory caption.
``error`` (str, optional)
    The scan failed: the message is shown prominently and no figures are shown.
``metrics`` (dict, optional)
    Name -> number (or short text), e.g. ``{"Registration correlation": 0.93}``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from ..bids.derivatives import write_text
from ..qc import INFORMATIONAL_CHECKS

__all__ = ["render_subject_report", "build_report_context", "scan_verdict", "orientation_direction"]

TEMPLATE_NAME = "MNI152NLin2009cAsym"
_TEMPLATE_FILE = "subject.html.j2"

#: Captions for the figure labels the pipeline produces; other labels are shown without one.
FIGURE_CAPTIONS: dict[str, str] = {
    "Brain mask": (
        "Native T1w (reoriented to RAS) with the brain mask outline in red. The outline should follow the "
        "edge of the brain, leaving out skull, eyes and neck and cutting off no cortex or cerebellum."
    ),
    "Registration": (
        f"T1w aligned to {TEMPLATE_NAME}, with the template's brain outline (yellow) and grey/white-matter "
        "boundary (cyan). The lines should follow the subject's own anatomy in every view."
    ),
    "Orientation": (
        "Aligned brain as stored, mirrored left-right, and the template. If the mirrored column fits the "
        "template's outlines better than the stored one, left and right are probably swapped."
    ),
}
_NARROW_FIGURES = frozenset({"Orientation"})

_ADVICE = {
    "ok": "Nothing was flagged. Glance at the figures to confirm.",
    "check": "Processed, but a person should look before using this scan. See the details below.",
    "failed": "This scan could not be processed and has no outputs.",
}


# --------------------------------------------------------------------------------------------------
# Formatting helpers (pure)
# --------------------------------------------------------------------------------------------------
def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing or not a finite number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _format_probability(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _format_metric(value: Any) -> str:
    """Short, stable text for a metric value.

    Examples:
        >>> _format_metric(0.873456), _format_metric(1234.56), _format_metric(3), _format_metric(True)
        ('0.8735', '1234.6', '3', 'yes')
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    number = _as_float(value)
    if number is None:
        if isinstance(value, (int, float)) or value is None:
            return "n/a"
        return str(value)
    if number != 0 and (abs(number) >= 1e6 or abs(number) < 1e-3):
        return f"{number:.3e}"
    if abs(number) >= 100:
        return f"{number:.1f}"
    return f"{number:.4g}"


def _anchor(index: int, name: str) -> str:
    """A unique, valid HTML id for the ``index``-th scan."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:80]
    return f"scan-{index + 1}" + (f"-{slug}" if slug else "")


def _figure_src(path: Any) -> str:
    """A relative URL for a figure path (forward slashes, percent-encoded where needed)."""
    text = str(path).replace("\\", "/")
    return quote(text, safe="/._-~")


def _subject_label(participant_label: str) -> str:
    label = str(participant_label).strip()
    return label if label.startswith("sub-") else f"sub-{label}"


# --------------------------------------------------------------------------------------------------
# View model
# --------------------------------------------------------------------------------------------------
def _orientation_view(orientation: Mapping[str, Any] | None) -> dict[str, Any]:
    orientation = orientation or {}
    probability = _as_float(orientation.get("lr_flip_probability"))
    threshold = _as_float(orientation.get("threshold"))
    suspected_raw = orientation.get("lr_flip_suspected")
    if suspected_raw is None:
        suspected = probability is not None and threshold is not None and probability >= threshold
    else:
        suspected = bool(suspected_raw)
    clamp = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    usable = bool(orientation.get("usable", True))
    verdict = str(orientation.get("lr_flip_verdict") or ("flipped" if suspected else "ok"))
    reasons = [str(r) for r in (orientation.get("qc_reasons") or [])]
    return {
        "available": probability is not None,
        "probability": _format_probability(probability),
        "threshold": _format_probability(threshold),
        "suspected": suspected,
        "percent": f"{100.0 * clamp(probability or 0.0):.1f}",
        "threshold_percent": f"{100.0 * clamp(threshold if threshold is not None else 0.5):.1f}",
        "verdict": verdict,
        "confidence": _format_probability(_as_float(orientation.get("lr_flip_confidence"))),
        "source": str(orientation.get("lr_flip_source") or "image"),
        "qc_status": str(orientation.get("qc_status") or "pass"),
        "usable": usable,
        "qc_reasons": reasons,
        "direction": orientation_direction(orientation),
    }


def orientation_direction(orientation: Mapping[str, Any]) -> str:
    """One sentence on which way the image points and why (from an orientation QC record).

    Examples:
        >>> orientation_direction({"lr_flip_verdict": "ok", "lr_flip_statistic": -0.16,
        ...     "lr_flip_statistic_mirrored": 0.13, "lr_flip_difference": -0.29, "lr_flip_margin": 0.02})[:60]
        "Left is left: the scan as stored matches the template's left"
    """
    verdict = orientation.get("lr_flip_verdict")
    if not bool(orientation.get("usable", True)):
        return ("No left-right verdict: the scan failed the usable-scan gate, so its registration to the template "
                "cannot be trusted (reasons above).")
    stored = _as_float(orientation.get("lr_flip_statistic"))
    mirrored = _as_float(orientation.get("lr_flip_statistic_mirrored"))
    difference = _as_float(orientation.get("lr_flip_difference"))
    margin = _as_float(orientation.get("lr_flip_margin"))
    source = str(orientation.get("lr_flip_source") or "image")
    if source != "image" and verdict in ("ok", "flipped", "undetermined"):
        model_p = _format_probability(_as_float(orientation.get("lr_flip_probability")))
        return {"ok": "Left is left", "flipped": "Left and right look swapped",
                "undetermined": "Undetermined"}[str(verdict)] + (
            f" according to the trained orientation model (p(flipped) {model_p}; {source}).")
    if stored is None or mirrored is None or difference is None:
        return ""
    evidence = (f"asymmetry statistic of the scan as stored {stored:+.3f}, of its mirror image {mirrored:+.3f} "
                f"(lower = more like the template's left-right asymmetry), difference {difference:+.3f}")
    if verdict == "ok":
        return f"Left is left: the scan as stored matches the template's left-right asymmetry better than its mirror ({evidence})."
    if verdict == "flipped":
        return f"Left and right look swapped: the mirror image matches the template's left-right asymmetry better than the scan as stored ({evidence})."
    margin_text = "" if margin is None else f", within the margin {margin:.3f}"
    return f"Undetermined: the scan and its mirror image match the template's asymmetry about equally ({evidence}{margin_text})."


def _checks_view(checks: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    rows = [
        {
            "name": str(check.get("name", "unnamed check")),
            "passed": bool(check.get("passed", False)),
            "informational": bool(check.get("informational", False)) or check.get("name") in INFORMATIONAL_CHECKS,
            "detail": "" if check.get("detail") is None else str(check.get("detail")),
        }
        for check in (checks or [])
    ]
    failed = [row["name"] for row in rows if not row["passed"] and not row["informational"]]
    return {"rows": rows, "total": len(rows), "passed": len(rows) - len(failed), "failed": failed}


def scan_verdict(scan: Mapping[str, Any]) -> dict[str, str]:
    """The verdict for one scan dict: ``{"label", "css", "text", "reason", "advice"}``.

    ``label`` is ``OK``, ``CHECK`` or ``FAILED``; ``css`` is ``ok``, ``check`` or ``failed``; ``text`` is
    the banner line (e.g. ``"CHECK: left-right flip suspected"``); ``reason`` a one-line explanation.

    Examples:
        >>> scan_verdict({"name": "x", "error": "boom"})["text"]
        'FAILED'
        >>> scan_verdict({"name": "x", "orientation": {"lr_flip_probability": 0.9, "threshold": 0.5}})["text"]
        'CHECK: left-right flip suspected'
        >>> scan_verdict({"name": "x"})["label"]
        'OK'
    """
    error = scan.get("error")
    if error is not None and str(error).strip():
        first_line = str(error).strip().splitlines()[0]
        return {"label": "FAILED", "css": "failed", "text": "FAILED", "reason": first_line,
                "advice": _ADVICE["failed"]}
    orientation = _orientation_view(scan.get("orientation"))
    checks = _checks_view(scan.get("header_checks"))
    problems: list[str] = []
    reasons: list[str] = []
    if not orientation["usable"]:
        problems.append("unusable scan (QC failed)")
        reasons.append("; ".join(orientation["qc_reasons"]) or "the usable-scan gate failed")
    elif orientation["suspected"]:
        problems.append("left-right flip suspected")
        reasons.append(
            f"flip probability {orientation['probability']} \u2265 threshold {orientation['threshold']}"
        )
    elif orientation["verdict"] == "undetermined":
        problems.append("left-right orientation undetermined")
        reasons.append("the scan and its mirror image look alike to the left-right test")
    if checks["failed"]:
        count = len(checks["failed"])
        problems.append(f"{count} header check{'s' if count > 1 else ''} failed")
        reasons.append("failed: " + ", ".join(checks["failed"]))
    if problems:
        return {"label": "CHECK", "css": "check", "text": "CHECK: " + "; ".join(problems),
                "reason": "; ".join(reasons), "advice": _ADVICE["check"]}
    reason = "left-right orientation ok" if orientation["available"] else "no problems flagged"
    if checks["total"]:
        reason += ", all header checks passed"
    return {"label": "OK", "css": "ok", "text": "OK", "reason": reason, "advice": _ADVICE["ok"]}


def _scan_view(index: int, scan: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(scan, Mapping):
        raise TypeError(f"scan {index} must be a mapping, got {type(scan).__name__}")
    name = scan.get("name")
    if name is None or not str(name).strip():
        raise ValueError(f"scan {index} has no 'name'")
    name = str(name)
    error = scan.get("error")
    error_text = str(error).strip() if error is not None and str(error).strip() else ""
    figures = []
    if not error_text:
        for label, path in (scan.get("figures") or {}).items():
            if path is None or not str(path):
                continue
            label = str(label)
            figures.append({
                "label": label,
                "src": _figure_src(path),
                "caption": FIGURE_CAPTIONS.get(label, ""),
                "narrow": label in _NARROW_FIGURES,
            })
    metrics = [{"name": str(k), "value": _format_metric(v)} for k, v in (scan.get("metrics") or {}).items()]
    return {
        "name": name,
        "anchor": _anchor(index, name),
        "source": str(scan.get("source") or "unknown"),
        "error": error_text,
        "verdict": scan_verdict(scan),
        "orientation": _orientation_view(scan.get("orientation")),
        "checks": _checks_view(scan.get("header_checks")),
        "figures": figures,
        "metrics": metrics,
    }


def build_report_context(participant_label: str, scans: Sequence[Mapping[str, Any]], app_version: str = "") -> dict:
    """The template context for one participant (plain data; exposed for testing and reuse)."""
    views = [_scan_view(i, scan) for i, scan in enumerate(scans)]
    counts = {key: sum(1 for v in views if v["verdict"]["css"] == key) for key in ("ok", "check", "failed")}
    return {
        "subject": _subject_label(participant_label),
        "app_version": str(app_version or ""),
        "template_name": TEMPLATE_NAME,
        "scans": views,
        "counts": counts,
    }


# --------------------------------------------------------------------------------------------------
# Rendering and writing
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    # One joinpath argument at a time: multi-argument joinpath needs Python >= 3.11 for some loaders.
    template_file = resources.files("bids_siamese.reports").joinpath("templates").joinpath(_TEMPLATE_FILE)
    source = template_file.read_text(encoding="utf-8")
    env = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.from_string(source)


def render_subject_report(
    participant_label: str,
    scans: list[dict],
    out_path: Path | None = None,
    app_version: str = "",
) -> str:
    """Render the HTML report of one participant and optionally write it atomically.

    Args:
        participant_label: BIDS label with or without the ``sub-`` prefix (``"01"`` or ``"sub-01"``).
        scans: one dict per scan, in display order (see the module docstring for the keys).
        out_path: when given, the HTML is written there atomically
            (:func:`bids_siamese.bids.derivatives.write_text`); figure paths in
            the scan dicts are relative to this file's folder.
        app_version: shown in the header and footer.

    Returns:
        The HTML document. All user-provided text is HTML-escaped.

    Raises:
        ValueError / TypeError: a scan is not a mapping or has no ``name``.
    """
    html = _template().render(**build_report_context(participant_label, scans, app_version))
    if out_path is not None:
        write_text(Path(out_path), html)
    return html
