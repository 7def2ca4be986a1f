"""DICOM-SEG export of predicted label maps: overlay on the source slices, segments, refusals.

The overlay is checked independently of the writer: every SEG frame is followed to the
source instance (or frame) it references, that source's ImagePositionPatient is put into
the label map's index space with SimpleITK, and the frames rebuild one volume per segment,
which must equal ``labels == segment`` voxel for voxel.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from data_adapters.dicom import list_series, read_series, series_files
from data_adapters.dicom_seg import TUMOUR_SEGMENTS, write_dicom_seg
from data_adapters.errors import DataError
from fedseg.synth import dicom_study
from fedseg.synth.render import RenderedCase
from tests.unit.test_dicom_volume import (
    ORIENTATIONS,
    _rotation,
    slice_positions,
    write_enhanced,
    write_series,
)

FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.77"
STUDY_SHAPE = (20, 16, 10)  # (i, j, k): columns, rows, slices of the synthetic study
T1 = dicom_study.SERIES_OF_MODALITY["t1n"].description


def tumour(shape: tuple[int, int, int]) -> np.ndarray:
    """A (i, j, k) label map with one lopsided blob per label on different slices.

    Label 3 touches the first slice and label 2 the last, so a reversed or shifted slice
    mapping moves them; the blobs are off-centre in-plane, so a row/column swap or a flip
    shows too.
    """
    ni, nj, nk = shape
    seg = np.zeros(shape, dtype=np.uint8)
    seg[1 : ni // 3, 1 : nj // 2, nk // 3 : nk // 2] = 1
    seg[ni // 2 : ni - 1, nj // 3 : nj - 2, nk // 2 :] = 2
    seg[2:4, nj - 3 : nj - 1, 0:2] = 3
    seg[ni - 2, 0, 1] = 3  # a single voxel in a corner
    return seg


def on_grid(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (i, j, k) array as a uint8 image on ``reference``'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    cast: sitk.Image = sitk.Cast(image, sitk.sitkUInt8)
    return cast


def write_synthetic_study(folder: Path, affine: np.ndarray) -> tuple[str, sitk.Image]:
    """A study by fedseg's synthetic writer; the T1 series' uid and the label map it wrote."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 400, STUDY_SHAPE).astype(np.int16)
    seg = tumour(STUDY_SHAPE)
    case = RenderedCase(
        images={m: pixels for m in ("t1n", "t1c", "t2w", "t2f")}, seg=seg, tissue=seg,
        brain=np.ones(STUDY_SHAPE, dtype=bool), affine=affine, info={},
    )  # fmt: skip
    dicom_study.write_study(case, folder, patient_id="p007", uid_root="seg-test", institution="X")
    [t1] = [s for s in list_series(folder) if s.description == T1]
    # write_study puts seg.nii.gz on the T1 grid: the prediction a clinician gets back.
    return t1.uid, sitk.ReadImage(str(folder / "seg.nii.gz"))


def study_affine(rotation: np.ndarray | None = None) -> np.ndarray:
    """A RAS voxel-to-world affine with unequal spacings, optionally rotated."""
    linear = np.diag([1.5, 1.25, 3.0]) if rotation is None else rotation @ np.diag([1.5, 1.25, 3.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, (-14.0, -10.0, -12.0)
    return affine


def source_positions(folder: Path, series_uid: str) -> dict[tuple[str, int | None], np.ndarray]:
    """ImagePositionPatient of every source instance (and frame, for multi-frame files)."""
    positions: dict[tuple[str, int | None], np.ndarray] = {}
    for path in series_files(folder, series_uid=series_uid):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                ipp = item.PlanePositionSequence[0].ImagePositionPatient
                positions[(ds.SOPInstanceUID, n)] = np.array(ipp, dtype=float)
        else:
            positions[(ds.SOPInstanceUID, None)] = np.array(ds.ImagePositionPatient, dtype=float)
    return positions


def overlaid_segments(
    seg: Dataset, labels: sitk.Image, sources: dict[tuple[str, int | None], np.ndarray]
) -> dict[int, np.ndarray]:
    """Rebuild each segment as a (k, j, i) volume by following frames to their sources."""
    volumes = {s.label: np.zeros(labels.GetSize()[::-1], dtype=np.uint8) for s in TUMOUR_SEGMENTS}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    seen = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        [source] = item.DerivationImageSequence[0].SourceImageSequence
        position = sources[(source.ReferencedSOPInstanceUID, source.get("ReferencedFrameNumber"))]
        # The frame sits where its source does...
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, position, atol=1e-4)
        # ...and that is the corner of one slice of the label map.
        i, j, k = labels.TransformPhysicalPointToContinuousIndex(position.tolist())
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert (number, round(k)) not in seen, "two frames for one slice of one segment"
        seen.add((number, round(k)))
        volumes[number][round(k)] = frame
    return volumes


def check_overlay(
    path: Path, labels: sitk.Image, folder: Path, series_uid: str
) -> dict[int, np.ndarray]:
    """Assert the SEG at ``path`` reproduces ``labels`` on the source slices; its volumes."""
    seg = pydicom.dcmread(path)
    volumes = overlaid_segments(seg, labels, source_positions(folder, series_uid))
    expected = sitk.GetArrayFromImage(labels)
    for number, volume in volumes.items():
        assert np.array_equal(volume, expected == number), f"segment {number} is misplaced"
    return volumes


def test_dicom_seg_of_a_synthetic_study_overlays_the_source_slices(tmp_path: Path) -> None:
    # Prepare
    uid, labels = write_synthetic_study(tmp_path / "p007", study_affine())
    sources = [pydicom.dcmread(p) for p in series_files(tmp_path / "p007", series_uid=uid)]
    # Execute
    path = write_dicom_seg(
        labels, tmp_path / "p007", tmp_path / "out" / "seg.dcm", series_uid=uid,
        algorithm_version="0.1.0+model-abc",
    )  # fmt: skip
    # Assert
    assert path == tmp_path / "out" / "seg.dcm"
    volumes = check_overlay(path, labels, tmp_path / "p007", uid)
    assert all(volume.any() for volume in volumes.values())
    ds = pydicom.dcmread(path)
    assert (ds.SOPClassUID, ds.Modality, ds.SegmentationType) == (
        SegmentationStorage,
        "SEG",
        "BINARY",
    )
    first = sources[0]
    for keyword in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "FrameOfReferenceUID",
    ):
        assert ds[keyword].value == first[keyword].value, keyword
    assert (ds.SeriesNumber, ds.SeriesDescription) == (300, "fedseg tumour segmentation")
    assert ds.SeriesInstanceUID != uid and ds.Manufacturer == "fedseg"
    [referenced] = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == uid
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2, 3)] == ["NETC", "SNFH", "ET"]
    assert "oedema" in segments[2].SegmentDescription
    assert [segments[n].SegmentedPropertyTypeCodeSequence[0].CodeValue for n in (1, 2, 3)] == [
        "6574001", "79654002", "C113842",
    ]  # fmt: skip
    for segment in segments.values():
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            "fedseg",
            "0.1.0+model-abc",
        )
    # highdicom reads it back the same way: per source instance, by geometry-sorted uid.
    read = hd.seg.segread(path)
    assert read.segment_numbers == [1, 2, 3]
    image = read_series(tmp_path / "p007", series_uid=uid)
    by_slice = sorted(
        sources,
        key=lambda s: image.TransformPhysicalPointToIndex(
            [float(v) for v in s.ImagePositionPatient]
        )[2],
    )
    masks = read.get_pixels_by_source_instance([s.SOPInstanceUID for s in by_slice])
    expected = sitk.GetArrayFromImage(labels)
    for n in (1, 2, 3):
        assert np.array_equal(masks[..., n - 1], expected == n)


@pytest.mark.parametrize(
    "layout", ["study-oblique", "oblique-reversed", "flipped-shuffled", "enhanced"]
)
def test_dicom_seg_overlays_oblique_and_reordered_series(tmp_path: Path, layout: str) -> None:
    # Prepare: files whose order on disk says nothing (or the opposite) about slice order.
    folder = tmp_path / "series"
    if layout == "study-oblique":  # instances numbered from the top slice down
        uid, labels = write_synthetic_study(folder, study_affine(_rotation(12.0, -20.0, 35.0)))
    else:
        if layout == "enhanced":  # one multi-frame file, frames shuffled, oblique
            write_enhanced(folder / "enhanced.dcm")
            ds = pydicom.dcmread(folder / "enhanced.dcm")
            ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
            ds.save_as(folder / "enhanced.dcm")
        else:
            orientation = ORIENTATIONS[
                "oblique" if layout == "oblique-reversed" else "axial-flipped"
            ]
            positions = slice_positions(8, orientation)
            write_series(
                folder, orientation=orientation, extra={"FrameOfReferenceUID": FRAME_OF_REFERENCE},
                positions=positions[::-1] if layout == "oblique-reversed" else positions,
                shuffle=5 if layout == "flipped-shuffled" else None,
            )  # fmt: skip
        [info] = list_series(folder)
        uid, reference = info.uid, read_series(folder)
        labels = on_grid(tumour(reference.GetSize()), reference)
    # Execute
    path = write_dicom_seg(
        labels, folder, tmp_path / "seg.dcm", series_uid=uid, algorithm_version="1"
    )
    # Assert
    volumes = check_overlay(path, labels, folder, uid)
    assert all(volume.any() for volume in volumes.values())


def test_dicom_seg_of_a_real_ge_series(tmp_path: Path) -> None:
    # Prepare: pydicom's own dicomdirtests (no pydicom-data needed); a real 5-slice GE CT
    # (pydicom and pydicom-data ship no multi-slice MR series that stacks).
    folder = Path(str(get_testdata_file("DICOMDIR", download=False))).parent / "98892001" / "CT5N"
    [info] = list_series(folder)
    reference = read_series(folder)
    labels = on_grid(tumour(reference.GetSize()), reference)
    # Execute
    path = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", algorithm_version="1")
    # Assert
    check_overlay(path, labels, folder, info.uid)
    source = pydicom.dcmread(series_files(folder, series_uid=info.uid)[0], stop_before_pixels=True)
    ds = pydicom.dcmread(path)
    assert (ds.PatientName, ds.StudyInstanceUID) == (source.PatientName, source.StudyInstanceUID)


def test_dicom_seg_lists_all_three_segments_when_some_are_absent(tmp_path: Path) -> None:
    write_series(tmp_path / "s", extra={"FrameOfReferenceUID": FRAME_OF_REFERENCE})
    reference = read_series(tmp_path / "s")
    only_oedema = tumour(reference.GetSize())
    only_oedema[only_oedema != 2] = 0
    for name, values in (("oedema", only_oedema), ("empty", np.zeros_like(only_oedema))):
        labels = on_grid(values, reference)
        path = write_dicom_seg(
            labels, tmp_path / "s", tmp_path / f"{name}.dcm", algorithm_version="1"
        )
        read = hd.seg.segread(path)
        assert read.segment_numbers == [1, 2, 3]
        assert [read.get_segment_description(n).segment_label for n in (1, 2, 3)] == [
            "NETC", "SNFH", "ET",
        ]  # fmt: skip
        check_overlay(path, labels, tmp_path / "s", list_series(tmp_path / "s")[0].uid)
    # Frames holding none of a segment are left out: the oedema SEG has oedema frames only.
    frames = pydicom.dcmread(tmp_path / "oedema.dcm").PerFrameFunctionalGroupsSequence
    assert {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in frames} == {2}
    assert len(frames) == int(np.any(only_oedema == 2, axis=(0, 1)).sum())


def test_dicom_seg_takes_orientations_rounded_differently_per_file(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", extra={"FrameOfReferenceUID": FRAME_OF_REFERENCE})
    ds = pydicom.dcmread(paths[3])
    ds.ImageOrientationPatient = ["0.99999999", "0.00001", "0", "0", "1", "0.00002"]
    ds.save_as(paths[3])  # the same orientation to 1e-4, as read_series takes it
    reference = read_series(tmp_path / "s")
    labels = on_grid(tumour(reference.GetSize()), reference)
    path = write_dicom_seg(labels, tmp_path / "s", tmp_path / "seg.dcm", algorithm_version="1")
    check_overlay(path, labels, tmp_path / "s", list_series(tmp_path / "s")[0].uid)


def _resampled(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    size = [
        round(n * s / t)
        for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)
    ]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(), spacing,
        image.GetDirection(), 0, image.GetPixelID(),
    )  # fmt: skip


def _shifted(image: sitk.Image) -> sitk.Image:
    moved = sitk.Image(image)
    moved.SetOrigin([v + 1.0 for v in image.GetOrigin()])
    return moved


def _turned(image: sitk.Image) -> sitk.Image:
    turned = sitk.Image(image)  # rows and columns reversed about the same origin
    turned.SetDirection((np.reshape(image.GetDirection(), (3, 3)) @ np.diag([-1, -1, 1])).ravel())
    return turned


def _same_size_other_spacing(image: sitk.Image) -> sitk.Image:
    other = sitk.Image(image)
    other.SetSpacing([s * 1.01 for s in image.GetSpacing()])
    return other


def _with_label_4(image: sitk.Image) -> sitk.Image:
    values = sitk.GetArrayFromImage(image)
    values[values == 3] = 4  # BraTS 2021's ET, not mapped onto the canonical scheme
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda im: _resampled(im, (1.0, 1.0, 1.0)), "size"),
        (_same_size_other_spacing, "spacing"),
        (_shifted, "origin"),
        (_turned, "direction"),
        (_with_label_4, "values [4]"),
    ],
)
def test_dicom_seg_refuses_a_label_map_off_the_series_grid(
    tmp_path: Path, change: object, words: str
) -> None:
    write_series(tmp_path / "s", extra={"FrameOfReferenceUID": FRAME_OF_REFERENCE})
    reference = read_series(tmp_path / "s")
    labels = change(on_grid(tumour(reference.GetSize()), reference))  # type: ignore[operator]
    with pytest.raises(DataError) as info:
        write_dicom_seg(labels, tmp_path / "s", tmp_path / "seg.dcm", algorithm_version="1")
    text = str(info.value)
    assert text.startswith(str(tmp_path / "s")) and words in text and "\n" not in text
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_refuses_a_source_without_frame_of_reference(tmp_path: Path) -> None:
    write_series(tmp_path / "s")  # the test writer leaves FrameOfReferenceUID out
    reference = read_series(tmp_path / "s")
    with pytest.raises(DataError, match="no FrameOfReferenceUID"):
        write_dicom_seg(
            on_grid(tumour(reference.GetSize()), reference), tmp_path / "s", tmp_path / "seg.dcm",
            algorithm_version="1",
        )  # fmt: skip
