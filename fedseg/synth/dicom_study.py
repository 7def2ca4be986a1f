"""Write a rendered case as a DICOM MR study, the way a PACS export hands it over.

One patient folder per case holds one series folder per sequence,
``<series-number>_<description-slug>/IM_0001.dcm ...`` (one MR Image Storage file per
slice, explicit VR little endian), a three-plane localiser series that a reader must
ignore, and the label map as ``seg.nii.gz`` on the T1 series' grid.  Geometry follows
DICOM's LPS patient frame: ImagePositionPatient is the centre of each slice's first
pixel, ImageOrientationPatient holds the row then column direction cosines, and
PixelSpacing is [between rows, between columns].  Instances are numbered from the top
slice down, as many scanners do, so a reader must order slices by position.  Stored
values are the image values plus :data:`STORED_OFFSET`, undone by RescaleIntercept, so a
reader that ignores the rescale is caught.  UIDs are derived from ``uid_root`` (the
federation seed, site and case), so the same seed gives the same study.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from fedseg.synth.render import RenderedCase, nifti_image

#: Stored pixel = value + STORED_OFFSET; RescaleIntercept = -STORED_OFFSET undoes it.
STORED_OFFSET = 100
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_FIRST_STUDY_DATE = dt.date(2024, 1, 8)


@dataclass(frozen=True)
class SeriesSpec:
    """One acquired series: what it shows and the protocol a scanner would record."""

    modality: str  # canonical name, or "" for the localiser
    number: int
    description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    repetition_time: float  # ms
    echo_time: float  # ms
    inversion_time: float | None = None  # ms
    flip_angle: float = 90.0
    echo_train_length: int = 1
    contrast_agent: str | None = None

    @property
    def folder(self) -> str:
        """Series folder name, e.g. ``5_ax_t1_post_gad``."""
        return f"{self.number}_{re.sub(r'[^a-z0-9]+', '_', self.description.lower()).strip('_')}"


LOCALISER = SeriesSpec("", 1, "3 PLANE LOC", ("GR",), ("SS",), 8.6, 1.6, flip_angle=30.0)
# A 1.5 T brain-tumour protocol; post-contrast T1 comes last, after the injection.
SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("t1n", 2, "AX T1 SE", ("SE",), ("NONE",), 520.0, 12.0),
    SeriesSpec("t2w", 3, "AX T2 FSE", ("SE",), ("SK",), 4200.0, 102.0, echo_train_length=16),
    SeriesSpec("t2f", 4, "AX T2 FLAIR", ("SE", "IR"), ("SK",), 9000.0, 122.0, 2500.0, 90.0, 24),
    SeriesSpec(
        "t1c", 5, "AX T1 POST GAD", ("SE",), ("NONE",), 520.0, 12.0, contrast_agent="GADOLINIUM"
    ),
)
SERIES_OF_MODALITY = {s.modality: s for s in SERIES}


@dataclass(frozen=True)
class _Plane:
    """A 2D image in the LPS patient frame: pixels (rows, columns) and where they lie."""

    pixels: NDArray[np.int16]
    position: NDArray[np.float64]  # centre of the first pixel (mm, LPS)
    row_direction: NDArray[np.float64]  # along a row (increasing column index)
    column_direction: NDArray[np.float64]  # down a column (increasing row index)
    spacing: tuple[float, float]  # (between rows, between columns) as PixelSpacing


def write_study(
    case: RenderedCase, patient_dir: Path, *, patient_id: str, uid_root: str, institution: str
) -> None:
    """Write ``case`` as one study in ``patient_dir`` (created), plus ``seg.nii.gz``.

    Parameters
    ----------
    case
        The rendered case; its affine gives every series' geometry.
    patient_dir
        The patient folder to create.
    patient_id
        PatientID; PatientName is ``SYNTHETIC^<patient_id>``.
    uid_root
        Entropy for every UID of the study (same root, same UIDs).
    institution
        InstitutionName.
    """
    patient_dir.mkdir(parents=True)
    study = _study(case, patient_id=patient_id, uid_root=uid_root, institution=institution)
    _write_series(
        study, LOCALISER, _localiser_planes(case.images["t1n"], case.affine), patient_dir, uid_root
    )
    for spec in SERIES:
        planes = _axial_planes(case.images[spec.modality], case.affine)
        _write_series(study, spec, planes, patient_dir, uid_root)
    nib.save(nifti_image(case.seg, case.affine), patient_dir / "seg.nii.gz")


def _study(case: RenderedCase, *, patient_id: str, uid_root: str, institution: str) -> Dataset:
    """Patient, study and equipment attributes shared by every image of the study."""
    ds = Dataset()
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_root, "study"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[uid_root, "frame-of-reference"])
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    digits = re.sub(r"\D", "", patient_id) or "0"
    ds.StudyDate = (_FIRST_STUDY_DATE + dt.timedelta(days=int(digits) % 365)).strftime("%Y%m%d")
    ds.StudyTime = "083000"
    ds.StudyDescription = "MRI BRAIN TUMOUR PROTOCOL (SYNTHETIC)"
    ds.Modality = "MR"
    ds.Manufacturer = "fedseg synthetic scanner"
    ds.ManufacturerModelName = "PHANTOM 1.5T"
    ds.InstitutionName = institution
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    return ds


def _lps(affine: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Voxel -> LPS mm: the 3x3 linear part and the position of voxel (0, 0, 0).

    The affine is first rounded to float32, as ``seg.nii.gz`` stores it, so the label
    map and the series share one grid to ~1e-12 mm (ITK refuses grids 2e-6 mm apart);
    positions then read like a Siemens header's (``99.4500045776367``).
    """
    stored = affine.astype(np.float32).astype(np.float64)
    return _LPS_FROM_RAS @ stored[:3, :3], _LPS_FROM_RAS @ stored[:3, 3]


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (and no negative zero)."""
    return format_number_as_ds(float(value) + 0.0)


def _plane(
    pixels: NDArray[np.int16],
    linear: NDArray[np.float64],
    origin: NDArray[np.float64],
    corner: Sequence[int],
    axes: tuple[int, int],
) -> _Plane:
    """The plane through voxel ``corner`` spanned by array ``axes`` (columns, rows)."""
    cols, rows = linear[:, axes[0]], linear[:, axes[1]]
    return _Plane(
        pixels=np.ascontiguousarray(pixels),
        position=origin + linear @ np.asarray(corner, dtype=np.float64),
        row_direction=cols / np.linalg.norm(cols),
        column_direction=rows / np.linalg.norm(rows),
        spacing=(float(np.linalg.norm(rows)), float(np.linalg.norm(cols))),
    )


def _axial_planes(volume: NDArray[np.int16], affine: NDArray[np.float64]) -> list[_Plane]:
    """One plane per slice along the third array axis, the top (most superior) first."""
    linear, origin = _lps(affine)
    planes = [
        _plane(volume[:, :, k].T, linear, origin, (0, 0, k), (0, 1)) for k in range(volume.shape[2])
    ]
    return sorted(planes, key=lambda p: -float(p.position[2]))


def _localiser_planes(volume: NDArray[np.int16], affine: NDArray[np.float64]) -> list[_Plane]:
    """Three orthogonal planes through the middle of the volume (axial, sagittal, coronal)."""
    linear, origin = _lps(affine)
    mid = [n // 2 for n in volume.shape]
    return [
        _plane(volume[:, :, mid[2]].T, linear, origin, (0, 0, mid[2]), (0, 1)),
        _plane(volume[mid[0], :, :].T, linear, origin, (mid[0], 0, 0), (1, 2)),
        _plane(volume[:, mid[1], :].T, linear, origin, (0, mid[1], 0), (0, 2)),
    ]


def _write_series(
    study: Dataset, spec: SeriesSpec, planes: list[_Plane], patient_dir: Path, uid_root: str
) -> None:
    """Write one file per plane into ``patient_dir / spec.folder``."""
    folder = patient_dir / spec.folder
    folder.mkdir()
    encoder = _SeriesEncoder(_series(study, spec, planes, uid_root))
    normal = np.cross(planes[0].row_direction, planes[0].column_direction)
    for index, plane in enumerate(planes, start=1):
        image = Dataset()
        image.SOPInstanceUID = generate_uid(
            entropy_srcs=[uid_root, "image", str(spec.number), str(index)]
        )
        image.InstanceNumber = index
        image.ImagePositionPatient = [_ds(v) for v in plane.position]
        image.ImageOrientationPatient = [
            _ds(v) for v in (*plane.row_direction, *plane.column_direction)
        ]
        image.PixelSpacing = [_ds(s) for s in plane.spacing]
        image.SliceLocation = _ds(float(plane.position @ normal))
        image.Rows, image.Columns = plane.pixels.shape
        stored = plane.pixels.astype(np.int32) + STORED_OFFSET
        image.add_new("PixelData", "OW", stored.astype("<u2").tobytes())
        (folder / f"IM_{index:04d}.dcm").write_bytes(encoder.encode(image))


class _SeriesEncoder:
    """Encode a series' files fast: the attributes all images share are encoded once.

    pydicom spends ~10 ms per file walking ~70 elements; here the shared ones are kept
    as pre-encoded runs and only an image's own elements are encoded, in tag order.
    """

    def __init__(self, shared: Dataset) -> None:
        self._shared = shared
        self._runs: dict[int, bytes] = {}  # first per-image tag after the run (-1: the end)
        self._own: tuple[int, ...] = ()

    def encode(self, image: Dataset) -> bytes:
        """The bytes of a DICOM file (preamble, file meta, shared + own elements)."""
        own = tuple(sorted(int(elem.tag) for elem in image))
        if own != self._own:
            self._own, self._runs = own, self._split(own)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self._shared.SOPClassUID
        meta.MediaStorageSOPInstanceUID = image.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        buffer = _buffer()
        buffer.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(buffer, meta, enforce_standard=True)
        for tag in own:
            buffer.write(self._runs.get(tag, b""))
            write_data_element(buffer, image[tag])
        buffer.write(self._runs.get(-1, b""))
        return bytes(buffer.getvalue())

    def _split(self, own: tuple[int, ...]) -> dict[int, bytes]:
        """Encode the shared elements between consecutive per-image tags."""
        runs: dict[int, bytes] = {}
        bounds = [*own, -1]
        for low, high in zip([-1, *own], bounds, strict=True):
            run = _buffer()
            for elem in self._shared:
                if int(elem.tag) > low and (high == -1 or int(elem.tag) < high):
                    write_data_element(run, elem)
            runs[high] = bytes(run.getvalue())
        return runs


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    return buffer


def _series(study: Dataset, spec: SeriesSpec, planes: list[_Plane], uid_root: str) -> Dataset:
    """The attributes every image of one series shares."""
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_root, "series", str(spec.number)])
    ds.SeriesNumber = spec.number
    ds.SeriesDescription = ds.ProtocolName = spec.description
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.StudyDate
    ds.SeriesTime = f"08{30 + 4 * spec.number:02d}00"  # one sequence every few minutes
    localiser = spec is LOCALISER
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localiser else "M", "ND"]
    ds.ScanningSequence = list(spec.scanning_sequence)
    ds.SequenceVariant = list(spec.sequence_variant)
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime = spec.repetition_time, spec.echo_time
    if spec.inversion_time is not None:
        ds.InversionTime = spec.inversion_time
    ds.FlipAngle = spec.flip_angle
    ds.EchoTrainLength = spec.echo_train_length
    ds.NumberOfAverages = 1
    if spec.contrast_agent is not None:
        ds.ContrastBolusAgent = spec.contrast_agent
    thickness = 5.0 if localiser else float(np.linalg.norm(planes[1].position - planes[0].position))
    ds.SliceThickness = _ds(thickness)
    if not localiser:
        ds.SpacingBetweenSlices = _ds(thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -STORED_OFFSET, 1, "US"
    values = np.concatenate([p.pixels.ravel() for p in planes])
    low, high = np.percentile(values, [1.0, 99.0])
    ds.WindowCenter, ds.WindowWidth = round((low + high) / 2), max(1, round(high - low))
    return ds
