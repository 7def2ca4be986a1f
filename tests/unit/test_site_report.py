"""The local site report: site_report.html from a canonical site folder, never for the server."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from evaluation.site_report import SITE_REPORT_NAME, site_report_html, write_site_report
from fedseg.cli import app

PNG = b"\x89PNG\r\n\x1a\n"
FINGERPRINT = "ab" * 32
CASES = ("case-1", "case-2", "case-3")
GEOMETRY = {
    "shape": [100, 116, 90],
    "spacing": [2.0, 2.0, 2.0],
    "origin": [99.0, 115.0, -83.0],
    "direction": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
    "affine_ras": [[2, 0, 0, -99], [0, 2, 0, -115], [0, 0, 2, -83], [0, 0, 0, 1]],
    "axcodes": "RAS",
}


def _manifest() -> dict[str, Any]:
    """A small manifest.json of the shape ``fedseg harmonise`` writes."""
    case = {
        "labelled": True,
        "source_label_scheme": "brats2023",
        "sources": {"t1n": {"path": "x/t1n.nii.gz", "sha256": "0" * 64}},
        "original_geometry": GEOMETRY,
        "steps": [],
        "output_shape": [51, 62, 44],
    }
    return {
        "schema_version": 1,
        "site": "hospital-<a>",
        "fedseg_version": "0.1.0",
        "created": "2026-11-28T04:47:40+00:00",
        "target_spacing_mm": [3.0, 3.0, 3.0],
        "modalities": ["t1n", "t1c", "t2w", "t2f"],
        "label_scheme": "brats2023",
        "source_root": "/data/raw/hospital-a",
        "parameters": {"margin_mm": 5.0, "orientation": "RAS"},
        "split": {
            "seed": 0,
            "validation_fraction": 0.34,
            "train": ["case-1", "case-2"],
            "validation": ["case-3"],
        },
        "cases": [{"case_id": c, **case} for c in CASES],
        "skipped": [{"case_id": "case-9", "file": "case-9/t2f.nii.gz", "reason": "no t2f"}],
        "fingerprint": FINGERPRINT,
    }


def _site(root: Path) -> Path:
    """A canonical site folder with manifest and qc/ (summary, geometry, PNGs); no images."""
    site = root / "hospital-a"
    qc = site / "qc"
    (qc / "overlays").mkdir(parents=True)
    (qc / "histograms").mkdir()
    (site / "manifest.json").write_text(json.dumps(_manifest()))
    summary = {
        "cases": [
            {
                "case_id": c,
                "mask_volume_ml": 1500.0 + i,
                "flags": ["mask volume"] if i else [],
                "label_volumes_ml": {"1": 1.5, "2": 20.25, "3": 10.0},
            }
            for i, c in enumerate(CASES)
        ],
        "errors": [{"case_id": "case-2", "stage": "overlay", "error": "boom"}],
    }
    (qc / "summary.json").write_text(json.dumps(summary))
    header = "case_id,image,path,shape,spacing,origin,direction,axcodes\n"
    rows = "".join(
        f"{c},{m},{c}/{m}.nii.gz,100x116x90,2 2 2,99 115 -83,-1 0 0 0 -1 0 0 0 1,RAS\n"
        for c in CASES
        for m in ("t1n", "t1c", "seg")
    )
    (qc / "geometry.csv").write_text(header + rows)
    for path in (qc / "overlays" / "case-1.png", qc / "histograms" / "t1n.png"):
        Image.new("RGB", (8, 4), "red").save(path)
    (qc / "overlays" / "case-2.png").write_text("not a png")
    return site


def _images(text: str) -> list[bytes]:
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    return [base64.b64decode(s.split(",", 1)[1], validate=True) for s in sources]


def test_site_report_has_banner_fingerprint_and_embedded_overlays(tmp_path: Path) -> None:
    text = site_report_html(_site(tmp_path))
    assert "Contains images of patients of hospital-&lt;a&gt;" in text.split("<h1>")[0]
    assert "must not leave the site" in text
    assert FINGERPRINT in text
    images = _images(text)
    assert len(images) == 2 and all(image[:8] == PNG for image in images)  # overlay, histogram
    assert "case-1 (train)" in text  # the overlay's caption names the case and its split
    assert "Not PNG files, left out: case-2.png" in text
    assert 'src="http' not in text and "<link" not in text and "<script" not in text


def test_site_report_lists_cases_split_geometry_and_volumes(tmp_path: Path) -> None:
    text = site_report_html(_site(tmp_path))
    assert "3 harmonised cases: 2 training, 1 validation" in text and "1 skipped" in text
    assert "<td>case-3</td><td>validation</td><td>yes</td><td>51 x 62 x 44</td>" in text
    # One geometry row per case and grid, not per image.
    assert "<td>case-2</td><td>t1n, t1c, seg</td><td>100x116x90</td>" in text
    assert (
        "<td>case-1</td><td>train</td><td>1.5</td><td>20.2</td><td>10.0</td><td>31.8</td>" in text
    )
    assert "no t2f" in text and "boom" in text and "mask volume" in text


def test_site_report_without_qc_still_writes(tmp_path: Path) -> None:
    site = tmp_path / "hospital-a"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps(_manifest()))
    path = write_site_report(site, out=tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / SITE_REPORT_NAME
    assert "summary.json not found" in text and "geometry.csv not found" in text
    assert "<img" not in text


def test_cli_site_report(tmp_path: Path) -> None:
    site = _site(tmp_path)
    result = CliRunner().invoke(app, ["report", "--site", str(site)])
    assert result.exit_code == 0, result.output
    assert (site / SITE_REPORT_NAME).is_file()
    assert not (site / "report.html").exists()  # nothing here is the server's report


@pytest.mark.parametrize("content", [None, "{broken"])
def test_cli_site_report_names_a_bad_manifest(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    result = CliRunner().invoke(app, ["report", "--site", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "manifest.json") in lines[0], result.output
