"""Read one image with its world geometry intact (no resampling).

Formats are looked up in :data:`READERS` by file suffix: NIfTI (``.nii``, ``.nii.gz``), NRRD
(``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and single DICOM files (``.dcm``).  A
folder is a DICOM series (:func:`data_adapters.dicom.read_series`).

NIfTI geometry follows the standard's rule, not SimpleITK's own preferences: the sform when
``sform_code > 0``, else the qform when ``qform_code > 0``, else voxel sizes alone ("method
1", orientation unknown).  SimpleITK agrees for most files but prefers the qform when the
sform's code is not "scanner" (e.g. an MNI sform beside a scanner qform), falls back to the
qform when the sform is sheared, refuses a sheared sform without a qform, and flips x and y
for method 1; where its geometry differs from the rule's, the rule's is set.  A sheared
(non-orthonormal) direction cannot be held by an ITK image: it is orthonormalised by polar
decomposition (origin and voxel sizes kept).  Each such decision is reported as a
:class:`GeometryWarning` (Python ``warnings``) naming the file, and recorded on the image as
metadata :data:`GEOMETRY_NOTE_KEY`; a sform and qform that are both set and disagree by more
than 0.1 mm or 0.1 degree are reported the same way.

SimpleITK silently returns partial voxels for a truncated ``.nii`` or ``.nii.gz`` file, so the
NIfTI reader first checks that the gzip stream is whole and that the file holds as many data
bytes as its header promises; the MetaImage reader checks its data size and data file the
same way (ITK's own messages for those say "Reason: Success").
"""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import lps_geometry
from data_adapters.sources import Source

Reader = Callable[[Path], sitk.Image]

_CHUNK = 1 << 20

#: Image metadata key holding what the reader decided about an ambiguous or sheared geometry.
GEOMETRY_NOTE_KEY = "fedseg_geometry_note"
#: sform/qform disagreement reported above these (mm over the image's corners, degrees).
XFORM_TOLERANCE_MM = 0.1
XFORM_TOLERANCE_DEG = 0.1
#: Largest deviation of D^T D from identity still taken as float rounding, not shear.
SHEAR_TOLERANCE = 1e-4


class GeometryWarning(UserWarning):
    """A file's geometry was ambiguous or had to be adjusted; the message says how."""


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


def read_nifti(path: Path) -> sitk.Image:
    """Read a ``.nii`` / ``.nii.gz`` file after an integrity check, geometry by the NIfTI rule."""
    check_nifti_complete(path)
    header = cast(nib.Nifti1Image, nib.load(path)).header  # header only: voxels are not read
    affine, notes = nifti_affine(header)
    try:
        image = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as err:
        # ITK refuses a sheared sform without a qform (and some NIfTI-2 files); nibabel reads them.
        image = _nifti_with_nibabel(path, err)
    _set_spatial_geometry(image, affine)
    if notes:
        image.SetMetaData(GEOMETRY_NOTE_KEY, "; ".join(notes))
        for note in notes:
            warnings.warn(f"{path}: {note}", GeometryWarning, stacklevel=2)
    return image


def nifti_affine(header: nib.Nifti1Header) -> tuple[npt.NDArray[np.float64], list[str]]:
    """The voxel-to-RAS affine the NIfTI rule gives, orthonormalised, with notes on choices.

    Returns
    -------
    affine, notes
        4x4 affine whose 3x3 part has orthogonal columns; notes say where the header was
        ambiguous (sform/qform disagreement, no transform) or adjusted (shear removed).
    """
    shape = header.get_data_shape()[:3]
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    notes: list[str] = []
    if sform_code > 0:
        affine = np.asarray(header.get_sform(), dtype=np.float64)
        if qform_code > 0:
            mm, degrees = xform_disagreement(affine, header.get_qform(), shape)
            if mm > XFORM_TOLERANCE_MM or degrees > XFORM_TOLERANCE_DEG:
                notes.append(
                    f"sform and qform disagree by up to {mm:.2f} mm / {degrees:.2f} degrees;"
                    f" using the sform (code {sform_code}), as the NIfTI rule says"
                )
    elif qform_code > 0:
        affine = np.asarray(header.get_qform(), dtype=np.float64)
    else:
        affine = np.diag([*(float(v) for v in header.get_zooms()[:3]), 1.0])
        notes.append("no sform or qform (both codes 0): orientation unknown, voxel sizes only")
    affine, shift = orthonormalised(affine, shape)
    if shift is not None:
        notes.append(
            "non-orthonormal (sheared) direction matrix orthonormalised by polar decomposition;"
            f" voxels move by up to {shift:.2f} mm"
        )
    return affine, notes


def xform_disagreement(
    a: npt.ArrayLike, b: npt.ArrayLike, shape: tuple[int, ...]
) -> tuple[float, float]:
    """How far two affines place the image's corner voxels apart (mm) and their rotation (deg)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    corners = _corners(shape)
    mm = float(np.linalg.norm((a - b)[:3] @ corners, axis=0).max())
    da = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    db = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    cosine = (np.trace(da.T @ db) - 1.0) / 2.0
    return mm, float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def orthonormalised(
    affine: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.float64], float | None]:
    """Replace a sheared 3x3 direction by its nearest rotation (polar decomposition).

    Returns the affine (voxel sizes = the column lengths, origin kept) and how far the image's
    corners moved in mm, or None when the direction was already orthonormal.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() <= SHEAR_TOLERANCE:
        return affine, None
    u, _, vt = np.linalg.svd(direction)
    fixed = affine.copy()
    fixed[:3, :3] = (u @ vt) * spacing
    shift = float(np.linalg.norm((fixed - affine)[:3] @ _corners(shape), axis=0).max())
    return fixed, shift


def _corners(shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Homogeneous voxel coordinates (4 x 8) of the corners of a 3D grid."""
    extent = [max(int(n) - 1, 0) for n in (*shape, 1, 1, 1)[:3]]
    grid = np.array(np.meshgrid(*[[0, e] for e in extent], indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones(grid.shape[1])])


def _set_spatial_geometry(image: sitk.Image, affine: npt.NDArray[np.float64]) -> None:
    """Give ``image`` (3D or 4D) the spatial geometry of a RAS affine, if it differs."""
    origin, spacing, direction = lps_geometry(affine)
    n = image.GetDimension()
    current = np.asarray(image.GetDirection()).reshape(n, n)[:3, :3].ravel()
    if (
        np.allclose(image.GetOrigin()[:3], origin, atol=1e-4)
        and np.allclose(image.GetSpacing()[:3], spacing, atol=1e-6)
        and np.allclose(current, direction, atol=1e-6)
    ):
        return  # SimpleITK already applied the rule
    full = np.eye(n)
    full[:3, :3] = np.reshape(direction, (3, 3))
    image.SetOrigin((*origin, *image.GetOrigin()[3:]))
    image.SetSpacing((*spacing, *image.GetSpacing()[3:]))
    image.SetDirection(tuple(float(v) for v in full.ravel()))


def _nifti_with_nibabel(path: Path, cause: RuntimeError) -> sitk.Image:
    """Voxels through nibabel when ITK refuses the file; the geometry is set by the caller."""
    try:
        data = np.asanyarray(cast(nib.Nifti1Image, nib.load(path)).dataobj)
    except Exception as err:  # nibabel raises several types for malformed files
        raise DataError(path, f"cannot be read as NIfTI: {_itk_message(cause)}") from err
    if data.ndim not in (3, 4):
        raise DataError(path, f"cannot be read as NIfTI: {_itk_message(cause)}")
    # nibabel indexes (i, j, k[, t]); SimpleITK arrays are the reverse, in native byte order.
    native = data.astype(data.dtype.newbyteorder("="), copy=False).transpose()
    return sitk.GetImageFromArray(np.ascontiguousarray(native), isVector=False)


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
        raise DataError(path, f"cannot be read as {what}: {_itk_message(err)}") from err


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


def _itk_message(err: RuntimeError) -> str:
    """Keep the informative last line of an ITK exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


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
