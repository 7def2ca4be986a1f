"""Prediction on a new patient's scans, back on the scan's own grid.

The path is training's, run forwards then backwards: the raw case is harmonised with the
parameters the model artefact records (never with flags a user could get wrong), the
network predicts the three regions by sliding window on the canonical grid, the regions
become canonical labels, and the label map is resampled (nearest neighbour) onto the grid of
the case's t1n as read. ``seg.nii.gz`` then has that scan's exact shape and affine;
``volumes.json`` has each label's and region's volume in ml; a DICOM input also gets a
DICOM-SEG referencing its t1n series (:mod:`data_adapters.dicom_seg`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from numpy.typing import NDArray

from data_adapters.dicom_seg import write_dicom_seg
from data_adapters.errors import DataError
from data_adapters.harmonise import HARMONISE_VERSION, HarmonisedCase, harmonise_case
from data_adapters.inverse import to_original_grid
from data_adapters.labels import CANONICAL_LABELS, get_scheme
from data_adapters.layouts import MODALITIES, RawCase, detect_layout, scan_cases
from data_adapters.layouts_dicom import DICOM_STUDY
from data_adapters.writers import write_nifti
from evaluation.regions import REGIONS
from fedseg.artifacts import write_json
from fedseg.task.artifact import ArtifactError, ModelArtifact
from fedseg.task.data import load_image
from fedseg.task.infer import predict_labels


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """How to predict and what to write."""

    # Output label values: "brats2023" (canonical: 1 NETC, 2 SNFH, 3 ET), "brats2021"
    # (ET = 4) or another scheme data_adapters.labels knows that maps one-to-one.
    label_scheme: str = "brats2023"
    # Average the eight mirrorings of the scan (8x the time).
    mirror: bool = False
    # Also write what the network saw (the harmonised case) and its canonical-grid labels
    # to OUT/canonical/ (for QC, or to score against a canonical reference).
    keep_canonical: bool = False


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What predicting one case wrote and measured."""

    case_id: str
    seg: Path
    volumes: Path
    dicom_seg: Path | None
    # Canonical labels on the harmonised grid (X, Y, Z), for scoring against a reference.
    canonical: NDArray[np.uint8] = field(repr=False)
    seconds: dict[str, float]


def output_values(scheme: str) -> dict[int, int]:
    """Canonical label -> the value ``scheme`` writes for it; refuses a scheme that cannot
    say each canonical label (one that merges labels or has none for one)."""
    mapping = get_scheme(scheme).to_canonical
    inverse: dict[int, int] = {}
    for raw, canonical in sorted(mapping.items()):
        if canonical == 0 and raw != 0:
            continue  # dropped values (a resection cavity) are never written
        if canonical in inverse:
            raise DataError(Path(scheme), "label scheme merges labels: it cannot be written")
        inverse[canonical] = raw
    if set(inverse) != set(CANONICAL_LABELS):
        raise DataError(Path(scheme), "label scheme lacks a value for a canonical label")
    return inverse


def find_case(path: Path, *, case_id: str | None = None, layout: str | None = None) -> RawCase:
    """The one case at ``path``: a patient's DICOM study folder, a case folder (its parent
    is the site folder a layout reads), a site folder holding one case, or, with ``case_id``,
    the site folder holding that case (how MSD and nnU-Net store cases, as files in shared
    folders).

    Raises
    ------
    DataError
        Naming ``path``: no case found, several cases without ``case_id``, an unknown id.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if case_id:
        cases = _cases_in(path, layout)
        chosen = [c for c in cases if c.case_id == case_id]
        if len(chosen) != 1:
            known = ", ".join(c.case_id for c in cases[:5]) or "none of a known layout"
            raise DataError(path, f"has no case '{case_id}' (cases: {known})")
        return chosen[0]
    here = _cases_in(path, layout)
    if len(here) > 1:
        raise DataError(path, f"holds {len(here)} cases: pick one with --case ID, or predict "
                              "them all with --batch")  # fmt: skip
    if here:
        return here[0]
    if layout in (None, DICOM_STUDY.name):
        patient = DICOM_STUDY.single_case(path)  # a patient's study: read only that folder
        if patient is not None:
            return patient
    inside = [c for c in _cases_in(path.parent, layout) if _under(c, path)]
    if len(inside) == 1:
        return inside[0]
    raise DataError(path, "no complete case of a known layout found here (name --layout?)")


def _cases_in(site_dir: Path, layout: str | None) -> list[RawCase]:
    try:
        return scan_cases(site_dir, layout or detect_layout(site_dir)).cases
    except DataError:
        return []


def _under(case: RawCase, folder: Path) -> bool:
    root = folder.resolve()
    return all(root in s.path.resolve().parents or s.path.resolve() == root
               for s in case.modalities.values())  # fmt: skip


def harmonise_for(artifact: ModelArtifact, raw_case: RawCase) -> HarmonisedCase:
    """``raw_case`` harmonised exactly as the model's training data was."""
    h = artifact.harmonisation
    if h["harmonise_version"] != HARMONISE_VERSION:
        raise ArtifactError(
            artifact.weights,
            f"trained on data of harmonisation version {h['harmonise_version']}; this fedseg "
            f"harmonises as version {HARMONISE_VERSION}: use the fedseg the study used",
        )
    return harmonise_case(
        raw_case,
        target_spacing=artifact.target_spacing,
        margin_mm=float(h["margin_mm"]),
        register=bool(h["register"]),
        min_overlap=float(h["min_overlap"]),
        min_size=[int(v) for v in h["min_size"]],
        min_shape_mm=[float(v) for v in h["min_shape_mm"]],
        registration_seed=int(h["registration_seed"]),
    )


def predict_case(
    artifact: ModelArtifact,
    model: torch.nn.Module,
    raw_case: RawCase,
    out_dir: Path,
    *,
    options: PredictOptions,
) -> Prediction:
    """Predict one case and write ``seg.nii.gz``, ``volumes.json`` (and ``seg.dcm`` for a
    DICOM t1n) into ``out_dir``. ``model`` is ``artifact.network(device)``."""
    values = output_values(options.label_scheme)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    case = harmonise_for(artifact, raw_case)
    seconds["harmonise"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = _infer(artifact, model, case, out_dir, options=options)
    seconds["inference"] = time.perf_counter() - start
    start = time.perf_counter()
    canonical = sitk.GetImageFromArray(labels.transpose(2, 1, 0).copy())
    canonical.CopyInformation(case.images[MODALITIES[0]])
    original = to_original_grid(canonical, case.original_geometry)
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.keep_canonical:  # the prediction as the network made it, beside its input
        write_nifti(canonical, out_dir / "canonical" / "seg.nii.gz", dtype=np.uint8)
    seg_path = out_dir / "seg.nii.gz"
    write_nifti(_relabel(original, values), seg_path, dtype=np.uint8)
    volumes_path = out_dir / "volumes.json"
    write_json(volumes_path, volumes(original, case_id=raw_case.case_id, artifact=artifact,
                                     scheme=options.label_scheme))  # fmt: skip
    dicom = _dicom_seg(original, raw_case, out_dir, artifact=artifact)
    seconds["write"] = time.perf_counter() - start
    return Prediction(case_id=raw_case.case_id, seg=seg_path, volumes=volumes_path,
                      dicom_seg=dicom, canonical=labels, seconds=seconds)  # fmt: skip


def _infer(
    artifact: ModelArtifact, model: torch.nn.Module, case: HarmonisedCase, out_dir: Path, *,
    options: PredictOptions,
) -> NDArray[np.uint8]:  # fmt: skip
    # Through the canonical files, as the sites' validation reads them: the network sees the
    # same float32 values and array order whether a case is validated or predicted.
    with tempfile.TemporaryDirectory(prefix="fedseg-predict-") as scratch:
        folder = out_dir / "canonical" if options.keep_canonical else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{m}.nii.gz" for m in MODALITIES]
        for name, path in zip(MODALITIES, paths, strict=True):
            write_nifti(case.images[name], path, dtype=np.float32)
        image = load_image([str(p) for p in paths])
    # The image stays on the CPU: windows go to the model's device, batch by batch (infer.py).
    return predict_labels(model, image, roi_size=artifact.roi_size, threshold=artifact.threshold,
                          overlap=artifact.overlap, mirror=options.mirror)  # fmt: skip


def _relabel(labels: sitk.Image, values: dict[int, int]) -> sitk.Image:
    array = sitk.GetArrayViewFromImage(labels)
    out = np.zeros(array.shape, dtype=np.uint8)
    for canonical, value in values.items():
        out[array == canonical] = value
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(labels)
    return image


def volumes(
    labels: sitk.Image, *, case_id: str, artifact: ModelArtifact, scheme: str
) -> dict[str, Any]:
    """Each canonical label's and region's volume in ml on the written grid, with the model
    and grid they were measured on."""
    array = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = {v: int(np.count_nonzero(array == v)) for v in CANONICAL_LABELS if v}
    return {
        "case_id": case_id,
        "unit": "ml",
        "labels": {CANONICAL_LABELS[v]: round(n * voxel_ml, 3) for v, n in counts.items()},
        "regions": {
            r: round(sum(counts[v] for v in vs) * voxel_ml, 3) for r, vs in REGIONS.items()
        },
        "grid": {"shape": list(labels.GetSize()), "spacing_mm": list(labels.GetSpacing())},
        "label_scheme": scheme,
        "model": {
            "sha256": artifact.sha256,
            **{k: artifact.provenance.get(k) for k in ("run_id", "final_round", "audit_hash")},
        },
    }


def _dicom_seg(
    labels: sitk.Image, raw_case: RawCase, out_dir: Path, *, artifact: ModelArtifact
) -> Path | None:
    source = raw_case.modalities[MODALITIES[0]]
    if not source.path.is_dir():
        return None  # not a DICOM series
    version = (
        f"fedseg {artifact.provenance.get('fedseg_version', '?')} model {artifact.sha256[:12]}"
    )
    return write_dicom_seg(labels, source.path, out_dir / "seg.dcm",
                           series_uid=source.series_uid, algorithm_version=version)  # fmt: skip


@dataclass(frozen=True)
class CaseFailure:
    """A case of a batch that could not be predicted, and why (the others go on)."""

    case_id: str
    reason: str


def site_cases(
    site_dir: Path, *, layout: str | None = None
) -> tuple[list[RawCase], list[CaseFailure]]:
    """Every complete case of a raw site folder, and the incomplete ones as failures."""
    scan = scan_cases(site_dir, layout or detect_layout(site_dir))
    bad = [CaseFailure(b.case_id, f"{b.file}: {b.reason}") for b in scan.bad]
    return scan.cases, bad


def predict_one_of_many(
    artifact: ModelArtifact, model: torch.nn.Module, raw_case: RawCase, out_dir: Path, *,
    options: PredictOptions,
) -> Prediction | CaseFailure:  # fmt: skip
    """:func:`predict_case` into ``out_dir/<case-id>``; a case whose data is bad becomes a
    :class:`CaseFailure` naming the file, so one corrupt scan never stops a batch."""
    try:
        return predict_case(artifact, model, raw_case, out_dir / raw_case.case_id,
                            options=options)  # fmt: skip
    except DataError as err:
        return CaseFailure(raw_case.case_id, str(err))
