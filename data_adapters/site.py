"""Harmonise a whole raw site folder into the canonical layout.

Output (see DESIGN.md, "Canonical data")::

    out_dir/manifest.json
    out_dir/cases/<case-id>/{t1n,t1c,t2w,t2f}.nii.gz   float32, z-scored, RAS
    out_dir/cases/<case-id>/seg.nii.gz                  uint8, labels 0-3 (labelled cases)
    out_dir/qc/geometry.csv                             source geometry of every file
    out_dir/qc/skipped.csv                              cases left out and why
    out_dir/qc/summary.json, histograms/, overlays/     site QC (see data_adapters.qc)

Everything is written into a hidden sibling folder first and renamed into
place at the end, so a failure halfway leaves an existing ``out_dir`` as it was.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from data_adapters.errors import DataError, SkippedCase
from data_adapters.geometry import Geometry
from data_adapters.harmonise import (
    CaseOptions,
    HarmonisedCase,
    harmonisation_parameters,
    harmonise_case,
)
from data_adapters.labels import CANONICAL_SCHEME
from data_adapters.layouts import MODALITIES, CaseScan, RawCase, detect_layout, scan_cases
from data_adapters.manifest import (
    CASES_DIR,
    MANIFEST_NAME,
    CaseRecord,
    SiteManifest,
    SourceFile,
    Split,
    compute_fingerprint,
    fedseg_version,
    write_manifest,
)
from data_adapters.qc import SiteQC
from data_adapters.sources import source_sha256
from data_adapters.writers import write_nifti

Progress = Callable[[str], None]


@dataclass(frozen=True)
class HarmoniseResult:
    """What :func:`harmonise_site` wrote: the folder, its manifest, the skipped cases."""

    out_dir: Path
    manifest: SiteManifest
    skipped: list[SkippedCase]


def harmonise_site(
    raw_dir: Path,
    out_dir: Path,
    *,
    layout: str | None = None,
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    validation_fraction: float = 0.25,
    seed: int = 0,
    strict: bool = False,
    site_name: str | None = None,
    progress: Progress | None = None,
    register: bool = False,
    min_size: int | Sequence[int] = 0,
    min_shape_mm: float | Sequence[float] = 0.0,
    qc: bool = True,
    qc_overlays: int = 3,
) -> HarmoniseResult:
    """Turn a raw site folder into a canonical harmonised site folder.

    Parameters
    ----------
    raw_dir
        Raw site folder, one sub-folder per case.
    out_dir
        Destination; replaced only on success, and only if it is empty or a
        previous harmonised site.
    layout
        Layout name (see :data:`data_adapters.layouts.LAYOUTS`); detected if None.
    target_spacing
        Output voxel size in mm along R, A, S.
    validation_fraction, seed
        Validation gets ``round(fraction * n_labelled)`` cases (at least 1 when
        there are 2 or more, never all), drawn with ``seed`` over sorted ids.
    strict
        Raise on the first bad case instead of skipping it.
    site_name
        Defaults to ``raw_dir``'s name.
    progress
        Called with one line per case.
    register
        Rigidly register every modality onto t1n (see
        :func:`data_adapters.harmonise.harmonise_case`; modalities whose world
        box misses t1n's are registered in any case).
    min_size, min_shape_mm
        Pad every case to at least this many voxels / mm per axis (0: no minimum).
    qc, qc_overlays
        Write ``qc/summary.json``, histograms and overlays of the first
        ``qc_overlays`` cases (and flagged ones); a QC failure is recorded there,
        never raised.

    Raises
    ------
    DataError
        For an unusable raw folder or destination, a bad case when ``strict``,
        or when no labelled case could be harmonised.
    """
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not 0.0 <= validation_fraction <= 1.0:
        raise DataError(
            raw_dir, f"validation fraction must be in [0, 1], got {validation_fraction}"
        )
    options = CaseOptions(register=register, min_size=min_size, min_shape_mm=min_shape_mm)
    try:
        options.check()
    except ValueError as err:
        raise DataError(raw_dir, str(err)) from err
    layout = layout or detect_layout(raw_dir)
    scan = scan_cases(raw_dir, layout)
    if strict and scan.bad:
        raise DataError(scan.bad[0].file, scan.bad[0].reason)
    for bad in scan.bad:
        _report(progress, f"{bad.case_id}: skipped ({bad.file}: {bad.reason})")
    _check_destination(raw_dir, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so the final rename is atomic;
    # mkdir (unlike mkdtemp) leaves the permissions to the umask.
    staging = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        site_qc = SiteQC(staging / "qc", overlays=qc_overlays) if qc else None
        records, skipped = _harmonise_cases(
            scan, staging, target_spacing=target_spacing, options=options, strict=strict,
            progress=progress, site_qc=site_qc,
        )  # fmt: skip
        if site_qc is not None:
            site_qc.finish()
        manifest = _build_manifest(
            records,
            skipped,
            raw_dir=raw_dir,
            site=site_name or raw_dir.name,
            target_spacing=target_spacing,
            options=options,
            validation_fraction=validation_fraction,
            seed=seed,
        )
        write_manifest(manifest, staging)
        _write_skipped_csv(staging / "qc" / "skipped.csv", skipped)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return HarmoniseResult(out_dir, replace(manifest, site_dir=out_dir), skipped)


def make_split(labelled: Sequence[str], *, validation_fraction: float, seed: int) -> Split:
    """Seeded train / validation split of the labelled case ids.

    ``round(validation_fraction * n)`` validation cases (Python rounding), at
    least 1 when ``n >= 2`` and at most ``n - 1`` so training is never empty;
    except that a fraction of 1 holds every case out: an evaluation-only site.
    """
    ids = sorted(labelled)
    n = len(ids)
    if validation_fraction >= 1.0:
        return Split(seed, 1.0, (), tuple(ids))
    n_val = min(max(round(validation_fraction * n), 1), n - 1) if n >= 2 else 0
    chosen = np.random.default_rng(seed).permutation(n)[:n_val]
    validation = sorted(ids[i] for i in chosen)
    train = [c for c in ids if c not in set(validation)]
    return Split(seed, float(validation_fraction), tuple(train), tuple(validation))


def _harmonise_cases(
    scan: CaseScan,
    staging: Path,
    *,
    target_spacing: Sequence[float],
    options: CaseOptions,
    strict: bool,
    progress: Progress | None,
    site_qc: SiteQC | None = None,
) -> tuple[list[CaseRecord], list[SkippedCase]]:
    """Harmonise and write every case; bad ones are skipped (or raised when strict)."""
    records: list[CaseRecord] = []
    skipped = list(scan.bad)
    geometry_rows: list[list[str]] = []
    total = len(scan.cases)
    for index, raw_case in enumerate(scan.cases, start=1):
        try:
            record, rows, case = _harmonise_one(
                raw_case, staging, target_spacing=target_spacing, options=options
            )
        except DataError as err:
            if strict:
                raise
            skipped.append(SkippedCase.from_error(raw_case.case_id, err))
            _report(progress, f"[{index}/{total}] {raw_case.case_id}: skipped ({err})")
            continue
        records.append(record)
        geometry_rows.extend(rows)
        if site_qc is not None:
            site_qc.add_case(case)
        del case  # one case in memory at a time
        _report(progress, f"[{index}/{total}] {raw_case.case_id}: done")
    _write_geometry_csv(staging / "qc" / "geometry.csv", geometry_rows)
    return records, skipped


def _harmonise_one(
    raw_case: RawCase, staging: Path, *, target_spacing: Sequence[float], options: CaseOptions
) -> tuple[CaseRecord, list[list[str]], HarmonisedCase]:
    """Harmonise one case into ``staging/cases/<id>``; return its record, QC rows and itself."""
    sources = raw_case.sources()
    try:
        # MSD's four modalities share one 4D file: hash each distinct file or series once.
        by_source = {
            s: source_sha256(s) for s in {replace(s, channel=None) for s in sources.values()}
        }
        hashes = {role: by_source[replace(s, channel=None)] for role, s in sources.items()}
        case = harmonise_case(
            raw_case, target_spacing=target_spacing, margin_mm=options.margin_mm,
            register=options.register, min_overlap=options.min_overlap,
            min_size=options.min_size, min_shape_mm=options.min_shape_mm,
            registration_seed=options.registration_seed,
        )  # fmt: skip
    except (RuntimeError, OSError) as err:
        # SimpleITK reports odd images (e.g. non-orthonormal directions) as RuntimeError.
        folder = raw_case.modalities[MODALITIES[0]].path.parent
        raise DataError(folder, f"cannot process case: {err}") from err
    case_dir = staging / CASES_DIR / raw_case.case_id
    _write_case(case, case_dir)
    record = CaseRecord(
        case_id=raw_case.case_id,
        labelled=raw_case.labelled,
        source_label_scheme=raw_case.label_scheme,
        sources={
            role: SourceFile(source.relative_to(raw_case.root), hashes[role])
            for role, source in sources.items()
        },
        original_geometry=case.original_geometry,
        steps=case.steps,
        output_shape=tuple(int(n) for n in case.grid.size),
    )
    rows = [
        _geometry_row(
            raw_case.case_id, role, source.relative_to(raw_case.root), case.source_geometry[role]
        )
        for role, source in sources.items()
    ]
    return record, rows, case


def _write_case(case: HarmonisedCase, case_dir: Path) -> None:
    case_dir.mkdir(parents=True)
    for name in MODALITIES:
        write_nifti(case.images[name], case_dir / f"{name}.nii.gz", dtype=np.float32)
    if case.seg is not None:
        write_nifti(case.seg, case_dir / "seg.nii.gz", dtype=np.uint8)


def _build_manifest(
    records: list[CaseRecord],
    skipped: list[SkippedCase],
    *,
    raw_dir: Path,
    site: str,
    target_spacing: Sequence[float],
    options: CaseOptions,
    validation_fraction: float,
    seed: int,
) -> SiteManifest:
    labelled = [r.case_id for r in records if r.labelled]
    if not labelled:
        raise DataError(
            raw_dir,
            f"no labelled case could be harmonised ({len(records)} unlabelled, "
            f"{len(skipped)} skipped"
            + (f"; first: {skipped[0].file}: {skipped[0].reason})" if skipped else ")"),
        )
    parameters = harmonisation_parameters(target_spacing=target_spacing, options=options)
    parameters["split"] = {"seed": seed, "validation_fraction": float(validation_fraction)}
    return SiteManifest(
        site=site,
        fedseg_version=fedseg_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        target_spacing_mm=tuple(float(s) for s in target_spacing),
        modalities=MODALITIES,
        label_scheme=CANONICAL_SCHEME,
        source_root=str(raw_dir),
        parameters=parameters,
        split=make_split(labelled, validation_fraction=validation_fraction, seed=seed),
        cases=records,
        skipped=skipped,
        fingerprint=compute_fingerprint(records, parameters),
    )


_GEOMETRY_COLUMNS = [
    "case_id",
    "image",
    "path",
    "shape",
    "spacing",
    "origin",
    "direction",
    "axcodes",
]


def _geometry_row(case_id: str, role: str, source: str, g: Geometry) -> list[str]:
    return [
        case_id,
        role,
        source,
        "x".join(str(n) for n in g.shape),
        " ".join(f"{v:.6g}" for v in g.spacing),
        " ".join(f"{v:.6g}" for v in g.origin),
        " ".join(f"{v:.6g}" for v in g.direction),
        g.axcodes,
    ]


def _write_geometry_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(_GEOMETRY_COLUMNS)
        writer.writerows(rows)


def _write_skipped_csv(path: Path, skipped: list[SkippedCase]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case_id", "file", "reason"])
        writer.writerows([s.case_id, s.file, s.reason] for s in skipped)


def _check_destination(raw_dir: Path, out_dir: Path) -> None:
    """Refuse destinations whose replacement could destroy raw data or unrelated files."""
    if out_dir == raw_dir or raw_dir.is_relative_to(out_dir):
        raise DataError(out_dir, f"output folder would replace the raw data in {raw_dir}")
    if out_dir.is_relative_to(raw_dir):
        raise DataError(out_dir, "output folder must not be inside the raw site folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(out_dir, "output path exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise DataError(
                out_dir, "output folder is not empty and not a harmonised site; not replacing it"
            )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, swapping out an existing one only at the end."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    backup = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, backup)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _report(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)
