"""Read one image with its world geometry intact (no resampling).

Formats are looked up in :data:`READERS` by file suffix: NIfTI (``.nii``, ``.nii.gz``), NRRD
(``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and single DICOM files (``.dcm``).  A
folder is a DICOM series (:func:`data_adapters.dicom.read_series`).

NIfTI geometry and integrity rules live in :mod:`data_adapters.nifti`.

SimpleITK silently returns partial voxels for a truncated ``.nii`` or ``.nii.gz`` file, so the
NIfTI reader first checks that the gzip stream is whole and that the file holds as many data
bytes as its header promises; the MetaImage reader checks its data size and data file the
same way (ITK's own messages for those say "Reason: Success").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_adapters.errors import DataError, itk_message
from data_adapters.nifti import (
    GEOMETRY_NOTE_KEY,
    GeometryWarning,
    check_nifti_complete,
    read_nifti,
)
from data_adapters.sources import Source

__all__ = ["GEOMETRY_NOTE_KEY", "READERS", "GeometryWarning", "check_nifti_complete", "read_image"]

Reader = Callable[[Path], sitk.Image]
_CHUNK = 1 << 20


def image_suffix(path: Path) -> str:
    """Return the format suffix of ``path`` (``".nii.gz"`` counts as one)."""
    name = path.name.lower()
    for suffix in sorted(READERS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_image(path: str | Path) -> sitk.Image:
    """Read a 3D scalar image, keeping its world geometry.

    Parameters
    ----------
    path
        Image file, its suffix selecting the reader (see :data:`READERS`), or a folder
        holding exactly one DICOM series.

    Raises
    ------
    DataError
        If the file is missing, empty, truncated, corrupt, not 3D or of an
        unsupported format (or, for a folder, not a readable DICOM series).
    """
    path = Path(path)
    if path.is_dir():
        from data_adapters.dicom import read_series  # DICOM support loads only when needed

        return read_series(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    reader = READERS.get(image_suffix(path))
    if reader is None and _has_dicom_marker(path):
        reader = read_dicom_file  # DICOM files often have no suffix at all
    if reader is None:
        raise DataError(
            path,
            f"unsupported image format (supported: {', '.join(READERS)}, a DICOM series folder)",
        )
    image = reader(path)
    if image.GetDimension() != 3:
        raise DataError(path, f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, "expected one value per voxel, got a vector image")
    return image


def read_source(source: Source) -> sitk.Image:
    """Read the 3D image a layout pointed at: a file, one volume of a 4D file, a DICOM series."""
    if source.series_uid is not None:
        from data_adapters.dicom import read_series  # DICOM support loads only when needed

        return read_series(source.path, series_uid=source.series_uid)
    if source.channel is not None:
        return read_volume(source.path, source.channel)
    return read_image(source.path)


def read_sources(sources: Mapping[str, Source]) -> dict[str, sitk.Image]:
    """Read several sources, each 4D file once however many of its volumes are wanted."""
    four_d: dict[Path, sitk.Image] = {}
    images = {}
    for name, source in sources.items():
        if source.channel is None:
            images[name] = read_source(source)
            continue
        if source.path not in four_d:
            four_d[source.path] = _read_4d(source.path)
        images[name] = _volume(four_d[source.path], source.path, source.channel)
    return images


def read_volume(path: Path, index: int) -> sitk.Image:
    """One 3D volume of a 4D file (MSD keeps four modalities in one NIfTI)."""
    return _volume(_read_4d(path), path, index)


def _read_4d(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    reader = READERS.get(image_suffix(path))
    if reader is None:
        raise DataError(path, f"unsupported image format (supported: {', '.join(READERS)})")
    image = reader(path)
    if image.GetDimension() != 4:
        raise DataError(
            path, f"expected a 4D image with one volume per modality, got {image.GetDimension()}D"
        )
    return image


def _volume(image: sitk.Image, path: Path, index: int) -> sitk.Image:
    size = list(image.GetSize())
    if not 0 <= index < size[3]:
        raise DataError(path, f"volume {index} requested but the file holds {size[3]}")
    # Extract keeps the spatial part of the geometry (origin, spacing, 3x3 direction).
    volume: sitk.Image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, index])
    return volume


def read_nrrd(path: Path) -> sitk.Image:
    """Read a ``.nrrd`` file or a ``.nhdr`` header with its data file (SimpleITK's NRRD IO)."""
    return _read_itk(path, "NrrdImageIO", "NRRD")


def read_metaimage(path: Path) -> sitk.Image:
    """Read a ``.mha`` file or a ``.mhd`` header with its data file (SimpleITK's MetaImage IO)."""
    check_metaimage_complete(path)
    return _read_itk(path, "MetaImageIO", "MetaImage")


def read_dicom_file(path: Path) -> sitk.Image:
    """Read one DICOM file as a series of its own (an enhanced multi-frame file)."""
    from data_adapters.dicom import read_series  # DICOM support loads only when needed

    return read_series(path)


def _read_itk(path: Path, image_io: str, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path), imageIO=image_io)
    except RuntimeError as err:
        raise DataError(path, f"cannot be read as {what}: {itk_message(err)}") from err


#: Bytes per element of MetaImage element types.
_MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}  # fmt: skip


def check_metaimage_complete(path: Path) -> None:
    """Raise :class:`DataError` unless a MetaImage header is whole and its data all there.

    Compressed data and file lists are left to ITK; uncompressed data must hold as many
    bytes as ``DimSize`` x ``ElementType`` x ``ElementNumberOfChannels`` promise.
    """
    fields: dict[str, str] = {}
    header_bytes = 0
    with path.open("rb") as stream:
        for raw in stream:
            header_bytes += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile" or header_bytes > 65536:
                break
    if "ElementDataFile" not in fields or "DimSize" not in fields:
        raise DataError(path, "not a MetaImage header (no DimSize / ElementDataFile)")
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL":
        data_path, available = path, path.stat().st_size - header_bytes
    elif data_file.upper().startswith("LIST") or "%" in data_file:
        return
    else:
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise DataError(path, f"data file {data_file} named by ElementDataFile is missing")
        available = data_path.stat().st_size
    size = _MET_SIZES.get(fields.get("ElementType", ""))
    if size is None or fields.get("CompressedData", "False").lower() == "true":
        return
    try:
        count = int(np.prod([int(v) for v in fields["DimSize"].split()]))
        count *= int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError as err:
        raise DataError(path, f"invalid DimSize {fields['DimSize']!r}") from err
    if available < count * size:
        raise DataError(
            data_path, f"truncated: {available} data bytes, the header promises {count * size}"
        )


def _has_dicom_marker(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(132)[128:] == b"DICM"


#: Suffix -> reader.  Suffixes are lower case and matched longest first.
READERS: dict[str, Reader] = {
    ".nii.gz": read_nifti,
    ".nii": read_nifti,
    ".nrrd": read_nrrd,
    ".nhdr": read_nrrd,
    ".mha": read_metaimage,
    ".mhd": read_metaimage,
    ".dcm": read_dicom_file,
}
