"""``convert_image``: one image to NIfTI with every voxel at the same world position."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from data_adapters.convert import convert_image
from data_adapters.errors import DataError
from data_adapters.geometry import LPS_TO_RAS
from data_adapters.readers import GeometryWarning
from tests.unit.test_dicom_volume import ORIENTATIONS, expected_world, voxel_value, write_series


def test_convert_dicom_series_keeps_world_positions(tmp_path: Path) -> None:
    orientation = ORIENTATIONS["oblique"]
    files = write_series(tmp_path / "dicom", orientation=orientation, shuffle=4)
    result = convert_image(tmp_path / "dicom", tmp_path / "out" / "t1.nii.gz")
    nifti = nib.load(result.output)
    header = nifti.header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    assert result.dtype == "int16" and nifti.get_data_dtype() == np.int16
    data = np.asanyarray(nifti.dataobj)
    for path in files:
        ds = pydicom.dcmread(path)
        k = int(np.argmax([data[0, 0, z] == voxel_value(0, 0, ds.InstanceNumber - 1)
                           for z in range(data.shape[2])]))  # fmt: skip
        for i, j in ((0, 0), (15, 11), (7, 3)):
            lps = expected_world([float(v) for v in ds.ImagePositionPatient], orientation, i, j)
            ras = (LPS_TO_RAS @ [*lps, 1.0])[:3]
            assert np.allclose(nifti.affine @ [i, j, k, 1.0], [*ras, 1.0], atol=1e-3)
            assert data[i, j, k] == voxel_value(i, j, ds.InstanceNumber - 1)
    assert np.allclose(header.get_qform(), header.get_sform(), atol=1e-4)


def test_convert_picks_a_series_by_uid(tmp_path: Path) -> None:
    write_series(tmp_path / "a", series_uid="1.2.3.1", n=5)
    write_series(tmp_path / "b", series_uid="1.2.3.2", n=7)
    with pytest.raises(DataError, match="2 DICOM series found"):
        convert_image(tmp_path, tmp_path / "x.nii.gz")
    result = convert_image(tmp_path, tmp_path / "x.nii.gz", series_uid="1.2.3.2")
    assert result.series_uid == "1.2.3.2"
    assert nib.load(tmp_path / "x.nii.gz").shape == (16, 12, 7)


def test_convert_nrrd_and_metaimage_keep_geometry(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((5, 6, 7), dtype=np.float32))
    image.SetDirection((0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0))
    image.SetOrigin((3.0, -4.0, 5.5))
    image.SetSpacing((0.5, 1.5, 2.0))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"in{suffix}"))
        result = convert_image(tmp_path / f"in{suffix}", tmp_path / f"out{suffix}.nii")
        back = sitk.ReadImage(str(result.output))
        for index in ((0, 0, 0), (6, 5, 4), (2, 3, 1)):
            assert np.allclose(
                back.TransformIndexToPhysicalPoint(index),
                image.TransformIndexToPhysicalPoint(index),
            )
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_convert_reports_geometry_notes(tmp_path: Path) -> None:
    sheared = np.array([[2.0, 0.4, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    source = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), None)
    source.set_sform(sheared, code=1)
    source.set_qform(np.eye(4), code=0)
    nib.save(source, tmp_path / "sheared.nii.gz")
    with pytest.warns(GeometryWarning):
        result = convert_image(tmp_path / "sheared.nii.gz", tmp_path / "out.nii.gz")
    assert any("orthonormalised" in note for note in result.notes)


@pytest.mark.parametrize(
    ("output", "uid", "message"),
    [
        ("out.nrrd", None, "output must be a .nii.gz or .nii file"),
        ("out.nii.gz", "1.2.3", "a series UID applies to DICOM input"),
    ],
)
def test_convert_refuses_bad_arguments(
    tmp_path: Path, output: str, uid: str | None, message: str
) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.eye(4)), tmp_path / "in.nii.gz")
    with warnings.catch_warnings(), pytest.raises(DataError) as info:
        convert_image(tmp_path / "in.nii.gz", tmp_path / output, series_uid=uid)
    assert message in str(info.value) and "\n" not in str(info.value)
