"""Convert one image (DICOM series, NIfTI, NRRD, MetaImage) to NIfTI, geometry unchanged.

This is what ``fedseg convert INPUT OUTPUT.nii.gz [--series UID]`` runs.  Voxels are copied
as they are (no resampling, no reorientation, the same data type); the output's sform and
qform (both code 1, "scanner") hold the input's voxel-to-world mapping, so every voxel keeps
its world position.  What the readers had to decide about the input's geometry (a sform/qform
disagreement, a sheared matrix made orthonormal) is reported in :attr:`ConvertResult.notes`
as well as warned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import Geometry
from data_adapters.readers import GEOMETRY_NOTE_KEY, read_image
from data_adapters.writers import write_nifti

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_image` wrote.

    ``geometry`` is the written grid (shape, spacing, LPS origin/direction, RAS affine);
    ``dtype`` the on-disk voxel type; ``series_uid`` the DICOM series read, if one was named;
    ``notes`` what the reader decided about an ambiguous or sheared input geometry.
    """

    input: Path
    output: Path
    geometry: Geometry
    dtype: str
    series_uid: str | None
    notes: tuple[str, ...]


def convert_image(input: Path, output: Path, *, series_uid: str | None = None) -> ConvertResult:
    """Write ``input`` as a NIfTI file with the same world geometry.

    Parameters
    ----------
    input
        A DICOM series folder (or one DICOM file), ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``
        or ``.mha``/``.mhd`` file holding one 3D scalar image.
    output
        Destination ending in ``.nii.gz`` or ``.nii``; missing parent folders are created.
    series_uid
        The DICOM series to convert when the folder holds several.

    Raises
    ------
    DataError
        Naming the input or output and the problem (unreadable input, several DICOM series
        and no ``series_uid``, a ``series_uid`` for a non-DICOM input, a wrong output suffix).
    """
    input, output = Path(input), Path(output)
    if not output.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(output, "output must be a .nii.gz or .nii file")
    if series_uid is not None:
        from data_adapters.dicom import is_dicom_file, read_series

        if not (input.is_dir() or is_dicom_file(input)):
            raise DataError(input, "a series UID applies to DICOM input (a folder) only")
        image = read_series(input, series_uid=series_uid)
    else:
        image = read_image(input)
    notes = (
        tuple(image.GetMetaData(GEOMETRY_NOTE_KEY).split("; "))
        if image.HasMetaDataKey(GEOMETRY_NOTE_KEY)
        else ()
    )
    dtype = sitk.GetArrayViewFromImage(image).dtype
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_nifti(image, output, dtype=dtype)
    except OSError as err:
        raise DataError(output, f"cannot be written ({err.strerror or err})") from err
    return ConvertResult(
        input=input,
        output=output,
        geometry=Geometry.of(image),
        dtype=str(dtype),
        series_uid=series_uid,
        notes=notes,
    )
