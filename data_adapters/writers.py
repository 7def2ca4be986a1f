"""Write canonical NIfTI files with an exact RAS affine.

nibabel is used rather than SimpleITK's writer because it lets us state the
affine, the sform/qform codes, the units and the on-disk data type directly.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.geometry import ijk_array, ras_affine

#: NIfTI xform code "scanner anatomical": the affine is the scanner's world.
XFORM_SCANNER = 1


def write_nifti(image: sitk.Image, path: Path, *, dtype: npt.DTypeLike) -> None:
    """Write a 3D image as NIfTI-1 with sform = qform = its RAS affine.

    Parameters
    ----------
    image
        SimpleITK image (any orientation; the affine says where voxels are).
    path
        Destination ``.nii`` or ``.nii.gz`` file.
    dtype
        Data type stored on disk, e.g. ``np.float32`` or ``np.uint8``.
    """
    affine = ras_affine(image)
    nifti = nib.Nifti1Image(ijk_array(image).astype(dtype, copy=False), affine)
    nifti.set_sform(affine, code=XFORM_SCANNER)
    nifti.set_qform(affine, code=XFORM_SCANNER)
    nifti.header.set_xyzt_units(xyz="mm")
    # Without this nibabel may store float data with a scale factor; keep values verbatim.
    nifti.header.set_data_dtype(np.dtype(dtype))
    nib.save(nifti, path)
