"""Read one image file with its world geometry intact (no resampling).

Formats are looked up in :data:`READERS` by file suffix; adding a format
(NRRD, MHA, a DICOM series folder) means adding a reader function and an
entry.  For now only NIfTI (``.nii``, ``.nii.gz``) is registered.

SimpleITK silently returns partial voxels for a truncated ``.nii`` or
``.nii.gz`` file, so the NIfTI reader first checks that the gzip stream is
whole and that the file holds as many data bytes as its header promises.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.sources import Source

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
        Image file; its suffix selects the reader (see :data:`READERS`).

    Raises
    ------
    DataError
        If the file is missing, empty, truncated, corrupt, not 3D or of an
        unsupported format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    reader = READERS.get(image_suffix(path))
    if reader is None:
        raise DataError(path, f"unsupported image format (supported: {', '.join(READERS)})")
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


def read_volume(path: Path, index: int) -> sitk.Image:
    """One 3D volume of a 4D file (MSD keeps four modalities in one NIfTI)."""
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
    size = list(image.GetSize())
    if not 0 <= index < size[3]:
        raise DataError(path, f"volume {index} requested but the file holds {size[3]}")
    # Extract keeps the spatial part of the geometry (origin, spacing, 3x3 direction).
    volume: sitk.Image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, index])
    return volume


def read_nifti(path: Path) -> sitk.Image:
    """Read a ``.nii`` / ``.nii.gz`` file with SimpleITK after an integrity check."""
    check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as err:
        raise DataError(path, f"cannot be read as NIfTI: {_itk_message(err)}") from err


def check_nifti_complete(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` holds a whole NIfTI-1/2 image.

    Streams the file once (decompressing it when gzipped, which also checks
    the gzip CRC) and compares its length with what the header promises.
    """
    gzipped = path.name.lower().endswith(".gz")
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
            header = _nifti_header(path, head)
            total = len(head)
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt gzip data ({err})") from err
    shape = header.get_data_shape()
    expected = (
        int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    )
    if total < expected:
        raise DataError(path, f"truncated: {total} bytes, the header promises {expected}")


def _nifti_header(path: Path, head: bytes) -> nib.Nifti1Header:
    """Parse a NIfTI-1 or NIfTI-2 header from the file's first bytes."""
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    if not sizes & {348, 540} or len(head) < header_class.sizeof_hdr:
        raise DataError(path, "not a NIfTI file (no NIfTI header)")
    try:
        header: nib.Nifti1Header = header_class.from_fileobj(
            io.BytesIO(head[: header_class.sizeof_hdr])
        )
    except Exception as err:  # nibabel raises several types for malformed headers
        raise DataError(path, f"invalid NIfTI header ({err})") from err
    if header["magic"].item() not in (b"n+1", b"n+2"):
        raise DataError(path, "NIfTI header without image data in the same file (.hdr/.img pair?)")
    return header


def _itk_message(err: RuntimeError) -> str:
    """Keep the informative last line of an ITK exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


#: Suffix -> reader.  Suffixes are lower case and matched longest first.
READERS: dict[str, Reader] = {
    ".nii.gz": read_nifti,
    ".nii": read_nifti,
}
