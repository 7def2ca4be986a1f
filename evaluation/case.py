"""Score one case from files: the ``fedseg metrics`` workflow.

Both files are read as 3D label maps, mapped onto the canonical labels with one label
scheme (:mod:`data_adapters.labels`; ``brats2023`` is the canonical one) and must lie on one
grid (shape and affine): this module never resamples, because a score on a resampled
prediction is not the score of the prediction.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from data_adapters.labels import CANONICAL_SCHEME, remap_labels
from evaluation.metrics import CaseRegionScores, case_scores

# Affines that differ by less than this (mm, or direction cosines x mm) are one grid.
AFFINE_ATOL = 1e-3


def read_labels(
    path: Path, *, labels: str = CANONICAL_SCHEME
) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    """A 3D label map in canonical labels and its affine.

    Raises
    ------
    FileNotFoundError, ValueError, data_adapters.errors.DataError
        One line naming ``path``: missing, unreadable, not 3D, or holding a value that the
        ``labels`` scheme does not know.
    """
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as err:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI image ({err})") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    return remap_labels(data, labels, path=path), np.asarray(image.affine)  # type: ignore[attr-defined]


def score_files(
    *,
    reference: Path,
    prediction: Path,
    labels: str = CANONICAL_SCHEME,
    lesion_wise: bool = False,
) -> dict[str, CaseRegionScores]:
    """All per-region scores of a prediction file against a reference file.

    Parameters
    ----------
    reference, prediction
        NIfTI label maps on one grid.
    labels
        Label scheme of both files (``brats2023``, ``brats2021``, ``msd``, ...).
    lesion_wise
        Add the BraTS 2023 lesion-wise scores.

    Raises
    ------
    ValueError
        Naming ``prediction`` when its grid (shape or affine) differs from the reference's.
    """
    ref, ref_affine = read_labels(reference, labels=labels)
    pred, pred_affine = read_labels(prediction, labels=labels)
    if ref.shape != pred.shape or not np.allclose(ref_affine, pred_affine, atol=AFFINE_ATOL):
        raise ValueError(
            f"{prediction}: grid {pred.shape} differs from the reference's {ref.shape} "
            "(shape or affine); resample it onto the reference first"
        )
    # Voxel size per array axis: the lengths of the affine's columns.
    spacing = np.linalg.norm(ref_affine[:3, :3], axis=0)
    return case_scores(pred, ref, spacing=spacing.tolist(), lesion_wise=lesion_wise)
