"""Crop to the head and pad to a minimum size (data_adapters.harmonise.pad_grid)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_adapters.errors import DataError
from data_adapters.geometry import ijk_array, ras_affine
from data_adapters.grid import Grid, Step, pad_grid
from data_adapters.harmonise import HarmonisedCase, harmonise_case
from data_adapters.layouts import list_cases
from data_adapters.manifest import load_manifest
from data_adapters.site import harmonise_site
from tests.unit.test_harmonise_phantom import Scan, load_nifti, write_raw_case

SPACING = (3.0, 3.0, 3.0)
SCAN = Scan()  # 34 x 40 x 30 voxels of 3 mm, head of about 90 x 110 x 84 mm


def _step(case: HarmonisedCase, name: str) -> Step:
    (step,) = [s for s in case.steps if s.name == name]
    return step


def test_pad_grid_adds_whole_voxels_around_and_keeps_centres() -> None:
    grid = Grid(size=(10, 11, 12), spacing=(2.0, 2.0, 2.0), origin=(4.0, -6.0, 8.0))
    padded, step = pad_grid(grid, min_size=15)
    assert padded.size == (15, 15, 15)
    assert step.params["before"] == [2, 2, 1] and step.params["after"] == [3, 2, 2]
    # Old voxel (0, 0, 0) is new voxel `before`: same LPS point (RAS grid: i runs to -x).
    assert padded.origin == (4.0 + 2 * 2.0, -6.0 + 2 * 2.0, 8.0 - 1 * 2.0)
    assert padded.direction == grid.direction and padded.spacing == grid.spacing

    by_mm, step = pad_grid(grid, min_shape_mm=(40.0, 20.0, 0.0))
    assert by_mm.size == (20, 11, 12) and step.params["after"] == [5, 0, 0]
    unchanged, step = pad_grid(grid, min_size=(4, 4, 4))
    assert unchanged == grid and step.params["before"] == [0, 0, 0]


def test_harmonise_case_pads_to_min_size_without_moving_anything(tmp_path: Path) -> None:
    write_raw_case(tmp_path, "case", SCAN)
    (raw_case,) = list_cases(tmp_path, "brats2023")
    plain = harmonise_case(raw_case, target_spacing=SPACING)
    padded = harmonise_case(raw_case, target_spacing=SPACING, min_size=(48, 40, 44))
    assert plain.seg is not None and padded.seg is not None
    crop = _step(padded, "crop").params
    assert crop["size"] == list(plain.grid.size) and crop["margin_mm"] == 5.0
    pad = _step(padded, "pad").params
    wanted = zip(plain.grid.size, (48, 40, 44), strict=True)
    assert padded.grid.size == tuple(max(n, m) for n, m in wanted)
    assert pad["size"] == list(padded.grid.size) and pad["min_size"] == [48, 40, 44]
    assert "".join(nib.aff2axcodes(ras_affine(padded.seg))) == "RAS"

    # Every voxel of the unpadded case is in the padded one, shifted by `before`, with the
    # same value and the same world position; the padding is background.
    before = np.array(pad["before"])
    window = tuple(slice(b, b + n) for b, n in zip(before, plain.grid.size, strict=True))
    for name in ("t1n", "t2f"):
        np.testing.assert_array_equal(
            ijk_array(padded.images[name])[window], ijk_array(plain.images[name])
        )
    labels = ijk_array(padded.seg)
    np.testing.assert_array_equal(labels[window], ijk_array(plain.seg))
    assert labels.sum() == ijk_array(plain.seg).sum()
    a, b = ras_affine(plain.seg), ras_affine(padded.seg)
    for index in ([0, 0, 0], [5, 7, 9]):
        np.testing.assert_allclose(b @ [*(np.array(index) + before), 1], a @ [*index, 1])


def test_site_pads_every_case_by_mm_and_records_it(tmp_path: Path) -> None:
    for i in range(2):
        write_raw_case(tmp_path / "raw", f"case{i}", SCAN, seed=i)
    result = harmonise_site(
        tmp_path / "raw", tmp_path / "out", target_spacing=SPACING, min_shape_mm=150.0, qc=False
    )
    manifest = load_manifest(tmp_path / "out")
    assert manifest.parameters["min_shape_mm"] == [150.0] * 3
    for record in result.manifest.cases:
        assert record.output_shape == (50, 50, 50)  # 150 mm / 3 mm
        image = load_nifti(tmp_path / "out" / "cases" / record.case_id / "seg.nii.gz")
        assert image.shape == (50, 50, 50)
    with pytest.raises(DataError, match="min_size"):
        harmonise_site(tmp_path / "raw", tmp_path / "bad", target_spacing=SPACING, min_size=-1)
