"""A site's own report of its harmonised dataset: ``site_report.html``, for the site only.

It is built from a canonical site folder (``manifest.json`` and what ``fedseg harmonise``
wrote under ``qc/``) and embeds QC overlays, which are slices of patients' scans: it says so
in a banner at the top and must never be sent to the server. The server's report
(:mod:`evaluation.report`) is built from ``metrics.json`` only.

QC is optional (``fedseg harmonise --no-qc``) and written best-effort, so a missing or
unreadable QC file becomes a note in the report; only an unreadable manifest is an error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_adapters.labels import CANONICAL_LABELS
from data_adapters.manifest import SiteManifest, load_manifest
from evaluation.report_html import PNG_SIGNATURE, Markup, esc, facts_list, figure, page, table

SITE_REPORT_NAME = "site_report.html"
BANNER = (
    "Contains images of patients of {site}. For use inside {site} only: this file must not "
    "leave the site and is never sent to the federation server."
)
#: Label columns of the volume table: canonical value -> name (background left out).
TUMOUR_LABELS = {str(v): name for v, name in CANONICAL_LABELS.items() if v}
MODALITY_ORDER = ("t1n", "t1c", "t2w", "t2f")
GEOMETRY_COLUMNS = ("shape", "spacing", "origin", "direction", "axcodes")


def write_site_report(site_dir: Path, *, out: Path | None = None) -> Path:
    """Write ``site_report.html`` for the canonical site in ``site_dir`` (into ``out``)."""
    html = site_report_html(site_dir)
    target = (out or site_dir) / SITE_REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(html, encoding="utf-8")
    return target


def site_report_html(site_dir: Path) -> str:
    """The site report as one self-contained HTML page (raises DataError for a bad manifest)."""
    manifest = load_manifest(site_dir)
    qc_dir = site_dir / "qc"
    summary, summary_note = _read_summary(qc_dir / "summary.json")
    per_case = {str(c.get("case_id")): c for c in summary.get("cases", []) if isinstance(c, dict)}
    split = _split_of(manifest)
    sections = [
        ("cases", "Cases and split", _cases(manifest, split, per_case, summary_note)),
        ("geometry", "Source geometry", _geometry(qc_dir / "geometry.csv")),
        ("volumes", "Label volumes per case", _volumes(per_case, split, summary_note)),
        ("histograms", "Intensity histograms", _histograms(qc_dir / "histograms")),
        ("overlays", "Overlays of cases", _overlays(qc_dir / "overlays", split)),
        ("problems", "Skipped cases and QC errors", _problems(manifest, summary)),
        ("parameters", "Harmonisation parameters", _parameters(manifest)),
    ]
    return page(
        f"Site report: {manifest.site}",
        sections,
        intro=_intro(manifest),
        banner=BANNER.format(site=manifest.site),
        footer=f"Written from {site_dir}; stays at {manifest.site}.",
    )


def _read_summary(path: Path) -> tuple[dict[str, Any], str]:
    """``qc/summary.json`` and an empty note, or ``{}`` and why it could not be used."""
    if not path.is_file():
        return {}, f"{path.name} not found: harmonised without QC (--no-qc) or QC failed."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"{path.name} could not be read: {err}"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name} is not a JSON object.")


def _split_of(manifest: SiteManifest) -> dict[str, str]:
    split = {c: "train" for c in manifest.split.train}
    split |= {c: "validation" for c in manifest.split.validation}
    # Labelled cases outside both lists should not exist; "-" shows it if one does.
    return {
        c.case_id: split.get(c.case_id, "-" if c.labelled else "unlabelled") for c in manifest.cases
    }


def _intro(manifest: SiteManifest) -> Markup:
    spacing = " x ".join(f"{v:g}" for v in manifest.target_spacing_mm)
    return facts_list(
        [
            ("site", manifest.site),
            (
                "dataset fingerprint",
                Markup(f'<span class="mono">{esc(manifest.fingerprint)}</span>'),
            ),
            ("harmonised", f"{manifest.created} by fedseg {manifest.fedseg_version}"),
            ("target spacing", f"{spacing} mm"),
            ("modalities", ", ".join(manifest.modalities)),
            ("label scheme", manifest.label_scheme),
            ("raw data", manifest.source_root),
        ]
    )


def _cases(
    manifest: SiteManifest, split: dict[str, str], per_case: dict[str, Any], note: str
) -> Markup:
    counts = (
        f"{len(manifest.cases)} harmonised cases: {len(manifest.split.train)} training, "
        f"{len(manifest.split.validation)} validation "
        f"(fraction {manifest.split.validation_fraction:g}, seed {manifest.split.seed}); "
        f"{len(manifest.skipped)} skipped."
    )
    rows = []
    for case in manifest.cases:
        qc = per_case.get(case.case_id, {})
        mask = qc.get("mask_volume_ml")
        rows.append(
            [
                case.case_id,
                split[case.case_id],
                "yes" if case.labelled else "no",
                " x ".join(map(str, case.output_shape)),
                _ml(mask, digits=0),
                ", ".join(map(str, qc.get("flags") or [])) or "—",
            ]
        )
    headers = ["case", "split", "labelled", "canonical shape", "head mask (ml)", "QC flags"]
    return Markup(f"<p>{esc(counts)}</p>" + _note(note) + table(headers, rows))


def _geometry(path: Path) -> Markup:
    """``qc/geometry.csv``: each source grid before any step, one row per case and grid."""
    if not path.is_file():
        return _note(f"{path.name} not found.")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return _note(f"{path.name} could not be read: {err}")
    # Images of a case usually share one grid: one row per grid keeps the table readable
    # (the source paths, long DICOM series names included, are in manifest.json).
    grids: dict[tuple[str, ...], list[str]] = {}
    for record in records:
        key = tuple(record.get(c) or "" for c in ("case_id", *GEOMETRY_COLUMNS))
        grids.setdefault(key, []).append(record.get("image") or "?")
    rows = [[key[0], ", ".join(images), *key[1:]] for key, images in grids.items()]
    headers = ["case", "images", "shape", "spacing (mm)", "origin (mm)", "direction", "axes"]
    return table(headers, rows) if rows else _note(f"{path.name} lists no image.")


def _volumes(per_case: dict[str, Any], split: dict[str, str], note: str) -> Markup:
    if not per_case:
        return _note(note or "No case in qc/summary.json.")
    headers = ["case", "split", *(f"{n} (ml)" for n in TUMOUR_LABELS.values()), "WT (ml)"]
    rows = []
    for case_id, qc in per_case.items():
        volumes = qc.get("label_volumes_ml") or {}
        values = [volumes.get(label) for label in TUMOUR_LABELS]
        numbers = [v for v in values if isinstance(v, int | float)]
        total = sum(numbers) if numbers else None  # unlabelled cases have no volumes
        cells = [_ml(v) for v in values]
        rows.append([case_id, split.get(case_id, "?"), *cells, _ml(total)])
    return table(headers, rows)


def _histograms(folder: Path) -> Markup:
    order = {m: i for i, m in enumerate(MODALITY_ORDER)}
    pngs = sorted(folder.glob("*.png"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    return _gallery(
        pngs,
        caption=lambda stem: f"{stem}: every case's intensities as read and after harmonisation.",
        empty="No histograms in qc/histograms/.",
        wide=True,  # two panels per image: two images per row
    )


def _overlays(folder: Path, split: dict[str, str]) -> Markup:
    pngs = sorted(folder.glob("*.png"))
    intro = _note(
        "Mid slices of t1c and t2f with the labels: the first cases and every "
        "flagged one. NETC red, SNFH green, ET yellow."
    )
    gallery = _gallery(
        pngs,
        caption=lambda stem: f"{stem} ({split.get(stem, 'not in the manifest')})",
        empty="No overlays in qc/overlays/.",
    )
    return Markup(intro + gallery)


def _gallery(
    pngs: list[Path], *, caption: Callable[[str], str], empty: str, wide: bool = False
) -> Markup:
    """Embed each PNG; a file that is not a PNG is named, not embedded."""
    if not pngs:
        return _note(empty)
    parts, refused = [], []
    for png in pngs:
        data = png.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            refused.append(png.name)
            continue
        parts.append(figure(data, caption=caption(png.stem)))
    notes = _note(f"Not PNG files, left out: {', '.join(refused)}") if refused else ""
    classes = "gallery wide" if wide else "gallery"
    return Markup(f'<div class="{classes}">{"".join(parts)}</div>{notes}')


def _problems(manifest: SiteManifest, summary: dict[str, Any]) -> Markup:
    parts = []
    if manifest.skipped:
        rows = [[s.case_id, s.file, s.reason] for s in manifest.skipped]
        parts.append(table(["case", "file", "reason"], rows))
    errors = [e for e in summary.get("errors", []) if isinstance(e, dict)]
    if errors:
        keys = sorted({k for e in errors for k in e})
        parts.append(table(keys, [[e.get(k, "") for k in keys] for e in errors]))
    return Markup("".join(parts)) if parts else _note("No case skipped, no QC error.")


def _parameters(manifest: SiteManifest) -> Markup:
    rows = [
        [key, Markup(f'<td class="mono">{esc(json.dumps(value))}</td>')]
        for key, value in manifest.parameters.items()
    ]
    return table(["parameter", "value"], rows)


def _ml(value: Any, *, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def _note(text: str) -> Markup:
    return Markup(f'<p class="note">{esc(text)}</p>') if text else Markup("")
