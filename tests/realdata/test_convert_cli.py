"""`fedseg convert` on real DICOM that pydicom ships: a good series converts, a bad one is
refused with one line naming the folder and the reason (exit code 1, no traceback)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from typer.testing import CliRunner

from fedseg.cli import app
from tests.realdata.test_dicom_real import shipped


def test_convert_real_ct_series_through_the_cli(tmp_path: Path) -> None:
    folder = shipped("dicomdirtests/98892001/CT5N/2062").parent
    out = tmp_path / "ct.nii.gz"
    result = CliRunner().invoke(app, ["convert", str(folder), str(out)])
    assert result.exit_code == 0, result.output
    image = nib.load(out)
    assert image.shape == (16, 16, 5)
    # Every slice's first voxel sits at that slice's ImagePositionPatient (LPS -> RAS).
    positions = sorted(
        (np.array(pydicom.dcmread(f).ImagePositionPatient, float) for f in folder.iterdir()),
        key=lambda p: p[2],
    )
    corners = [image.affine @ [0, 0, k, 1] for k in range(5)]
    found = sorted((c[:3] * [-1, -1, 1] for c in corners), key=lambda p: p[2])
    np.testing.assert_allclose(found, positions, atol=0.1)


def test_convert_refuses_a_gapped_series_in_one_line(tmp_path: Path) -> None:
    folder = shipped("dicomdirtests/77654033/CT2/17106").parent
    result = CliRunner().invoke(app, ["convert", str(folder), str(tmp_path / "x.nii.gz")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(folder) in lines[0] and "missing slices" in lines[0]
    assert not (tmp_path / "x.nii.gz").exists()
