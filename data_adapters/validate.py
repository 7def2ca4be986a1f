# nibabel ships py.typed but leaves most functions unannotated.
"""Checks that a harmonised site folder is what every later step expects.

:func:`check_site` raises :class:`DataError` naming the first problem found:
the manifest, a missing case folder or file, modalities off one grid, a
non-RAS or wrongly spaced affine, label values outside 0-3, a broken split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_adapters.errors import DataError
from data_adapters.labels import CANONICAL_LABELS, CANONICAL_SCHEME
from data_adapters.layouts import MODALITIES
from data_adapters.manifest import MANIFEST_NAME, CaseRecord, SiteManifest, load_manifest
from data_adapters.nifti import check_nifti_complete

#: World tolerance (mm) for "same grid" and "RAS-aligned".
TOLERANCE_MM = 1e-3


def check_site(site_dir: Path, *, read_data: bool = True) -> SiteManifest:
    """Validate a harmonised site folder and return its manifest.

    Parameters
    ----------
    site_dir
        Folder written by :func:`data_adapters.site.harmonise_site`.
    read_data
        Also stream every file (catches truncation) and check label values;
        without it only headers are read.

    Raises
    ------
    DataError
        Naming the file at fault and the problem.
    """
    site_dir = Path(site_dir)
    manifest = load_manifest(site_dir)
    _check_manifest(manifest, site_dir / MANIFEST_NAME)
    for record in manifest.cases:
        _check_case(manifest, record, read_data=read_data)
    return manifest


def _check_manifest(manifest: SiteManifest, path: Path) -> None:
    """Manifest-level rules: modalities, label scheme, unique ids, a usable split."""
    if tuple(manifest.modalities) != MODALITIES:
        raise DataError(path, f"modalities {list(manifest.modalities)} != {list(MODALITIES)}")
    if manifest.label_scheme != CANONICAL_SCHEME:
        raise DataError(path, f"label scheme {manifest.label_scheme!r} != {CANONICAL_SCHEME!r}")
    ids = manifest.case_ids
    if len(set(ids)) != len(ids):
        raise DataError(path, "duplicate case ids")
    train, validation = manifest.train_cases, manifest.validation_cases
    # An evaluation-only site holds every case out (validation fraction 1): no training split.
    if not train and not validation:
        raise DataError(path, "both the training and the validation split are empty")
    overlap = sorted(set(train) & set(validation))
    if overlap:
        raise DataError(path, f"cases in both training and validation: {overlap}")
    labelled = {c.case_id for c in manifest.cases if c.labelled}
    strays = sorted(set(train + validation) - labelled)
    if strays:
        raise DataError(
            path, f"split names cases that are not labelled cases of the site: {strays}"
        )


def _check_case(manifest: SiteManifest, record: CaseRecord, *, read_data: bool) -> None:
    """One case folder: files present, one RAS grid at the target spacing, labels 0-3."""
    case_dir = manifest.case_dir(record.case_id)
    if not case_dir.is_dir():
        raise DataError(case_dir, "case folder listed in the manifest is missing")
    names = [*MODALITIES, "seg"] if record.labelled else list(MODALITIES)
    reference: Any = None
    for name in names:
        path = case_dir / f"{name}.nii.gz"
        if not path.is_file():
            raise DataError(path, f"{name} file listed in the manifest is missing")
        if read_data:
            check_nifti_complete(path)
        image = _load(path)
        if reference is None:
            _check_grid(path, image, record, manifest.target_spacing)
            reference = image
        elif image.shape != reference.shape or not np.allclose(
            image.affine, reference.affine, rtol=0.0, atol=TOLERANCE_MM
        ):
            raise DataError(path, f"not on the grid of {MODALITIES[0]}.nii.gz (shape or affine)")
        if name == "seg" and read_data:
            _check_labels(path, image)


def _load(path: Path) -> Any:
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise DataError(path, f"cannot be read as NIfTI ({err})") from err


def _check_grid(path: Path, image: Any, record: CaseRecord, spacing: tuple[float, ...]) -> None:
    """RAS-aligned affine, target spacing, the shape the manifest records."""
    if len(image.shape) != 3 or tuple(image.shape) != tuple(record.output_shape):
        raise DataError(path, f"shape {image.shape} != manifest {record.output_shape}")
    expected = np.diag([*spacing, 1.0])
    linear = image.affine[:3, :3]
    if "".join(nib.aff2axcodes(image.affine)) != "RAS" or not np.allclose(
        linear, expected[:3, :3], rtol=0.0, atol=TOLERANCE_MM
    ):
        raise DataError(
            path, f"affine is not RAS-aligned at spacing {list(spacing)}: {linear.tolist()}"
        )


def _check_labels(path: Path, image: Any) -> None:
    values = np.unique(np.asarray(image.dataobj))
    unknown = sorted(set(values.tolist()) - set(CANONICAL_LABELS))
    if unknown:
        raise DataError(path, f"label values {unknown} outside {sorted(CANONICAL_LABELS)}")
