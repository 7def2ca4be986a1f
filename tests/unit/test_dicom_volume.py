"""DICOM series to volume on tiny synthetic series: world geometry, slice order, rescale.

The helpers here (:func:`write_series`, :func:`write_enhanced`) write series with pydicom
whose voxel values encode their own (i, j, k) index, so a test can tell where every voxel
came from; the other DICOM test modules import them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_adapters.dicom import list_series, read_series, series_files
from data_adapters.geometry import ijk_array

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
ROWS, COLUMNS = 12, 16  # unequal, so a rows/columns swap shows
PIXEL_SPACING = (0.9, 0.7)  # [row spacing, column spacing], unequal for the same reason


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A rotation by angles in degrees about x, then y, then z."""
    x, y, z = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


_OBLIQUE = _rotation(17.0, -23.0, 31.0)
#: ImageOrientationPatient (row direction, column direction) of the test orientations.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial-lps": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "axial-flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # rows run Right, columns Anterior
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (*_OBLIQUE[:, 0], *_OBLIQUE[:, 1]),
}


def voxel_value(i: int, j: int, k: int) -> int:
    """The stored value of voxel (column i, row j, slice k) in the synthetic series."""
    return k * 256 + j * 16 + i


def base_dataset(sop_class: str, series_uid: str, description: str) -> Dataset:
    """An MR dataset with the identifying attributes and file meta filled in."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.PatientID = "P001"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def slice_positions(
    n: int, orientation: Sequence[float], *, origin: Sequence[float] = (-40.0, 25.0, 12.5),
    step: float = 2.5,
) -> list[tuple[float, float, float]]:  # fmt: skip
    """ImagePositionPatient of ``n`` evenly spaced slices along the orientation's normal."""
    normal = np.cross(orientation[:3], orientation[3:])
    return [tuple(float(v) for v in np.asarray(origin) + k * step * normal) for k in range(n)]  # type: ignore[misc]


def write_series(
    folder: Path,
    *,
    n: int = 8,
    orientation: Sequence[float] = ORIENTATIONS["axial-lps"],
    positions: Sequence[Sequence[float]] | None = None,
    description: str = "AX T1 SE",
    series_uid: str | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    shuffle: int | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a classic single-frame series; slice k holds :func:`voxel_value` values.

    Files are named in slice order, or in a random order when ``shuffle`` gives a seed.
    ``extra`` sets further attributes on every file (EchoTime, ContrastBolusAgent...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    positions = positions or slice_positions(n, orientation)
    names = list(range(len(positions)))
    if shuffle is not None:
        random.Random(shuffle).shuffle(names)
    jj, ii = np.mgrid[0:ROWS, 0:COLUMNS]
    paths = []
    for k, position in enumerate(positions):
        ds = base_dataset(MR_IMAGE, uid, description)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = 99.0  # wrong on purpose: spacing must come from the positions
        ds.SpacingBetweenSlices = 77.0
        ds.Rows, ds.Columns = ROWS, COLUMNS
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = voxel_value(ii, jj, k).astype(np.int16).tobytes()
        path = folder / f"IM{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced(
    path: Path,
    *,
    n: int = 8,
    orientation: Sequence[float] = ORIENTATIONS["oblique"],
    slope: float = 2.0,
    intercept: float = -5.0,
    seed: int = 3,
) -> list[tuple[float, float, float]]:
    """Write an enhanced multi-frame MR file with frames in shuffled order.

    Returns the position of slice k (the frame holding :func:`voxel_value` k values).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    positions = slice_positions(n, orientation, origin=(5.0, -60.0, 30.0), step=1.25)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    ds = base_dataset(ENHANCED_MR_IMAGE, generate_uid(), "3D T1 TFE")
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = ROWS, COLUMNS
    shared = Dataset()
    measures, plane, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = list(PIXEL_SPACING)
    measures.SliceThickness = 5.0
    plane.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slope, intercept, "US"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in order:
        item, where = Dataset(), Dataset()
        where.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([where])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    jj, ii = np.mgrid[0:ROWS, 0:COLUMNS]
    ds.PixelData = np.stack([voxel_value(ii, jj, k) for k in order]).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return positions


def expected_world(position: Sequence[float], orientation: Sequence[float], i: int, j: int) -> Any:
    """DICOM's own formula for the LPS position of column i, row j of a slice."""
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return np.asarray(position) + i * PIXEL_SPACING[1] * row_dir + j * PIXEL_SPACING[0] * col_dir


def check_geometry(
    image: sitk.Image, positions: Sequence[Sequence[float]], orientation: Sequence[float]
) -> float:
    """Assert every voxel sits where its source slice says and holds that slice's values.

    Returns the largest position error found (mm).
    """
    values = ijk_array(image)
    assert image.GetSize() == (COLUMNS, ROWS, len(positions))
    worst = 0.0
    for k in range(image.GetSize()[2]):
        source = int(values[0, 0, k]) // 256  # which written slice landed at index k
        for i, j in ((0, 0), (COLUMNS - 1, 0), (0, ROWS - 1), (COLUMNS - 1, ROWS - 1), (5, 7)):
            world = np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))
            error = float(
                np.linalg.norm(world - expected_world(positions[source], orientation, i, j))
            )
            worst = max(worst, error)
            assert values[i, j, k] == voxel_value(i, j, source)
    assert worst < 1e-3, f"voxel positions off by {worst} mm"
    return worst


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_dicom_voxel_world_positions_match_image_position_patient(
    tmp_path: Path, name: str
) -> None:
    orientation = ORIENTATIONS[name]
    positions = slice_positions(8, orientation)
    write_series(tmp_path / "s", orientation=orientation, shuffle=1)
    image = read_series(tmp_path / "s")
    check_geometry(image, positions, orientation)
    # Slice spacing comes from the positions, not SliceThickness / SpacingBetweenSlices.
    assert image.GetSpacing() == pytest.approx((PIXEL_SPACING[1], PIXEL_SPACING[0], 2.5))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.linalg.det(direction) == pytest.approx(1.0)
    assert direction[:, 0] == pytest.approx(orientation[:3], abs=1e-6)
    assert direction[:, 1] == pytest.approx(orientation[3:], abs=1e-6)


def test_dicom_positions_written_in_descending_order_still_stack(tmp_path: Path) -> None:
    orientation = ORIENTATIONS["axial-lps"]
    positions = slice_positions(8, orientation)[::-1]  # slice 0 is the highest
    write_series(tmp_path / "s", positions=positions)
    image = read_series(tmp_path / "s")
    check_geometry(image, positions, orientation)
    assert image.GetOrigin() == pytest.approx(positions[-1])


def test_dicom_shuffled_file_order_gives_the_same_volume(tmp_path: Path) -> None:
    write_series(tmp_path / "sorted", series_uid="1.2.3.4")
    write_series(tmp_path / "shuffled", series_uid="1.2.3.4", shuffle=7)
    a, b = read_series(tmp_path / "sorted"), read_series(tmp_path / "shuffled")
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (
        b.GetOrigin(), b.GetSpacing(), b.GetDirection()
    )  # fmt: skip


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    write_series(tmp_path / "f", slope=0.5, intercept=-100.25)
    write_series(tmp_path / "i", slope=1.0, intercept=-1024.0)
    raw = ijk_array(read_series(tmp_path / "f"))
    assert raw.dtype == np.float32
    assert raw[3, 2, 1] == pytest.approx(voxel_value(3, 2, 1) * 0.5 - 100.25)
    exact = ijk_array(read_series(tmp_path / "i"))
    assert np.issubdtype(exact.dtype, np.integer)  # an integer intercept stays exact
    assert exact[3, 2, 1] == voxel_value(3, 2, 1) - 1024


def test_dicom_enhanced_multiframe_builds_the_volume_from_functional_groups(
    tmp_path: Path,
) -> None:
    positions = write_enhanced(tmp_path / "study" / "enhanced.dcm")
    image = read_series(tmp_path / "study")
    assert image.GetSpacing()[2] == pytest.approx(1.25)
    values = ijk_array(image)
    for k in range(len(positions)):
        world = np.asarray(image.TransformIndexToPhysicalPoint((2, 3, k)))
        source = round((int(values[0, 0, k]) + 5) / 2) // 256  # undo the shared rescale
        expected = expected_world(positions[source], ORIENTATIONS["oblique"], 2, 3)
        assert np.linalg.norm(world - expected) < 1e-3
        assert values[2, 3, k] == voxel_value(2, 3, source) * 2 - 5
    assert [s.n_frames for s in list_series(tmp_path / "study")] == [8]
    # One enhanced file is a whole series, also when named directly.
    single = read_series(tmp_path / "study" / "enhanced.dcm")
    assert np.array_equal(sitk.GetArrayFromImage(single), sitk.GetArrayFromImage(image))


def test_dicom_list_series_reads_sequence_parameters_and_ignores_other_files(
    tmp_path: Path,
) -> None:
    extra = {"EchoTime": 12.5, "RepetitionTime": 550.0, "InversionTime": 0.0,
             "ScanningSequence": ["SE", "IR"], "ContrastBolusAgent": "Gadavist",
             "ProtocolName": "BRAIN", "ImageType": ["ORIGINAL", "PRIMARY"],
             "MRAcquisitionType": "2D"}  # fmt: skip
    files = write_series(tmp_path / "a" / "b", extra=extra, description="AX T1 POST")
    (tmp_path / "README.txt").write_text("not DICOM")
    (tmp_path / "a" / "notes.dcm").write_bytes(b"\0" * 200)  # .dcm suffix, no DICM marker
    [info] = list_series(tmp_path)
    assert (info.description, info.protocol, info.modality) == ("AX T1 POST", "BRAIN", "MR")
    assert (info.echo_time, info.repetition_time, info.inversion_time) == (12.5, 550.0, 0.0)
    assert info.scanning_sequence == ("SE", "IR")
    assert info.contrast_agent == "Gadavist"
    assert info.image_type == ("ORIGINAL", "PRIMARY")
    assert info.mr_acquisition_type == "2D"
    assert (info.n_files, info.n_frames) == (8, 8)
    assert sorted(info.files) == sorted(files)
    assert series_files(tmp_path, series_uid=info.uid) == sorted(files)


def test_dicom_listing_notices_a_changed_folder(tmp_path: Path) -> None:
    write_series(tmp_path, series_uid="1.2.3.1", description="AX T1 SE")
    assert [s.uid for s in list_series(tmp_path)] == ["1.2.3.1"]
    write_series(tmp_path / "more", series_uid="1.2.3.2", description="AX T2 FSE")
    assert sorted(s.uid for s in list_series(tmp_path)) == ["1.2.3.1", "1.2.3.2"]


def test_dicom_pixel_spacing_order_rows_then_columns(tmp_path: Path) -> None:
    write_series(tmp_path)
    image = read_series(tmp_path)
    ds = pydicom.dcmread(sorted(tmp_path.iterdir())[0])
    # Along i (one column to the next) voxels are PixelSpacing[1] apart.
    step_i = np.subtract(
        image.TransformIndexToPhysicalPoint((1, 0, 0)),
        image.TransformIndexToPhysicalPoint((0, 0, 0)),
    )
    assert np.linalg.norm(step_i) == pytest.approx(float(ds.PixelSpacing[1]))
    assert image.GetSize()[:2] == (int(ds.Columns), int(ds.Rows))
