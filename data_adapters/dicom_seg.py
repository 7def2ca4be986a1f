"""Write a predicted tumour label map as a DICOM Segmentation that overlays its source series.

A clinician opens fedseg's predictions in a PACS viewer or 3D Slicer next to the MR series
they were made from.  :func:`write_dicom_seg` turns a canonical label map (0 background,
1 NETC, 2 SNFH, 3 ET) that lies on the grid of a DICOM series, as
:func:`data_adapters.dicom.read_series` reads it, into one BINARY Segmentation instance
(highdicom builds it) with one segment per tumour label.  Patient and study attributes are
copied from the source images, so the viewer files it under the right study.

Overlay is what matters: each frame of the segmentation references the source instance it was
drawn on (DerivationImageSequence) and carries that instance's ImagePositionPatient.  The
slice of the label map a source instance gets is found from geometry, never from file order:
the instance's position is put into the label map's index space (origin, direction, spacing),
and it must land on a slice of the grid, within :data:`POSITION_TOLERANCE_MM` in every
direction.  SimpleITK's array is (k, j, i) = (slice, row, column) in LPS world, the same
axes a DICOM frame (rows x columns) has once the label map is on the series grid, so a slice
of the array is a frame as it stands.

Segments: all three canonical labels are always described, present or not, so a reader sees
"no enhancing tumour" rather than a missing segment.  Frames that hold no pixel of a segment
are left out (highdicom's ``omit_empty_frames``); an absent label is a segment with no frames,
which highdicom writes and reads back.  A label map without any tumour still writes (then
highdicom keeps the empty frames, as a segmentation needs at least one).

Coded concepts, from DICOM's CID 7168 "Brain Lesion Segmentation Type With Necrosis":
NETC is SCT 6574001 "Necrosis" (BraTS 2023 merges necrosis and non-enhancing core into
label 1; CID 7168 has NCIt C81175 "Non-Enhancing Lesion" too, which fits only half of it),
SNFH is SCT 79654002 "Edema" (CID 7169's note: the generic edema concept, not "peritumoral
brain edema"), ET is NCIt C113842 "Enhancing Lesion".  The category of all three is SCT
49755003 "Morphologically Abnormal Structure" (CID 7150), the anatomic region SCT 12738006
"Brain", the algorithm family DCM 123110 "Artificial Intelligence" (CID 7162).

What highdicom (0.28) asks of the source, and how it is met here: given a plain array and no
plane positions, it pairs array frame n with source image n (or frame n of one multi-frame
source) and copies that source's position and reference, so the array is put in source order
here, and highdicom sorts the written frames by position itself.  (A ``highdicom.Volume``
would make highdicom infer the pairing; the explicit pairing keeps the check in one place.)
It needs the patient and study attributes present on the first source even where DICOM
lets them be absent (filled in empty on the in-memory headers), one ImageOrientationPatient
string for all files (set to the first file's, which the stacking already found equal to
1e-4), a FrameOfReferenceUID (refused without), and, for a multi-frame source, one file
with a shared PlaneOrientationSequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from data_adapters.dicom import series_stack
from data_adapters.dicom_volume import POSITION_TOLERANCE_MM, FrameHeader, Stack
from data_adapters.errors import DataError
from data_adapters.geometry import same_grid

#: The software has no serial number, but the Enhanced General Equipment module needs one.
DEVICE_SERIAL_NUMBER = "0"
#: Patient and study attributes highdicom reads off the first source image: DICOM lets a
#: source leave them empty (type 2), but highdicom needs them present.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class TumourSegment:
    """One canonical tumour label as a segment: its number, label, meaning and colour."""

    label: int  # canonical label value, also the segment number
    name: str  # SegmentLabel, as a viewer lists it
    description: str
    property_type: Code
    rgb: tuple[int, int, int]  # recommended display colour (BraTS figures' colours)


TUMOUR_SEGMENTS: tuple[TumourSegment, ...] = (
    TumourSegment(
        1, "NETC", "necrotic / non-enhancing tumour core", codes.SCT.Necrosis, (255, 0, 0)
    ),
    TumourSegment(
        2,
        "SNFH",
        "surrounding non-enhancing FLAIR hyperintensity (oedema)",
        codes.SCT.Edema,
        (0, 255, 0),
    ),
    TumourSegment(3, "ET", "enhancing tumour", codes.NCIt.EnhancingLesion, (255, 255, 0)),
)


def write_dicom_seg(
    labels: sitk.Image,
    series_folder: Path,
    out_path: Path,
    *,
    series_uid: str | None = None,
    algorithm_name: str = "fedseg",
    algorithm_version: str,
    series_description: str = "fedseg tumour segmentation",
    series_number: int = 300,
) -> Path:
    """Write ``labels`` as a DICOM-SEG file that overlays the series it was predicted on.

    Parameters
    ----------
    labels
        Canonical label map (0 background, 1 NETC, 2 SNFH, 3 ET; any integer pixel type) on
        the grid of the source series as :func:`data_adapters.dicom.read_series` reads it:
        same size, spacing, origin and direction (LPS), as
        :func:`data_adapters.geometry.same_grid` compares grids.
    series_folder
        Folder holding the source series (searched recursively), or its one enhanced
        multi-frame file.
    out_path
        The file to write (its folder is created).
    series_uid
        The SeriesInstanceUID of the source series; may be left out when the folder holds
        one series.
    algorithm_name, algorithm_version
        Identify the algorithm in every segment (the model, its fedseg version) and the
        writing software (Manufacturer's Model Name, Software Versions).
    series_description, series_number
        Of the new segmentation series.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    DataError
        Naming the folder and the problem: the series cannot be read or stacked, ``labels``
        is not on its grid or holds a non-canonical value, a source instance lies on no
        slice of the label map, the source has no FrameOfReferenceUID (nothing to overlay
        in), or highdicom refuses the source.  An enhanced multi-frame source is handled when
        it is the series' only file and its orientation sits in the shared functional groups
        (as highdicom needs); several multi-frame files in one series are refused.
    """
    folder = Path(series_folder)
    stack = series_stack(folder, series_uid=series_uid)
    _check_grid(labels, stack, folder)
    array = _label_array(labels, folder)
    # Source order, as highdicom pairs array frames with it: files by path, frames in a file.
    frames = sorted(stack.frames, key=lambda f: (f.path, f.frame or 0))
    sources = _read_sources(frames, folder)
    slices = _slice_indices(frames, labels, folder)
    seg = _segmentation(
        sources,
        array[slices],  # frame n of the source (file order, or frame order) <- its slice
        folder,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        series_description=series_description,
        series_number=series_number,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path


def segment_descriptions(
    algorithm: hd.AlgorithmIdentificationSequence,
) -> list[hd.seg.SegmentDescription]:
    """The three canonical tumour segments, numbered as their labels, made by ``algorithm``."""
    return [_describe(segment, algorithm) for segment in TUMOUR_SEGMENTS]


def _describe(
    segment: TumourSegment, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """One segment's description: label, coded meaning, algorithm, colour."""
    description = hd.seg.SegmentDescription(
        segment_number=segment.label,
        segment_label=segment.name,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=segment.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain],
        display_color=hd.color.CIELabColor.from_rgb(*segment.rgb),
    )
    description.SegmentDescription = segment.description  # the long name, for a tooltip
    return description


def _check_grid(labels: sitk.Image, stack: Stack, folder: Path) -> None:
    """Refuse a label map that is not on the series' grid, naming what differs."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(folder, "the label map is not a 3D scalar image")
    first = stack.frames[0]
    series = sitk.Image([first.columns, first.rows, len(stack.frames)], sitk.sitkUInt8)
    series.SetOrigin(stack.origin)
    series.SetSpacing(stack.spacing)
    series.SetDirection(stack.direction)
    if same_grid(labels, series):
        return
    differences = [
        f"{what} {_mm(mine)} where the series has {_mm(theirs)}"
        for what, mine, theirs in (
            ("size", labels.GetSize(), series.GetSize()),
            ("spacing", labels.GetSpacing(), series.GetSpacing()),
            ("origin", labels.GetOrigin(), series.GetOrigin()),
            ("direction", labels.GetDirection(), series.GetDirection()),
        )
        if len(mine) != len(theirs) or not np.allclose(mine, theirs, rtol=0.0, atol=1e-6)
    ]
    raise DataError(
        folder,
        "the label map is not on the series grid (resampled, cropped or reoriented?): "
        + "; ".join(differences),
    )


def _mm(values: Sequence[float]) -> str:
    """Numbers as a message shows them: a few significant digits each."""
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _label_array(labels: sitk.Image, folder: Path) -> npt.NDArray[np.uint8]:
    """The label map as a uint8 (k, j, i) array, refusing values outside the canonical ones."""
    array = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(folder, f"the label map has {array.dtype} pixels, not integer labels")
    found = np.unique(array)
    unknown = sorted(set(found.tolist()) - {0, *(s.label for s in TUMOUR_SEGMENTS)})
    if unknown:
        raise DataError(
            folder,
            f"the label map holds values {unknown} outside the canonical labels 0-3"
            " (map site labels onto the canonical scheme first)",
        )
    return array.astype(np.uint8)


def _read_sources(frames: Sequence[FrameHeader], folder: Path) -> list[Dataset]:
    """The headers (no pixels) of the files ``frames`` come from, in their order, for highdicom."""
    sources = [_read_header(path) for path in dict.fromkeys(frame.path for frame in frames)]
    if len(sources) > 1 and any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in sources):
        raise DataError(
            folder,
            f"the series spreads over {len(sources)} multi-frame files; a segmentation can"
            " reference one multi-frame source (or single-frame files)",
        )
    # highdicom wants one ImageOrientationPatient string for all files; scanners round the
    # cosines differently per file, and series_stack already took them as one orientation.
    shared = sources[0].get("ImageOrientationPatient")
    for ds in sources[1:]:
        if shared is not None and "ImageOrientationPatient" in ds:
            ds.ImageOrientationPatient = shared
    return sources


def _read_header(path: Path) -> Dataset:
    """One source file's header, with the empty type 2 attributes highdicom needs present."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd value, as in discovery
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "FrameOfReferenceUID" not in ds:
        raise DataError(path, "no FrameOfReferenceUID: no frame to place a segmentation in")
    for keyword in _TYPE2_SOURCE_ATTRIBUTES:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _slice_indices(frames: Sequence[FrameHeader], labels: sitk.Image, folder: Path) -> list[int]:
    """For each source frame, the label-map slice it lies on, from its position alone.

    Raises
    ------
    DataError
        If a frame lies off every slice, or two frames on one.
    """
    origin = np.asarray(labels.GetOrigin())
    direction = np.asarray(labels.GetDirection()).reshape(3, 3)
    step = labels.GetSpacing()[2]
    n_slices = labels.GetSize()[2]
    indices = []
    for frame in frames:
        # The direction is orthonormal: its transpose takes LPS offsets onto the grid axes.
        along = direction.T @ (np.asarray(frame.position) - origin)
        k = round(float(along[2]) / step)
        miss = np.abs(along - (0.0, 0.0, k * step)).max()
        if not 0 <= k < n_slices or miss > POSITION_TOLERANCE_MM:
            raise DataError(
                folder,
                f"{frame.name(folder)} at {_mm(frame.position or ())} lies on no slice of the"
                f" label map (nearest: {k}, {miss:.3g} mm off)",
            )
        indices.append(k)
    if sorted(indices) != list(range(n_slices)):
        raise DataError(folder, "source frames and label map slices do not pair one to one")
    return indices


def _segmentation(
    sources: Sequence[Dataset],
    frames: npt.NDArray[np.uint8],
    folder: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str,
    series_number: int,
) -> hd.seg.Segmentation:
    """Build the Segmentation; ``frames[n]`` pairs with source frame n (highdicom's contract)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,  # label-map style: pixel value = segment number
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(algorithm),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedseg",
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label="FEDSEG",
            content_description=series_description,
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError) as err:  # highdicom's refusals
        raise DataError(folder, f"cannot build a DICOM-SEG on this series ({err})") from err
