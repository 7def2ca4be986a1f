"""Turn the frames of one DICOM series into a 3D image: geometry checks, decoding, stacking.

The volume is built from the headers, not left to a library's guesses: frames are ordered by
ImagePositionPatient projected on the slice normal (the cross product of the two
ImageOrientationPatient rows); the slice spacing comes from those positions (never from
SpacingBetweenSlices or SliceThickness, which vendors fill inconsistently); the origin is the
first frame's position; the direction's columns are the row direction, the column direction
and the normal.  So the LPS position of voxel (i, j, k) is::

    IPP[k] + i * PixelSpacing[1] * IOP[0:3] + j * PixelSpacing[0] * IOP[3:6]

(DICOM's PixelSpacing is [row spacing, column spacing]: the step between rows, then between
columns).  A stack that no regular grid can hold without resampling is refused with a
:class:`DataError`: missing or unevenly spaced slices, non-parallel frames (a 3-plane
localiser, a radial series), two frames in one plane (echoes or time points mixed into one
series), a single slice, positions drifting off the normal by more than 0.1 mm (gantry tilt).

Pixels are decoded by pydicom; compressed transfer syntaxes need a decoder plugin
(python-gdcm covers JPEG baseline/lossless, JPEG-LS, JPEG 2000 and RLE; pylibjpeg works too).
A single-frame file that no plugin decodes (12-bit JPEG extended, say) falls back to the GDCM
built into SimpleITK.  RescaleSlope/RescaleIntercept are applied per frame; the result is an
integer image when that is exact, float32 otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from data_adapters.errors import DataError

#: How far (mm) a frame may sit from where the regular grid puts it.
POSITION_TOLERANCE_MM = 0.1
#: How far a slice step may differ from the median step, as a fraction of it.
SPACING_TOLERANCE = 0.01
#: Largest difference between direction cosines still taken as "the same orientation".
ORIENTATION_TOLERANCE = 1e-4

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class FrameHeader:
    """What the stacking needs to know about one 2D frame (a file, or one frame of a file)."""

    path: Path
    frame: int | None  # index in a multi-frame file; None for a single-frame file
    position: Vec3 | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slope: float
    intercept: float
    note: str = ""  # why the geometry is missing, when the header says more than "absent"

    def name(self, root: Path) -> str:
        """The frame as messages name it: its path under ``root``, plus the frame number."""
        try:
            text = self.path.relative_to(root).as_posix() or self.path.name
        except ValueError:
            text = self.path.name
        return text if self.frame is None else f"{text} frame {self.frame + 1}"


@dataclass(frozen=True)
class Stack:
    """A checked regular grid: frames in slice order and the SimpleITK geometry."""

    frames: tuple[FrameHeader, ...]
    origin: Vec3
    spacing: Vec3
    direction: tuple[float, ...]


def frame_headers(ds: Dataset, path: Path) -> list[FrameHeader]:
    """The image frames a dataset read without pixels holds (none for a non-image object)."""
    if "Rows" not in ds or "Columns" not in ds:
        return []
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        # A multi-frame file without per-frame groups gives one position for many frames:
        # stacking them would be a guess, so its frame has no position and is refused.
        return [_frame(ds, Dataset(), path, None, rows, columns, multi=n_frames > 1)]
    if len(per_frame) != n_frames:
        raise DataError(path, f"{len(per_frame)} per-frame functional groups for {n_frames} frames")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else Dataset()
    return [
        _frame(ds, _merged(shared, item), path, index, rows, columns)
        for index, item in enumerate(per_frame)
    ]


def _merged(shared: Dataset, per_frame: Dataset) -> Dataset:
    """One frame's functional groups: the shared ones overridden by its own."""
    merged = Dataset()
    for element in shared:
        merged.add(element)
    for element in per_frame:
        merged.add(element)
    return merged


def _item(groups: Dataset, keyword: str) -> Dataset:
    """The first item of a functional-group macro, or an empty dataset."""
    sequence = groups.get(keyword)
    return sequence[0] if sequence else Dataset()


def _frame(
    ds: Dataset,
    groups: Dataset,
    path: Path,
    index: int | None,
    rows: int,
    columns: int,
    *,
    multi: bool = False,
) -> FrameHeader:
    """Read one frame's geometry and rescale from the functional groups or the top level."""
    if index is None:  # classic image: the attributes sit at the top level
        position = None if multi else ds.get("ImagePositionPatient")  # see frame_headers
        orientation = ds.get("ImageOrientationPatient")
        spacing = ds.get("PixelSpacing")
        transform = ds
    else:
        position = _item(groups, "PlanePositionSequence").get("ImagePositionPatient")
        orientation = _item(groups, "PlaneOrientationSequence").get("ImageOrientationPatient")
        spacing = _item(groups, "PixelMeasuresSequence").get("PixelSpacing")
        transform = _item(groups, "PixelValueTransformationSequence")
    slope = transform.get("RescaleSlope")
    intercept = transform.get("RescaleIntercept")
    return FrameHeader(
        path=path,
        frame=index,
        position=_floats(position, 3),  # type: ignore[arg-type]
        orientation=_floats(orientation, 6),
        pixel_spacing=_floats(spacing, 2),  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
        note="multi-frame file without per-frame functional groups" if multi else "",
    )


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """A multi-valued DS attribute as floats, or None when absent or malformed."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def plan_stack(frames: Sequence[FrameHeader], folder: Path) -> Stack:
    """Order ``frames`` into a regular grid, or refuse with the reason.

    Raises
    ------
    DataError
        Naming ``folder`` (or the file at fault) and what keeps the frames off one grid.
    """
    _check_headers(frames, folder)
    row_dir, col_dir, normal = _axes(frames, folder)
    if len(frames) < 2:
        raise DataError(folder, "only one slice (a volume needs at least two)")
    heights = np.array([np.dot(f.position, normal) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(heights, kind="stable")
    ordered = [frames[i] for i in order]
    steps = np.diff(heights[order])
    _check_steps(ordered, steps, folder)
    slice_spacing = float((heights[order[-1]] - heights[order[0]]) / (len(frames) - 1))
    origin = np.asarray(ordered[0].position)
    expected = origin + np.outer(np.arange(len(frames)) * slice_spacing, normal)
    drift = np.linalg.norm(np.array([f.position for f in ordered]) - expected, axis=1)
    if drift.max() > POSITION_TOLERANCE_MM:
        worst = ordered[int(drift.argmax())].name(folder)
        raise DataError(
            folder,
            f"slice positions leave the slice normal by up to {drift.max():.2f} mm (at {worst}):"
            " gantry tilt or a sheared stack, which no grid holds without resampling",
        )
    row_spacing, col_spacing = frames[0].pixel_spacing  # type: ignore[misc]
    direction = np.column_stack([row_dir, col_dir, normal])
    return Stack(
        frames=tuple(ordered),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        # Along i (the row direction) voxels are a column spacing apart, along j a row spacing.
        spacing=(float(col_spacing), float(row_spacing), slice_spacing),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _check_headers(frames: Sequence[FrameHeader], folder: Path) -> None:
    """Every frame has geometry, and all share one size and pixel spacing."""
    if not frames:
        raise DataError(folder, "the series holds no image frames")
    for frame in frames:
        for value, what in (
            (frame.position, "ImagePositionPatient"),
            (frame.orientation, "ImageOrientationPatient"),
            (frame.pixel_spacing, "PixelSpacing"),
        ):
            if value is None:
                where = "" if frame.frame is None else f" for frame {frame.frame + 1}"
                why = f" ({frame.note})" if frame.note else ""
                raise DataError(frame.path, f"no usable {what}{where}{why}")
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise DataError(
                folder,
                f"inconsistent image size: {first.name(folder)} has {first.rows}x{first.columns}"
                f" (rows x columns), {frame.name(folder)} has {frame.rows}x{frame.columns}",
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):  # type: ignore[arg-type]
            raise DataError(
                folder,
                f"inconsistent PixelSpacing: {first.name(folder)} has {first.pixel_spacing},"
                f" {frame.name(folder)} has {frame.pixel_spacing}",
            )


def _axes(
    frames: Sequence[FrameHeader], folder: Path
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The row direction, column direction and slice normal shared by all frames."""
    first = np.asarray(frames[0].orientation)
    distinct = [first]
    for frame in frames[1:]:
        cosines = np.asarray(frame.orientation)
        if not any(np.abs(cosines - d).max() <= ORIENTATION_TOLERANCE for d in distinct):
            distinct.append(cosines)
    if len(distinct) > 1:
        raise DataError(
            folder,
            f"slices are not parallel: {len(distinct)} different ImageOrientationPatient values"
            " (mixed orientations: a multi-plane localiser, radial or reformatted series)",
        )
    row_dir, col_dir = first[:3], first[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise DataError(
            frames[0].path, "ImageOrientationPatient rows are not orthogonal unit vectors"
        )
    # Headers round cosines to a few digits; make them exactly orthonormal (sub-micron change).
    row_dir = row_dir / norms[0]
    col_dir = col_dir - (col_dir @ row_dir) * row_dir
    col_dir = col_dir / np.linalg.norm(col_dir)
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _check_steps(
    ordered: Sequence[FrameHeader], steps: npt.NDArray[np.float64], folder: Path
) -> None:
    """Refuse duplicate positions, gaps and uneven slice steps."""
    flat = int(np.argmin(steps))
    if steps[flat] < 1e-3:
        a, b = ordered[flat].name(folder), ordered[flat + 1].name(folder)
        raise DataError(
            folder,
            f"duplicate slice position: {a} and {b} lie in one plane"
            " (echoes, time points or b-values mixed in one series?)",
        )
    median = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > SPACING_TOLERANCE * median:
        a, b = ordered[worst].name(folder), ordered[worst + 1].name(folder)
        step = float(steps[worst])
        if step > 1.5 * median:
            missing = round(step / median) - 1
            raise DataError(
                folder,
                f"missing slices: a {step:.3g} mm gap between {a} and {b} where slices are"
                f" {median:.3g} mm apart (about {missing} missing)",
            )
        raise DataError(
            folder,
            f"uneven slice spacing: {step:.4g} mm between {a} and {b}, median {median:.4g} mm"
            f" (more than {SPACING_TOLERANCE:.0%} off)",
        )


def decode_file(path: Path) -> tuple[npt.NDArray[Any], bool]:
    """Decode a file's frames as an array (frames, rows, columns).

    Returns
    -------
    frames, rescaled
        ``rescaled`` is True when the values already went through the file's modality
        rescale (the SimpleITK fallback applies it), False for stored values.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(path, f"unreadable DICOM file ({err})") from err
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(path, "no PixelData: the file holds no image")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(path, f"colour image ({ds.get('PhotometricInterpretation')}), not MR/CT")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # pydicom logs each failing plugin; we report it once
    try:
        array = np.asarray(ds.pixel_array)
    except Exception as err:  # a missing or failing decoder plugin
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        if n_frames > 1:
            raise DataError(
                path,
                f"cannot decode {getattr(syntax, 'name', syntax)} pixel data ({err});"
                " install python-gdcm",
            ) from err
        return _decode_with_sitk(path, syntax, err), True
    finally:
        logger.setLevel(level)
    return array.reshape(n_frames, int(ds.Rows), int(ds.Columns)), False


def _decode_with_sitk(path: Path, syntax: object, cause: Exception) -> npt.NDArray[Any]:
    """Decode one single-frame file with SimpleITK's GDCM (which applies the rescale)."""
    try:
        image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
    except RuntimeError as err:
        raise DataError(
            path,
            f"cannot decode {getattr(syntax, 'name', syntax)} pixel data ({cause});"
            " install python-gdcm",
        ) from err
    array = sitk.GetArrayFromImage(image)
    return array.reshape(1, *array.shape[-2:])


def build_image(stack: Stack) -> sitk.Image:
    """Decode every file once, rescale each frame and stack them on the planned grid."""
    first = stack.frames[0]
    planes: list[npt.NDArray[Any]] = []
    multi_frame: dict[Path, tuple[npt.NDArray[Any], bool]] = {}
    for frame in stack.frames:
        pixels, rescaled = multi_frame.get(frame.path) or decode_file(frame.path)
        if pixels.shape[0] > 1:  # keep a multi-frame file's pixels for its other frames
            multi_frame[frame.path] = (pixels, rescaled)
        index = frame.frame or 0
        if index >= pixels.shape[0] or pixels.shape[1:] != (first.rows, first.columns):
            raise DataError(
                frame.path, f"pixel data of shape {pixels.shape} does not match the header"
            )
        planes.append(pixels[index] if rescaled else _rescale(pixels[index], frame))
    volume = np.stack([p.astype(_volume_dtype(planes), copy=False) for p in planes])
    image = sitk.GetImageFromArray(volume)  # (k, j, i): slice, row, column
    image.SetOrigin(stack.origin)
    image.SetSpacing(stack.spacing)
    image.SetDirection(stack.direction)
    return image


def _rescale(plane: npt.NDArray[Any], frame: FrameHeader) -> npt.NDArray[Any]:
    """Stored values to modality values; integer arithmetic where it is exact."""
    if frame.slope == 1.0 and frame.intercept == 0.0:
        return plane
    if frame.slope == 1.0 and float(frame.intercept).is_integer():
        return plane.astype(np.int32) + np.int32(frame.intercept)
    values = plane * np.float64(frame.slope) + np.float64(frame.intercept)
    if np.all(np.mod(values, 1) == 0) and np.abs(values).max() < 2**31:
        return values.astype(np.int32)
    return values.astype(np.float32)


def _volume_dtype(planes: Sequence[npt.NDArray[Any]]) -> np.dtype[Any]:
    """The smallest integer type holding every value exactly, else float32."""
    if all(np.issubdtype(p.dtype, np.integer) for p in planes):
        low = min(int(p.min()) for p in planes)
        high = max(int(p.max()) for p in planes)
        for candidate in (np.int16, np.uint16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= low and high <= info.max:
                return np.dtype(candidate)
    return np.dtype(np.float32)
