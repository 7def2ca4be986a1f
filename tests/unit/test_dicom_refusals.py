"""What a DICOM series reader refuses, and how the one-line error reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from data_adapters.dicom import DICOMDIR_SOP_CLASS, list_series, read_series
from data_adapters.errors import DataError
from tests.unit.test_dicom_volume import ORIENTATIONS, slice_positions, write_series

AXIAL = ORIENTATIONS["axial-lps"]


def refusal(folder: Path, *, series_uid: str | None = None) -> str:
    """The error text of reading ``folder``, checked to be one line naming a path."""
    with pytest.raises(DataError) as info:
        read_series(folder, series_uid=series_uid)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(folder))
    return text


def test_dicom_missing_slice_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path)
    files[3].unlink()
    text = refusal(tmp_path)
    assert "missing slices" in text
    assert "IM0002 and IM0004" in text  # the files on either side of the gap


def test_dicom_uneven_spacing_is_refused(tmp_path: Path) -> None:
    positions = slice_positions(8, AXIAL)
    positions[4] = (positions[4][0], positions[4][1], positions[4][2] + 0.1)  # 4% of 2.5 mm
    write_series(tmp_path, positions=positions)
    assert "uneven slice spacing" in refusal(tmp_path)


def test_dicom_spacing_within_one_percent_is_accepted(tmp_path: Path) -> None:
    positions = slice_positions(8, AXIAL)
    positions[4] = (positions[4][0], positions[4][1], positions[4][2] + 0.01)  # 0.4%
    write_series(tmp_path, positions=positions)
    assert read_series(tmp_path).GetSize()[2] == 8


def test_dicom_duplicate_position_is_refused(tmp_path: Path) -> None:
    positions = slice_positions(8, AXIAL)
    positions[5] = positions[4]
    write_series(tmp_path, positions=positions)
    text = refusal(tmp_path)
    assert "duplicate slice position" in text
    assert "IM0004" in text and "IM0005" in text


def test_dicom_single_slice_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path, n=1)
    assert "only one slice" in refusal(tmp_path)


def test_dicom_file_without_pixel_data_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(DataError) as info:
        read_series(tmp_path)
    assert str(info.value) == f"{files[2]}: no PixelData: the file holds no image"


def test_dicom_mixed_orientations_are_refused(tmp_path: Path) -> None:
    # A 3-plane localiser: one series, an axial, a sagittal and a coronal slice pair.
    for n, name in enumerate(("axial-lps", "sagittal", "axial-flipped")):
        write_series(
            tmp_path / name, n=2, orientation=ORIENTATIONS[name], series_uid="1.2.3.9",
            positions=slice_positions(2, ORIENTATIONS[name], origin=(n * 50.0, 0.0, 0.0)),
        )  # fmt: skip
    text = refusal(tmp_path)
    assert "not parallel" in text and "3 different ImageOrientationPatient" in text


def test_dicom_tilted_stack_is_refused(tmp_path: Path) -> None:
    # Gantry tilt: each slice shifts 0.5 mm along y as it steps 2.5 mm along z.
    positions = [(0.0, 0.5 * k, 2.5 * k) for k in range(8)]
    write_series(tmp_path, positions=positions)
    assert "leave the slice normal" in refusal(tmp_path)


def test_dicom_inconsistent_image_size_is_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path)
    ds = pydicom.dcmread(files[1])
    ds.Rows = 8
    ds.PixelData = np.zeros((8, 16), np.int16).tobytes()
    ds.save_as(files[1], enforce_file_format=True)
    text = refusal(tmp_path)
    assert "inconsistent image size" in text and "8x16" in text


def test_dicom_missing_geometry_names_the_file(tmp_path: Path) -> None:
    files = write_series(tmp_path)
    ds = pydicom.dcmread(files[0])
    del ds.ImagePositionPatient
    ds.save_as(files[0], enforce_file_format=True)
    with pytest.raises(DataError) as info:
        read_series(tmp_path)
    assert str(info.value) == f"{files[0]}: no usable ImagePositionPatient"


def test_dicom_several_series_are_listed_and_one_is_picked(tmp_path: Path) -> None:
    write_series(tmp_path / "t1", series_uid="1.2.3.10", description="AX T1 SE")
    write_series(tmp_path / "t2", series_uid="1.2.3.20", description="AX T2 FSE", n=6)
    text = refusal(tmp_path)
    assert "2 DICOM series found" in text
    assert "1.2.3.10 'AX T1 SE' (8 files)" in text
    assert "1.2.3.20 'AX T2 FSE' (6 files)" in text
    assert read_series(tmp_path, series_uid="1.2.3.20").GetSize()[2] == 6
    assert "no DICOM series 9.9.9" in refusal(tmp_path, series_uid="9.9.9")


def test_dicom_folder_without_dicom_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "scan.nii.gz").write_bytes(b"not dicom")
    assert refusal(tmp_path).endswith("no DICOM files found")


def test_dicom_dicomdir_is_ignored(tmp_path: Path) -> None:
    write_series(tmp_path / "IMAGES")
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = DICOMDIR_SOP_CLASS
    index.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
    index.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index.FileSetID = "TEST"
    index.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    assert len(list_series(tmp_path)) == 1
    assert read_series(tmp_path).GetSize()[2] == 8


@pytest.mark.parametrize("cut", [140, 400])
def test_dicom_damaged_file_is_refused_by_name(tmp_path: Path, cut: int) -> None:
    files = write_series(tmp_path)
    bad = tmp_path / "broken"
    bad.write_bytes(files[0].read_bytes()[:cut])  # a copy cut off inside its header
    with pytest.raises(DataError) as info:
        list_series(tmp_path)
    assert str(info.value).startswith(f"{bad}: ")
    assert "\n" not in str(info.value)
