"""Quality control of a harmonised site: what a person looks at before trusting it.

:class:`SiteQC` collects one case at a time as :func:`data_adapters.site.harmonise_site`
writes it, and writes into the site's ``qc/`` folder::

    qc/summary.json                 per case: source geometry, output shape, mask and label
                                    volumes (ml), intensity statistics, registration, flags
    qc/histograms/<modality>.png    intensity histograms of every case, before (as read)
                                    and after harmonisation (z-scores inside the mask)
    qc/overlays/<case-id>.png       axial / coronal / sagittal slices of t1c and t2f with
                                    the labels; the first few cases and every flagged one

QC never stops harmonisation: any failure is logged, recorded in ``summary.json``
under ``errors`` and skipped.  It is kept cheap: histograms use every second voxel
along each axis, plots are small and go through matplotlib's Agg canvas directly
(no pyplot state, no display).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.harmonise import HarmonisedCase
from data_adapters.layouts import MODALITIES

logger = logging.getLogger(__name__)
R = TypeVar("R")

SUMMARY_NAME = "summary.json"
#: Voxel stride of the histograms along each axis (8x fewer voxels, same shape).
HISTOGRAM_STRIDE = 2
HISTOGRAM_BINS = 64
#: Z-score range shown after harmonisation.
ZSCORE_RANGE = (-5.0, 5.0)
OVERLAY_MODALITIES = ("t1c", "t2f")
#: A foreground mask outside this range (ml) is flagged: not a head, or not all of it.
MASK_VOLUME_RANGE_ML = (200.0, 4000.0)
#: Flag a case when more than this fraction of its labelled voxels lies outside the mask.
MAX_LABEL_OUTSIDE_MASK = 0.1
LABEL_COLOURS = {1: "#d62728", 2: "#2ca02c", 3: "#ffdd00"}  # NETC red, SNFH green, ET yellow
#: Overlay pixels per voxel along the finest axis (at least 1).
PANEL_PX_PER_VOXEL = 2


@dataclass
class _Histograms:
    """Per-modality histograms of one case: (bin edges, counts) before and after."""

    case_id: str
    before: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]]
    after: dict[str, npt.NDArray[np.int64]]


@dataclass
class SiteQC:
    """Collects QC of a site case by case; :meth:`finish` writes the site-level files.

    Parameters
    ----------
    qc_dir
        The site's ``qc/`` folder (created if needed).
    overlays
        Overlays are drawn for the first ``overlays`` cases, and for flagged ones.
    """

    qc_dir: Path
    overlays: int = 3
    cases: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    _histograms: list[_Histograms] = field(default_factory=list)

    def add_case(self, case: HarmonisedCase) -> None:
        """Summarise one harmonised case, keep its histograms, draw its overlay if due."""
        start = time.perf_counter()
        summary = self._guard(case.case_id, "summary", lambda: case_summary(case))
        if summary is not None:
            self.cases.append(summary)
            flagged = bool(summary.get("flags"))
            if len(self.cases) <= self.overlays or flagged:
                path = self.qc_dir / "overlays" / f"{case.case_id}.png"
                self._guard(case.case_id, "overlay", lambda: plot_overlay(case, path, summary))
        histograms = self._guard(case.case_id, "histogram", lambda: _case_histograms(case))
        if histograms is not None:
            self._histograms.append(histograms)
        self.seconds += time.perf_counter() - start

    def finish(self) -> Path | None:
        """Write the histogram plots and ``summary.json``; return its path (None if it failed)."""
        start = time.perf_counter()
        for modality in MODALITIES:
            target = self.qc_dir / "histograms" / f"{modality}.png"
            self._guard(
                "*", "histogram", partial(plot_histograms, self._histograms, modality, target)
            )
        self.seconds += time.perf_counter() - start
        return self._guard("*", "summary.json", self._write_summary)

    def _write_summary(self) -> Path:
        summary = {
            "cases": self.cases,
            "errors": self.errors,
            "n_cases": len(self.cases),
            "flagged": [c["case_id"] for c in self.cases if c.get("flags")],
            "qc_seconds": round(self.seconds, 3),
            "qc_seconds_per_case": round(self.seconds / max(1, len(self.cases)), 3),
        }
        path = self.qc_dir / SUMMARY_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return path

    def _guard(self, case_id: str, stage: str, work: Callable[[], R]) -> R | None:
        """Run one QC task; log and record any failure instead of raising it."""
        try:
            return work()
        except Exception as err:  # QC must never break harmonisation, whatever went wrong
            logger.warning("QC %s failed for %s: %s", stage, case_id, err)
            logger.debug("%s", traceback.format_exc())
            self.errors.append({"case_id": case_id, "stage": stage, "error": repr(err)})
            return None


def case_summary(case: HarmonisedCase) -> dict[str, Any]:
    """QC record of one case (JSON-ready): geometry, volumes, intensities, registration, flags."""
    voxel_ml = float(np.prod(case.grid.spacing)) / 1000.0
    mask = sitk.GetArrayViewFromImage(case.mask) > 0
    labels: dict[str, Any] = {}
    outside = 0.0
    if case.seg is not None:
        seg = sitk.GetArrayViewFromImage(case.seg)
        counts = np.bincount(seg.ravel(), minlength=4)
        labels = {str(v): int(counts[v]) for v in (1, 2, 3)}
        labelled = int(counts[1:].sum())
        outside = float(np.count_nonzero((seg > 0) & ~mask)) / labelled if labelled else 0.0
    summary: dict[str, Any] = {
        "case_id": case.case_id,
        "labelled": case.seg is not None,
        "source": {
            role: {"shape": list(g.shape), "spacing": list(g.spacing), "axcodes": g.axcodes}
            for role, g in case.source_geometry.items()
        },
        "output_shape": list(case.grid.size),
        "output_spacing": list(case.grid.spacing),
        "mask_volume_ml": int(np.count_nonzero(mask)) * voxel_ml,
        "intensity_before_normalisation": _zscore_statistics(case),
        "label_voxels": labels,
        "label_volumes_ml": {k: n * voxel_ml for k, n in labels.items()},
        "label_fraction_outside_mask": outside,
        "registration": _registration(case),
    }
    summary["flags"] = _flags(summary)
    return summary


def plot_overlay(case: HarmonisedCase, path: Path, summary: dict[str, Any]) -> None:
    """Axial, coronal and sagittal slices of t1c (top row) and t2f with the labels in colour.

    Slices go through the labels' centre when there are labels, the grid's centre
    otherwise.  Every panel shows R (axial, coronal) or A (sagittal) to the right and
    A (axial) or S upwards, in square millimetres.  Drawn as one pixel mosaic with
    Pillow (which matplotlib ships with): a few milliseconds, against a quarter of a
    second for a matplotlib figure of six panels.
    """
    from PIL import Image, ImageDraw

    seg = None if case.seg is None else sitk.GetArrayViewFromImage(case.seg)
    shape = np.array(sitk.GetArrayViewFromImage(case.mask).shape)  # (S, A, R)
    centre = shape // 2
    if seg is not None and seg.any():
        centre = np.round(np.argwhere(seg > 0).mean(axis=0)).astype(int)
    k, j, i = (int(v) for v in centre)
    sx, sy, sz = case.grid.spacing
    # Slicer into (S, A, R) arrays, and the (row, column) spacing in mm.
    views: list[tuple[tuple[int | slice, ...], tuple[float, float]]] = [
        ((k, slice(None), slice(None)), (sy, sx)),
        ((slice(None), j, slice(None)), (sz, sx)),
        ((slice(None), slice(None), i), (sz, sy)),
    ]
    rows = []
    for modality in OVERLAY_MODALITIES:
        volume = sitk.GetArrayViewFromImage(case.images[modality])
        panels = [
            _panel(volume[where], None if seg is None else seg[where], mm) for where, mm in views
        ]
        rows.append(_hstack(panels))
    mosaic = _vstack([np.zeros((14, 1, 3), np.uint8), *rows])
    image = Image.fromarray(mosaic)
    flags = ", ".join(summary.get("flags", [])) or "none"
    caption = f"{case.case_id}  t1c / t2f  axial k={k} coronal j={j} sagittal i={i}  flags: {flags}"
    ImageDraw.Draw(image).text((2, 1), caption, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _panel(
    image: npt.NDArray[Any], labels: npt.NDArray[Any] | None, mm: tuple[float, float]
) -> npt.NDArray[np.uint8]:
    """One slice as RGB, labels blended in, flipped so the second axis points up, ~1 px/mm."""
    grey = np.clip((np.asarray(image, np.float32) + 3.0) / 7.0, 0.0, 1.0)  # z-score window
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        for value, colour in LABEL_COLOURS.items():
            where = labels == value
            rgb[where] = 0.55 * rgb[where] + 0.45 * np.array(_rgb(colour))
    scale = [max(1, round(s / min(mm) * PANEL_PX_PER_VOXEL)) for s in mm]
    rgb = np.repeat(np.repeat(rgb, scale[0], axis=0), scale[1], axis=1)
    return np.asarray(rgb[::-1] * 255, dtype=np.uint8)


def _hstack(panels: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)


def _vstack(rows: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)


def _rgb(colour: str) -> tuple[float, float, float]:
    value = int(colour.lstrip("#"), 16)
    return ((value >> 16) / 255.0, ((value >> 8) & 255) / 255.0, (value & 255) / 255.0)


def plot_histograms(histograms: list[_Histograms], modality: str, path: Path) -> None:
    """One PNG for ``modality``: every case's histogram before and after harmonisation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.4), dpi=72)
    FigureCanvasAgg(figure)
    before, after = figure.subplots(1, 2)
    for ax in (before, after):
        ax.locator_params(nbins=4)  # tick labels are most of the drawing time
    z_edges = np.linspace(*ZSCORE_RANGE, HISTOGRAM_BINS + 1)
    for case in histograms:
        edges, counts = case.before[modality]
        before.stairs(_log_density(counts, edges), edges, label=case.case_id, baseline=None)
        after.stairs(_log_density(case.after[modality], z_edges), z_edges, baseline=None)
    before.set_title(f"{modality} as read (all voxels)", fontsize=9)
    before.set_xlabel("source intensity", fontsize=8)
    after.set_title(f"{modality} harmonised (inside the mask)", fontsize=9)
    after.set_xlabel("z-score", fontsize=8)
    # log10 on a linear axis: a log axis costs matplotlib's mathtext for every tick label.
    before.set_ylabel("log10 density", fontsize=8)
    for ax in (before, after):
        ax.tick_params(labelsize=7)
    if 0 < len(histograms) <= 12:
        before.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def _case_histograms(case: HarmonisedCase) -> _Histograms:
    """Histograms on every HISTOGRAM_STRIDE-th voxel: source range up to its p99.9."""
    s = slice(None, None, HISTOGRAM_STRIDE)
    inside = sitk.GetArrayViewFromImage(case.mask)[s, s, s] > 0
    before, after = {}, {}
    for modality in MODALITIES:
        raw = sitk.GetArrayViewFromImage(case.raw_images[modality])[s, s, s]
        low, high = float(raw.min()), float(np.percentile(raw, 99.9))
        counts, edges = np.histogram(raw, bins=HISTOGRAM_BINS, range=(low, max(high, low + 1e-6)))
        before[modality] = (edges, counts)
        z = sitk.GetArrayViewFromImage(case.images[modality])[s, s, s][inside]
        after[modality] = np.histogram(z, bins=HISTOGRAM_BINS, range=ZSCORE_RANGE)[0]
    return _Histograms(case.case_id, before, after)


def _log_density(
    counts: npt.NDArray[np.int64], edges: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """log10 of the histogram density; empty bins are NaN (a gap in the line)."""
    density = counts / (max(1, int(counts.sum())) * np.diff(edges))
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, np.log10(density), np.nan)


def _zscore_statistics(case: HarmonisedCase) -> dict[str, dict[str, float]]:
    """Mean / std inside the mask before z-scoring, as the zscore step recorded them."""
    for step in case.steps:
        if step.name == "zscore":
            images = step.params.get("images", {})
            return {
                name: {"mean": float(p["mean"]), "std": float(p["std"])}
                for name, p in images.items()
            }
    return {}


def _registration(case: HarmonisedCase) -> dict[str, dict[str, Any]]:
    for step in case.steps:
        if step.name == "register":
            keep = ("registered", "automatic", "overlap", "rotation_deg", "translation_mm")
            return {
                name: {k: record[k] for k in keep if k in record}
                for name, record in step.params.get("images", {}).items()
            }
    return {}


def _flags(summary: dict[str, Any]) -> list[str]:
    """Reasons a person should look at this case."""
    flags = [
        f"registered_automatically:{name}"
        for name, record in summary["registration"].items()
        if record.get("automatic")
    ]
    low, high = MASK_VOLUME_RANGE_ML
    if not low <= summary["mask_volume_ml"] <= high:
        flags.append("mask_volume_implausible")
    if summary["labelled"] and not any(summary["label_voxels"].values()):
        flags.append("empty_label")
    if summary["label_fraction_outside_mask"] > MAX_LABEL_OUTSIDE_MASK:
        flags.append("label_outside_mask")
    return flags
