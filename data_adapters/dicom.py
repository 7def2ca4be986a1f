"""DICOM series: find them in a folder, describe them, read one as a 3D image.

A folder (searched recursively, in any sub-folder structure) may hold several series;
files are grouped by SeriesInstanceUID.  Only DICOM Part 10 files (``DICM`` at byte 128)
are considered; other files and DICOMDIR indexes are ignored.  Discovery reads headers only
(``stop_before_pixels``) and is cached per folder until a file in it changes, so listing,
fingerprinting and reading the same study folder does not parse every header each time.

:func:`read_series` builds the volume from the headers itself (see
:mod:`data_adapters.dicom_volume` for the geometry rules and what is refused).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from data_adapters.dicom_volume import (
    FrameHeader,
    Stack,
    build_image,
    frame_headers,
    plan_stack,
)
from data_adapters.errors import DataError

#: SOP class of a DICOMDIR (media storage directory): an index, not an image.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_CACHE_SIZE = 16


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder, with what helps recognise its MR contrast.

    Sequence parameters come from the series' first file (for enhanced multi-frame MR, from
    its shared or first per-frame functional groups); times are in ms, absent ones ``None``.
    """

    uid: str
    description: str
    protocol: str
    modality: str
    series_number: int | None
    n_files: int
    n_frames: int
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    contrast_agent: str
    mr_acquisition_type: str
    image_type: tuple[str, ...]
    acquisition_contrast: str
    files: tuple[Path, ...]

    def describe(self) -> str:
        """The series as an error message lists it: uid, description and size."""
        size = f"{self.n_files} file{'s' if self.n_files != 1 else ''}"
        if self.n_frames != self.n_files:
            size += f", {self.n_frames} frames"
        return f"{self.uid} '{self.description}' ({size})"


@dataclass(frozen=True)
class _FileRecord:
    """One DICOM file's header, reduced to what discovery and stacking use."""

    path: Path
    series: SeriesInfo  # as this file alone describes it
    frames: tuple[FrameHeader, ...]


_cache: dict[tuple[object, ...], tuple[_FileRecord, ...]] = {}


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (the ``DICM`` marker after the preamble)."""
    try:
        with path.open("rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def list_series(folder: Path) -> list[SeriesInfo]:
    """Every series under ``folder``, ordered by series number then description.

    Raises
    ------
    DataError
        If ``folder`` is missing or a file marked as DICOM has an unreadable header.
    """
    groups = _series(Path(folder))
    return sorted(
        (_merge(records) for records in groups.values()),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.description, s.uid),
    )


def series_files(folder: Path, *, series_uid: str) -> list[Path]:
    """The files of one series under ``folder``, sorted by path."""
    folder = Path(folder)
    groups = _series(folder)
    return [r.path for r in groups[_pick(folder, groups, series_uid)]]


def read_series(folder: Path, *, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series as a 3D image with its world geometry.

    Parameters
    ----------
    folder
        Folder holding the series (searched recursively), or one DICOM file (an enhanced
        multi-frame file is a whole series).
    series_uid
        The SeriesInstanceUID to read; may be left out only when there is one series.

    Raises
    ------
    DataError
        Naming the folder or file and the reason: no or several series, an unknown uid, a
        stack no regular grid holds, undecodable or missing pixel data.
    """
    return build_image(series_stack(folder, series_uid=series_uid))


def series_stack(folder: Path, *, series_uid: str | None = None) -> Stack:
    """The checked grid of one series, from its headers alone (what :func:`read_series` fills).

    Its frames come in slice order with their files; origin, spacing and direction are the
    ones :func:`read_series` gives the image.  Parameters and refusals are
    :func:`read_series`'s, less the pixel decoding.
    """
    folder = Path(folder)
    groups = _series(folder)
    records = groups[_pick(folder, groups, series_uid)]
    frames = [frame for record in records for frame in record.frames]
    if not frames:
        info = _merge(records)
        raise DataError(folder, f"series {info.describe()} holds no images ({info.modality})")
    return plan_stack(frames, folder)


def _pick(folder: Path, groups: dict[str, list[_FileRecord]], series_uid: str | None) -> str:
    """The uid to read, or a refusal listing the series to choose from."""
    listing = "; ".join(_merge(records).describe() for records in groups.values())
    if not groups:
        raise DataError(folder, "no DICOM files found")
    if series_uid is None:
        if len(groups) > 1:
            raise DataError(folder, f"{len(groups)} DICOM series found, pick one by uid: {listing}")
        return next(iter(groups))
    if series_uid not in groups:
        raise DataError(folder, f"no DICOM series {series_uid} (found: {listing})")
    return series_uid


def _series(path: Path) -> dict[str, list[_FileRecord]]:
    """Records of a folder (or of one file) grouped by SeriesInstanceUID."""
    if path.is_file():
        if not is_dicom_file(path):
            raise DataError(path, "not a DICOM file (no DICM marker)")
        records: Iterable[_FileRecord] = [r for r in [_read_record(path)] if r is not None]
    elif path.is_dir():
        records = _folder_records(path)
    else:
        raise DataError(path, "DICOM folder not found")
    groups: dict[str, list[_FileRecord]] = {}
    for record in records:
        groups.setdefault(record.series.uid, []).append(record)
    return groups


def _folder_records(folder: Path) -> tuple[_FileRecord, ...]:
    """Headers of every DICOM file under ``folder``; cached until a file changes."""
    files: list[tuple[Path, os.stat_result]] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(root) / name
                files.append((path, path.stat()))
    key = (str(folder.resolve()), *((str(p), s.st_size, s.st_mtime_ns) for p, s in files))
    if key not in _cache:
        found = (_read_record(p) for p, _ in files if is_dicom_file(p))
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = tuple(r for r in found if r is not None)
    return _cache[key]


def _read_record(path: Path) -> _FileRecord | None:
    """Parse one file's header; None for a DICOMDIR."""
    try:
        with warnings.catch_warnings():
            # pydicom warns about every odd value; the checks that matter raise below.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types for damaged headers
        raise DataError(path, f"unreadable DICOM header ({err})") from err
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return None
    uid = str(ds.get("SeriesInstanceUID") or "")
    if not uid:
        raise DataError(path, "no SeriesInstanceUID")
    frames = tuple(frame_headers(ds, path))
    return _FileRecord(path=path, series=_describe(ds, path, uid, len(frames)), frames=frames)


def _describe(ds: Dataset, path: Path, uid: str, n_frames: int) -> SeriesInfo:
    """The series attributes one file carries (enhanced MR keeps some in functional groups)."""
    groups = _first_frame_groups(ds)
    number = ds.get("SeriesNumber")
    return SeriesInfo(
        uid=uid,
        description=str(ds.get("SeriesDescription") or "").strip(),
        protocol=str(ds.get("ProtocolName") or "").strip(),
        modality=str(ds.get("Modality") or ""),
        series_number=int(number) if number not in (None, "") else None,
        n_files=1,
        n_frames=n_frames,
        echo_time=_number(ds.get("EchoTime"), _in(groups, "MREchoSequence", "EffectiveEchoTime")),
        repetition_time=_number(
            ds.get("RepetitionTime"),
            _in(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime"),
        ),
        inversion_time=_number(
            ds.get("InversionTime"), _in(groups, "MRModifierSequence", "InversionTimes")
        ),
        scanning_sequence=_strings(ds.get("ScanningSequence")),
        sequence_variant=_strings(ds.get("SequenceVariant")),
        contrast_agent=_contrast_agent(ds, groups),
        mr_acquisition_type=str(ds.get("MRAcquisitionType") or ""),
        image_type=_strings(ds.get("ImageType")),
        acquisition_contrast=str(ds.get("AcquisitionContrast") or ""),
        files=(path,),
    )


def _first_frame_groups(ds: Dataset) -> Dataset:
    """Shared functional groups overlaid with the first frame's (empty for classic images)."""
    groups = Dataset()
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = ds.get(keyword)
        if sequence:
            for element in sequence[0]:
                groups.add(element)
    return groups


def _in(groups: Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` in the first item of ``sequence`` within ``groups``, or None."""
    items = groups.get(sequence)
    return items[0].get(keyword) if items else None


def _number(*values: Any) -> float | None:
    """The first value that is a number (the first item of a multi-valued one)."""
    for value in values:
        if value is not None and not isinstance(value, str | float | int):
            value = next(iter(value), None)  # a MultiValue such as InversionTimes
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return None


def _strings(value: Any) -> tuple[str, ...]:
    """A CS attribute as a tuple of upper-case strings (single- or multi-valued)."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def _contrast_agent(ds: Dataset, groups: Dataset) -> str:
    """ContrastBolusAgent, or a marker that enhanced MR says contrast was given."""
    agent = str(ds.get("ContrastBolusAgent") or "").strip()
    if agent:
        return agent
    agents = ds.get("ContrastBolusAgentSequence")
    if agents:
        return str(agents[0].get("CodeMeaning") or "administered")
    usage = _in(groups, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered")
    return "administered" if str(usage or "").upper() == "YES" else ""


def _merge(records: list[_FileRecord]) -> SeriesInfo:
    """One series' description: the first file's attributes with every file and frame."""
    first = records[0].series
    return replace(
        first,
        n_files=len(records),
        n_frames=sum(len(r.frames) for r in records),
        files=tuple(r.path for r in records),
    )
