"""`fedseg harmonise` / `check-site` on a generated federation with a corrupt file at one site."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.synth import generate_federation


@pytest.fixture(scope="module")
def raw_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_federation(
        tmp_path_factory.mktemp("raw"), n_sites=3, cases_per_site=(4, 3, 3), seed=5
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_file_is_named_and_only_its_case_is_skipped(
    raw_sites: list[Path], tmp_path: Path
) -> None:
    # Prepare: break one modality of one case at the first site.
    site_a, site_b = raw_sites[0], raw_sites[1]
    bad = sorted(site_a.glob("*/*t2f.nii.gz"))[0]
    _truncate(bad)
    runner = CliRunner()
    # Execute
    out_a = runner.invoke(app, ["harmonise", str(site_a), str(tmp_path / "a"), "--spacing", "3"])
    out_b = runner.invoke(app, ["harmonise", str(site_b), str(tmp_path / "b"), "--spacing", "3"])
    strict = runner.invoke(
        app, ["harmonise", str(site_a), str(tmp_path / "a-strict"), "--spacing", "3", "--strict"]
    )
    # Assert
    assert out_a.exit_code == 0, out_a.output
    assert bad.name in out_a.output and "skipped" in out_a.output
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert len(manifest_a["cases"]) == 3
    assert manifest_a["skipped"][0]["case_id"] == bad.parent.name
    assert out_b.exit_code == 0 and "0 skipped" in out_b.output
    assert strict.exit_code == 1
    assert bad.name in strict.output and "Traceback" not in strict.output
    assert not (tmp_path / "a-strict").exists()
    check = runner.invoke(app, ["check-site", str(tmp_path / "b")])
    assert check.exit_code == 0 and "ok" in check.output


def test_thick_slice_non_ras_brats2021_site_becomes_canonical(
    raw_sites: list[Path], tmp_path: Path
) -> None:
    site_c = raw_sites[2]  # BraTS 2021 naming, ET written as 4, thick slices
    result = CliRunner().invoke(
        app, ["harmonise", str(site_c), str(tmp_path / "c"), "--spacing", "3"]
    )
    assert result.exit_code == 0, result.output
    for seg_path in (tmp_path / "c" / "cases").glob("*/seg.nii.gz"):
        seg = nib.load(seg_path)
        assert nib.aff2axcodes(seg.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.linalg.norm(seg.affine[:3, :3], axis=0), 3.0)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}
        assert 3 in np.asarray(seg.dataobj)  # ET survived the 4 -> 3 map


def _world_centroid(path: Path, values: tuple[int, ...]) -> np.ndarray:
    image = nib.load(path)
    ijk = np.argwhere(np.isin(np.asarray(image.dataobj), values))
    return (image.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].mean(axis=1)


def test_non_ras_site_keeps_every_structure_in_place_in_world_space(
    raw_sites: list[Path], tmp_path: Path
) -> None:
    # Prepare: hospital-b is a DICOM study site stored LPS (its label map is NIfTI).
    site_b = raw_sites[1]
    raw_segs = sorted(site_b.glob("*/seg.nii.gz"))
    assert nib.aff2axcodes(nib.load(raw_segs[0]).affine) != ("R", "A", "S")
    # Execute
    result = CliRunner().invoke(
        app, ["harmonise", str(site_b), str(tmp_path / "b"), "--spacing", "3"]
    )
    assert result.exit_code == 0, result.output
    # Assert: tumour and core centroids in world mm agree within a third of the 3 mm voxel.
    for raw_seg in raw_segs:
        canonical = tmp_path / "b" / "cases" / raw_seg.parent.name / "seg.nii.gz"
        for values in ((1, 2, 3), (1, 3)):
            moved = _world_centroid(canonical, values) - _world_centroid(raw_seg, values)
            assert np.linalg.norm(moved) < 1.0, (raw_seg.name, values, moved)
