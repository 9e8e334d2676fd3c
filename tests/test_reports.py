"""Tests of the per-subject visual report: SVG figures and the HTML page."""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from bids_siamese.bids.derivatives import write_text
from bids_siamese.errors import CannotCreateError
from bids_siamese.reports import figures
from bids_siamese.reports.figures import mask_contour_mosaic, orientation_figure, registration_mosaic
from bids_siamese.reports.html import orientation_direction, render_subject_report, scan_verdict

SVG_NS = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


# --------------------------------------------------------------------------------------------------
# Synthetic volumes
# --------------------------------------------------------------------------------------------------
def brain_like(shape=(30, 36, 30), asymmetric: bool = True) -> np.ndarray:
    """An ellipsoidal 'brain' with a brighter core (white matter) and, optionally, a left-only blob."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    vol = np.where(radius < 0.85, 60.0, 0.0) + np.where(radius < 0.5, 30.0, 0.0)
    if asymmetric:
        x, y, z = grid
        vol[(x + 0.45) ** 2 + y**2 + z**2 < 0.04] = 15.0  # a dark 'ventricle' in the left hemisphere only
    return vol.astype(np.float32)


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    return brain_like()


def parse_svg(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    return root


def embedded_images(root: ET.Element) -> list[str]:
    return [
        el.get(XLINK_HREF) or el.get("href") or ""
        for el in root.iter(f"{SVG_NS}image")
    ]


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["registration", "mask", "orientation"])
def test_svgs_parse_and_embed_a_png(vol, kind):
    if kind == "registration":
        svg = registration_mosaic(vol, brain_like(asymmetric=False), n_slices=4)
    elif kind == "mask":
        svg = mask_contour_mosaic(vol, vol > 0, n_slices=4, zooms=(1.0, 1.0, 1.0))
    else:
        svg = orientation_figure(vol, brain_like(asymmetric=False))
    root = parse_svg(svg)
    images = embedded_images(root)
    assert images, "no <image> element in the SVG"
    assert all(href.startswith("data:image/png;base64,") for href in images)
    # every figure draws its panels (3 x 4, or 2 x 3) on one axes, which matplotlib composites into one image
    assert len(images) == 1
    # Contours are drawn as vector paths on top of the images.
    assert len(list(root.iter(f"{SVG_NS}path"))) > 0
    assert len(svg) < 500_000


def test_orientation_letters_present(vol):
    # Text is written as glyph paths; matplotlib leaves the characters in XML comments.
    svg = registration_mosaic(vol, vol, n_slices=3)
    comments = re.findall(r"<!-- (.*?) -->", svg)
    assert comments.count("L") == 6 and comments.count("R") == 6  # 3 axial + 3 coronal panels
    assert comments.count("P") == 3 and comments.count("A") == 3  # sagittal panels


def test_flipped_volume_gives_a_different_mosaic(vol):
    fixed = brain_like(asymmetric=False)
    assert registration_mosaic(vol, fixed) != registration_mosaic(vol[::-1], fixed)
    assert mask_contour_mosaic(vol, vol > 0) != mask_contour_mosaic(vol[::-1], vol[::-1] > 0)
    assert orientation_figure(vol, fixed) != orientation_figure(vol[::-1], fixed)


def test_figures_are_deterministic(vol):
    fixed = brain_like(asymmetric=False)
    assert registration_mosaic(vol, fixed) == registration_mosaic(vol.copy(), fixed.copy())
    assert mask_contour_mosaic(vol, vol > 0, zooms=(1, 1, 2)) == mask_contour_mosaic(vol, vol > 0, zooms=(1, 1, 2))
    svg = orientation_figure(vol, fixed)
    assert svg == orientation_figure(vol, fixed)
    assert "<dc:date>" not in svg


def test_all_zero_and_nan_inputs_do_not_crash():
    zeros = np.zeros((12, 14, 10), dtype=np.float32)
    nans = np.full((12, 14, 10), np.nan, dtype=np.float32)
    for svg in (
        registration_mosaic(zeros, zeros),
        registration_mosaic(nans, zeros, n_slices=1),
        mask_contour_mosaic(zeros, zeros),
        mask_contour_mosaic(nans, zeros > 0, zooms=(1, 1, 1)),
        orientation_figure(zeros, zeros),
        orientation_figure(brain_like(), zeros[:, :-2]),  # grids differ: no overlay, still drawn
    ):
        assert embedded_images(parse_svg(svg))


def test_mask_mosaic_respects_voxel_size(vol):
    def height(svg: str) -> float:
        return float(re.sub(r"[a-z]+$", "", parse_svg(svg).get("height")))

    iso = mask_contour_mosaic(vol, vol > 0, n_slices=3, zooms=(1, 1, 1))
    thick = mask_contour_mosaic(vol, vol > 0, n_slices=3, zooms=(1, 1, 3))
    # Slices three times as thick make the coronal and sagittal rows taller.
    assert height(thick) > 1.5 * height(iso)


def test_bad_inputs_raise(vol):
    with pytest.raises(ValueError):
        registration_mosaic(vol, vol[:-1])
    with pytest.raises(ValueError):
        mask_contour_mosaic(vol, vol > 0, zooms=(1, 0, 1))
    with pytest.raises(ValueError):
        registration_mosaic(vol[0], vol[0])
    with pytest.raises(ValueError):
        registration_mosaic(vol, vol, n_slices=0)


def test_robust_window_and_slices():
    assert figures.robust_window(np.zeros((4, 4, 4))) == (0.0, 1.0)
    vmin, vmax = figures.robust_window(brain_like())
    assert 15.0 <= vmin < vmax <= 90.0
    box = np.zeros((20, 20, 20))
    box[5:15, 5:15, 5:15] = 1
    slices = figures.select_slices(box, 2, 5)
    assert slices == sorted(slices) and min(slices) > 5 and max(slices) < 14


def test_realistic_grid_stays_small():
    # A 2 mm model-grid sized volume with cortex-like folding: many contour vertices.
    shape = (84, 104, 88)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    folds = 0.06 * np.sin(9 * grid[0]) * np.sin(11 * grid[1]) * np.sin(7 * grid[2])
    brain = (np.where(radius < 0.8, 55.0, 0.0) + np.where(radius + folds < 0.6, 35.0, 0.0)).astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = brain + rng.normal(0, 3, shape).astype(np.float32) * (brain > 0)
    assert len(registration_mosaic(noisy, brain)) < 500_000
    assert len(mask_contour_mosaic(noisy, brain > 0, zooms=(2, 2, 2))) < 500_000
    assert len(orientation_figure(noisy, brain)) < 500_000


def test_oversized_figures_are_resaved_smaller(vol, monkeypatch):
    normal = registration_mosaic(vol, vol)
    monkeypatch.setattr(figures, "MAX_SVG_BYTES", 1)
    coarse = registration_mosaic(vol, vol)
    assert len(coarse) < len(normal)
    assert embedded_images(parse_svg(coarse))


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictChecker(HTMLParser):
    """Checks that every non-void element is explicitly closed in order, and collects ids and links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
            if not attrs.get("alt"):
                self.errors.append("img without alt")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def make_scans() -> list[dict]:
    return [
        {
            "name": "sub-01_ses-01_T1w",
            "source": "/data/sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz",
            "header_checks": [
                {"name": "qform_sform_match", "passed": True, "detail": "agree"},
                {"name": "voxel_size_plausible", "passed": True, "detail": "1 mm"},
            ],
            "orientation": {"lr_flip_probability": 0.0314, "lr_flip_suspected": False, "threshold": 0.5},
            "figures": {
                "Brain mask": "sub-01/figures/sub-01_ses-01_desc-brainmask_T1w.svg",
                "Registration": "sub-01/figures/sub-01_ses-01_space-MNI152NLin2009cAsym_T1w.svg",
                "Orientation": "sub-01/figures/sub-01_ses-01_desc-orientation_T1w.svg",
            },
            "metrics": {"Registration correlation": 0.873456, "Brain volume (cm\u00b3)": 1234.56},
        },
        {
            "name": "sub-01_ses-02_T1w",
            "source": "/data/sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz",
            "header_checks": [
                {"name": "qform_sform_match", "passed": True, "detail": "agree"},
                {"name": "affine_determinant_sign", "passed": False, "detail": "determinant is positive"},
            ],
            "orientation": {"lr_flip_probability": 0.9621, "lr_flip_suspected": True, "threshold": 0.5},
            "figures": {"Orientation": "sub-01/figures/sub-01_ses-02_desc-orientation_T1w.svg"},
        },
        {
            "name": "sub-01_ses-03_T1w<script>alert(1)</script>",
            "source": "/data/sub-01/ses-03/anat/bad & broken.nii.gz",
            "header_checks": [{"name": "file_readable", "passed": False, "detail": "truncated gzip"}],
            "orientation": {},
            "figures": {"Brain mask": "sub-01/figures/never-shown.svg"},
            "error": "ImageFileError: truncated gzip stream in sub-01_ses-03_T1w.nii.gz",
        },
    ]


@pytest.fixture(scope="module")
def html() -> str:
    return render_subject_report("01", make_scans(), app_version="9.8.7")


def test_html_lists_every_scan_and_verdict(html):
    for name in ("sub-01_ses-01_T1w", "sub-01_ses-02_T1w", "sub-01_ses-03_T1w"):
        assert name in html
    assert "CHECK: left-right flip suspected" in html
    assert "FAILED" in html
    assert ">OK<" in html
    assert "9.8.7" in html
    assert "<title>sub-01" in html


def test_html_shows_probabilities_checks_errors_and_metrics(html):
    assert "0.962" in html and "0.031" in html and "0.500" in html
    assert "affine_determinant_sign" in html and "determinant is positive" in html
    assert "file_readable" in html
    assert '<tr class="failed">' in html
    assert "ImageFileError: truncated gzip stream in sub-01_ses-03_T1w.nii.gz" in html
    assert "0.8735" in html and "1234.6" in html
    assert "About this report" in html


def test_html_escapes_user_strings(html):
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "bad &amp; broken.nii.gz" in html


def test_html_references_figures_and_hides_them_for_failed_scans(html):
    checker = StrictChecker()
    checker.feed(html)
    for scan in make_scans()[:2]:
        for path in scan["figures"].values():
            assert path in checker.srcs
            assert f'src="{path}"' in html
    assert "never-shown.svg" not in html
    assert len(checker.srcs) == 4


def test_html_is_well_formed_and_offline(html):
    assert html.startswith("<!DOCTYPE html>")
    checker = StrictChecker()
    checker.feed(html)
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    assert len(checker.ids) == len(set(checker.ids))
    for link in checker.links:
        if link.startswith("#"):
            assert link[1:] in checker.ids
    assert "script" not in checker.tags
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "<link" not in html


def test_html_is_deterministic():
    first = render_subject_report("sub-01", make_scans(), app_version="1.0")
    assert first == render_subject_report("01", make_scans(), app_version="1.0")
    assert not re.search(r"20\d\d-\d\d-\d\d", first)


def test_verdicts():
    assert scan_verdict({"name": "a"})["label"] == "OK"
    assert scan_verdict({"name": "a", "error": "boom"})["text"] == "FAILED"
    derived = scan_verdict({"name": "a", "orientation": {"lr_flip_probability": 0.7, "threshold": 0.6}})
    assert derived["text"] == "CHECK: left-right flip suspected"
    checks = scan_verdict({"name": "a", "header_checks": [{"name": "x", "passed": False, "detail": ""}]})
    assert checks["label"] == "CHECK" and "x" in checks["reason"]
    with pytest.raises(ValueError):
        render_subject_report("01", [{"source": "no name"}])


def test_report_shows_the_gate_the_verdict_and_which_way_the_image_points():
    ok = {"lr_flip_probability": 0.1, "lr_flip_suspected": False, "threshold": 0.5, "lr_flip_verdict": "ok",
          "lr_flip_confidence": 0.8, "lr_flip_source": "image", "lr_flip_statistic": -0.16,
          "lr_flip_statistic_mirrored": 0.13, "lr_flip_difference": -0.29, "lr_flip_margin": 0.02,
          "qc_status": "pass", "usable": True, "qc_reasons": []}
    oblique = [{"name": "obliquity", "passed": False, "detail": "largest voxel-axis obliquity 3.00 deg"}]
    scan_ok = {"name": "sub-01_T1w", "orientation": ok, "header_checks": oblique}
    assert scan_verdict(scan_ok)["label"] == "OK"  # obliquity is information, not a failed check
    assert orientation_direction(ok).startswith("Left is left") and "-0.160" in orientation_direction(ok)
    flipped = {**ok, "lr_flip_verdict": "flipped", "lr_flip_suspected": True, "lr_flip_probability": 0.9,
               "lr_flip_difference": 0.29}
    assert orientation_direction(flipped).startswith("Left and right look swapped")
    undetermined = {**ok, "lr_flip_verdict": "undetermined", "lr_flip_probability": 0.5, "lr_flip_difference": 0.0}
    assert scan_verdict({"name": "s", "orientation": undetermined})["text"] == "CHECK: left-right orientation undetermined"
    assert orientation_direction(undetermined).startswith("Undetermined")
    unusable = {**ok, "lr_flip_verdict": "undetermined", "lr_flip_probability": None, "lr_flip_confidence": 0.0,
                "qc_status": "fail", "usable": False, "qc_reasons": ["brain volume 93 cm3 outside 700-2300 cm3"]}
    verdict = scan_verdict({"name": "c", "orientation": unusable})
    assert verdict["text"] == "CHECK: unusable scan (QC failed)" and "brain volume 93" in verdict["reason"]
    html = render_subject_report("01", [scan_ok, {"name": "sub-01_ses-2_T1w", "orientation": unusable}])
    assert "information" in html and "Left is left" in html and "not usable" in html
    assert "brain volume 93 cm3 outside 700-2300 cm3" in html and "No left-right verdict" in html


def test_empty_scan_list_renders():
    assert "No scans were processed" in render_subject_report("02", [])


def test_atomic_write_leaves_only_the_report(tmp_path):
    out = tmp_path / "reports" / "sub-01.html"
    html = render_subject_report("01", make_scans(), out_path=out, app_version="1")
    assert out.read_text(encoding="utf-8") == html
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub-01.html"]
    # Rendering again replaces the file in place, still without leftovers.
    render_subject_report("01", make_scans()[:1], out_path=out)
    assert "sub-01_ses-02_T1w" not in out.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub-01.html"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "sub-01.html"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CannotCreateError):
        render_subject_report("01", make_scans()[:1], out_path=target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["sub-01.html"]


def test_report_next_to_real_figures(tmp_path, vol):
    fig_dir = tmp_path / "sub-01" / "figures"
    rel = "sub-01/figures/sub-01_desc-orientation_T1w.svg"
    write_text(tmp_path / rel, orientation_figure(vol, vol))
    scans = [{"name": "sub-01_T1w", "source": "x.nii.gz", "header_checks": [],
              "orientation": {"lr_flip_probability": 0.1, "lr_flip_suspected": False, "threshold": 0.5},
              "figures": {"Orientation": rel}}]
    html = render_subject_report("01", scans, out_path=tmp_path / "sub-01.html")
    checker = StrictChecker()
    checker.feed(html)
    for src in checker.srcs:
        assert (tmp_path / src).is_file()
    assert sorted(p.name for p in fig_dir.iterdir()) == ["sub-01_desc-orientation_T1w.svg"]
