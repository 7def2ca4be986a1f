"""Readers: NRRD and MetaImage, the NIfTI sform/qform rule and shear, DICOM paths."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import ijk_array, ras_affine
from data_adapters.readers import GEOMETRY_NOTE_KEY, GeometryWarning, read_image, read_volume
from tests.unit.test_dicom_volume import write_enhanced, write_series

DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # permuted and flipped axes


def _itk_image() -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetDirection(DIRECTION)
    image.SetOrigin((10.5, -20.0, 33.0))
    image.SetSpacing((0.8, 1.1, 2.5))
    return image


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_readers_nrrd_and_metaimage_keep_geometry(tmp_path: Path, suffix: str) -> None:
    source = _itk_image()
    sitk.WriteImage(source, str(tmp_path / f"image{suffix}"))
    image = read_image(tmp_path / f"image{suffix}")
    assert np.allclose(ras_affine(image), ras_affine(source))
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))


def test_readers_nrrd_in_ras_space_is_converted_to_lps(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.uint8)
    header = (
        "NRRD0004\ntype: uint8\ndimension: 3\nspace: right-anterior-superior\nsizes: 2 3 4\n"
        "space directions: (2,0,0) (0,3,0) (0,0,4)\nkinds: domain domain domain\n"
        "encoding: raw\nspace origin: (10,20,30)\n\n"
    )
    (tmp_path / "ras.nrrd").write_bytes(header.encode() + data.tobytes())
    image = read_image(tmp_path / "ras.nrrd")
    # RAS (10, 20, 30) is LPS (-10, -20, 30); voxel i steps 2 mm Right, i.e. -x in LPS.
    assert image.GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))
    assert np.allclose(
        ras_affine(image), [[2, 0, 0, 10], [0, 3, 0, 20], [0, 0, 4, 30], [0, 0, 0, 1]]
    )


@pytest.mark.parametrize(("suffix", "data"), [(".mhd", ".raw"), (".nhdr", ".raw")])
def test_readers_missing_detached_data_is_refused(tmp_path: Path, suffix: str, data: str) -> None:
    sitk.WriteImage(_itk_image(), str(tmp_path / f"image{suffix}"))
    (tmp_path / f"image{data}").unlink()
    with pytest.raises(DataError) as info:
        read_image(tmp_path / f"image{suffix}")
    assert str(info.value).startswith(f"{tmp_path / f'image{suffix}'}: ")
    assert "image.raw" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_readers_truncated_nrrd_and_metaimage_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(_itk_image(), str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "truncated" in str(info.value) or "fread got only" in str(info.value)


def test_readers_truncated_nifti_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "image.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_image(path)


# --- NIfTI: sform when sform_code > 0, else qform, else voxel sizes (NIfTI method 1) --------

SFORM = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 3.0, 30], [0, 0, 0, 1]])
_C, _S = np.cos(np.radians(10)), np.sin(np.radians(10))
QFORM = np.array([[_C, -_S, 0, 0], [_S, _C, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ SFORM
QFORM[:3, 3] += 5.0


def _nifti(path: Path, sform: np.ndarray, scode: int, qform: np.ndarray, qcode: int) -> Path:
    image = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), None)
    image.set_sform(sform, code=scode)
    image.set_qform(qform, code=qcode)
    nib.save(image, path)
    return path


def _read_with_warnings(path: Path) -> tuple[sitk.Image, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
    return image, [str(w.message) for w in caught if issubclass(w.category, GeometryWarning)]


@pytest.mark.parametrize(
    ("scode", "qcode", "expected", "warned"),
    [
        (1, 1, SFORM, "disagree"),  # both set: sform, and the disagreement is reported
        (4, 1, SFORM, "disagree"),  # SimpleITK itself prefers the scanner qform here
        (2, 0, SFORM, None),
        (0, 1, QFORM, None),
    ],
)
def test_readers_nifti_follows_the_sform_qform_rule(
    tmp_path: Path, scode: int, qcode: int, expected: np.ndarray, warned: str | None
) -> None:
    path = _nifti(tmp_path / "x.nii.gz", SFORM, scode, QFORM, qcode)
    image, messages = _read_with_warnings(path)
    assert np.allclose(ras_affine(image), expected, atol=1e-4)
    assert np.array_equal(ijk_array(image), np.asanyarray(nib.load(path).dataobj))
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0] and str(path) in messages[0]
        assert "10.00 degrees" in messages[0]


def test_readers_simpleitk_alone_breaks_the_rule_where_we_override(tmp_path: Path) -> None:
    # Why read_nifti sets the geometry itself: SimpleITK picks the qform over an MNI sform.
    path = _nifti(tmp_path / "x.nii.gz", SFORM, 4, QFORM, 1)
    assert np.allclose(ras_affine(sitk.ReadImage(str(path))), QFORM, atol=1e-4)
    with pytest.warns(GeometryWarning, match="disagree"):
        assert np.allclose(ras_affine(read_image(path)), SFORM, atol=1e-4)


def test_readers_nifti_agreeing_transforms_do_not_warn(tmp_path: Path) -> None:
    nudged = SFORM.copy()
    nudged[0, 3] += 0.05  # below the 0.1 mm threshold
    _, messages = _read_with_warnings(_nifti(tmp_path / "x.nii", SFORM, 1, nudged, 1))
    assert messages == []


def test_readers_nifti_without_transforms_uses_voxel_sizes(tmp_path: Path) -> None:
    image, messages = _read_with_warnings(_nifti(tmp_path / "x.nii", SFORM, 0, QFORM, 0))
    assert np.allclose(ras_affine(image), np.diag([2.0, 2.0, 3.0, 1.0]))
    assert messages and "orientation unknown" in messages[0]


@pytest.mark.parametrize("qcode", [0, 1])
def test_readers_sheared_nifti_is_orthonormalised_not_refused(tmp_path: Path, qcode: int) -> None:
    sheared = SFORM.copy()
    sheared[0, 1] = 0.5  # voxel axis j leans along x: shear
    path = _nifti(tmp_path / "sheared.nii.gz", sheared, 1, SFORM, qcode)
    image, messages = _read_with_warnings(path)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    assert image.GetOrigin() == pytest.approx((-10.0, 20.0, 30.0))  # kept (LPS)
    assert image.GetSpacing() == pytest.approx(np.linalg.norm(sheared[:3, :3], axis=0))
    assert any("orthonormalised by polar decomposition" in m for m in messages)
    assert "orthonormalised" in image.GetMetaData(GEOMETRY_NOTE_KEY)
    # The nearest rotation: closer to the sheared matrix than the qform's is.
    unit = sheared[:3, :3] / np.linalg.norm(sheared[:3, :3], axis=0)
    lps_direction = np.diag([-1.0, -1.0, 1.0]) @ direction
    assert np.linalg.norm(lps_direction - unit) < np.linalg.norm(np.diag([-1.0, 1, 1]) - unit)


def test_readers_4d_nifti_volume_gets_the_rule_geometry(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), None)
    image.set_sform(SFORM, code=4)
    image.set_qform(QFORM, code=1)
    nib.save(image, tmp_path / "four.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        volume = read_volume(tmp_path / "four.nii.gz", 1)
    assert np.allclose(ras_affine(volume), SFORM, atol=1e-4)


def test_readers_folder_and_dicom_files_go_to_the_dicom_reader(tmp_path: Path) -> None:
    files = write_series(tmp_path / "series")
    assert read_image(tmp_path / "series").GetSize() == (16, 12, 8)
    with pytest.raises(DataError, match="only one slice"):
        read_image(files[0])  # a suffix-less file with the DICM marker: one classic slice
    write_enhanced(tmp_path / "enhanced.dcm")
    assert read_image(tmp_path / "enhanced.dcm").GetSize() == (16, 12, 8)
