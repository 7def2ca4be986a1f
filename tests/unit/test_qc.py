"""Site QC written by harmonise_site (data_adapters.qc): files, content, failure isolation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_adapters import qc
from data_adapters.layouts import MODALITIES
from data_adapters.site import harmonise_site
from tests.unit.test_harmonise_phantom import Scan, load_nifti, write_raw_case

SPACING = (3.0, 3.0, 3.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _raw_site(root: Path) -> Path:
    """Five cases: c0-c3 ordinary (c1 stored LPS), c4 labelled but with an empty label map."""
    for i in range(4):
        write_raw_case(root, f"c{i}", Scan(codes="LPS" if i == 1 else "RAS"), seed=i)
    write_raw_case(root, "c4", Scan(), empty_label=True, seed=4)
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("qc")
    out = base / "out"
    harmonise_site(_raw_site(base / "raw"), out, target_spacing=SPACING)
    return out


def _summary(site: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((site / "qc" / "summary.json").read_text())
    return data


def test_histograms_and_overlays_are_pngs(site: Path) -> None:
    for modality in MODALITIES:
        payload = (site / "qc" / "histograms" / f"{modality}.png").read_bytes()
        assert payload.startswith(PNG_MAGIC) and len(payload) > 5_000
    overlays = sorted(p.stem for p in (site / "qc" / "overlays").glob("*.png"))
    # The first three cases, and c4 because it is flagged; c3 is neither.
    assert overlays == ["c0", "c1", "c2", "c4"]
    assert (site / "qc" / "overlays" / "c0.png").read_bytes().startswith(PNG_MAGIC)


def test_summary_volumes_match_the_written_labels(site: Path) -> None:
    summary = _summary(site)
    assert summary["errors"] == [] and summary["n_cases"] == 5
    assert summary["flagged"] == ["c4"]
    for case in summary["cases"]:
        seg = load_nifti(site / "cases" / case["case_id"] / "seg.nii.gz")
        labels = np.asarray(seg.dataobj)
        voxel_ml = float(np.prod(seg.header.get_zooms())) / 1000.0
        for value in (1, 2, 3):
            count = int(np.count_nonzero(labels == value))
            assert case["label_voxels"][str(value)] == count
            assert case["label_volumes_ml"][str(value)] == pytest.approx(count * voxel_ml)
        assert case["output_shape"] == list(labels.shape)
        assert case["output_spacing"] == list(SPACING)
        # The phantom head (ellipsoid 45 x 55 x 42 mm radii) is about 435 ml.
        assert 300.0 < case["mask_volume_ml"] < 600.0
        for modality in MODALITIES:
            stats = case["intensity_before_normalisation"][modality]
            assert stats["mean"] > 50.0 and stats["std"] > 1.0
    c1 = next(c for c in summary["cases"] if c["case_id"] == "c1")
    assert c1["source"]["t1n"] == {"shape": [34, 40, 30], "spacing": [3.0] * 3, "axcodes": "LPS"}
    c4 = next(c for c in summary["cases"] if c["case_id"] == "c4")
    assert c4["flags"] == ["empty_label"] and not any(c4["label_voxels"].values())
    assert summary["qc_seconds_per_case"] < 2.0  # target < 1 s; loose for a loaded CI machine


def test_qc_failure_never_stops_harmonisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(qc, "plot_overlay", broken)
    monkeypatch.setattr(qc, "plot_histograms", broken)
    monkeypatch.setattr(qc, "case_summary", broken)
    raw = tmp_path / "raw"
    for i in range(2):
        write_raw_case(raw, f"c{i}", Scan(), seed=i)
    result = harmonise_site(raw, tmp_path / "out", target_spacing=SPACING)
    assert [c.case_id for c in result.manifest.cases] == ["c0", "c1"] and not result.skipped
    assert (tmp_path / "out" / "cases" / "c1" / "t2f.nii.gz").is_file()
    summary = _summary(tmp_path / "out")
    stages = {(e["case_id"], e["stage"]) for e in summary["errors"]}
    assert {("c0", "summary"), ("c1", "summary"), ("*", "histogram")} <= stages
    assert all("matplotlib exploded" in e["error"] for e in summary["errors"])
    assert any("QC summary failed for c0" in r.getMessage() for r in caplog.records)


def test_qc_can_be_switched_off(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_raw_case(raw, "c0", Scan())
    harmonise_site(raw, tmp_path / "out", target_spacing=SPACING, qc=False)
    written = sorted(p.name for p in (tmp_path / "out" / "qc").iterdir())
    assert written == ["geometry.csv", "skipped.csv"]
