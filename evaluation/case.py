"""Score one case from files: the ``fedseg metrics`` workflow."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from evaluation.metrics import RegionScore, region_scores

CANONICAL_VALUES = frozenset({0, 1, 2, 3})


def _read_labels(path: Path) -> tuple[NDArray[np.uint8], NDArray[np.float64]]:
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as err:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI image ({err})") from None
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    values = set(np.unique(data).tolist())
    if not values <= CANONICAL_VALUES:
        raise ValueError(
            f"{path}: label values {sorted(values - CANONICAL_VALUES)} are not canonical (0-3)"
        )
    return data.astype(np.uint8), np.asarray(image.affine)  # type: ignore[attr-defined]


def score_files(*, reference: Path, prediction: Path) -> dict[str, RegionScore]:
    """Dice and HD95 (mm) per region; both files must share one grid."""
    ref, ref_affine = _read_labels(reference)
    pred, pred_affine = _read_labels(prediction)
    if ref.shape != pred.shape or not np.allclose(ref_affine, pred_affine, atol=1e-3):
        raise ValueError(
            f"{prediction}: grid {pred.shape} differs from the reference's {ref.shape} "
            "(shape or affine); resample it onto the reference first"
        )
    spacing = np.linalg.norm(ref_affine[:3, :3], axis=0)
    return region_scores(pred, ref, spacing=spacing.tolist())
