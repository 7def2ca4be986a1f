"""The run report's figures, drawn from ``metrics.json`` only (never from images of cases).

Every function writes one PNG and returns its path; figures are closed at once so a long
server process does not accumulate them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers without a display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import ScalarFormatter

from evaluation.regions import REGION_NAMES

if TYPE_CHECKING:  # only the type: evaluation.report imports this module
    from evaluation.report import CrossSite

DPI = 110
METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)"}
POOLED_STYLE: dict[str, Any] = {"color": "black", "lw": 2, "ls": "--", "label": "pooled"}
Whiskers = tuple[float, float, float]  # mean, p5, p95


@dataclass(frozen=True, kw_only=True)
class Figures:
    """The PNGs of a run report: learning curves per metric, final bars, cross-site heatmaps."""

    learning: dict[str, Path]
    final: Path | None
    cross_site: list[tuple[str, Path]]  # (caption, png)

    def all(self) -> list[Path]:
        """Every PNG, in the order the report shows them."""
        rest = [self.final] if self.final else []
        return [*self.learning.values(), *rest, *(png for _, png in self.cross_site)]


def draw_figures(
    metrics: dict[str, Any],
    out: Path,
    *,
    final_bars: Sequence[tuple[str, dict[str, Whiskers | None]]],
    cross_site: CrossSite | None,
) -> Figures:
    """Draw every figure of a run report into ``out``."""
    learning = {
        metric: plot_learning_curves(metrics, out / f"learning_curves{suffix}.png", metric=metric)
        for metric, suffix in (("dice", ""), ("hd95", "_hd95"))
    }
    final = plot_final_bars(final_bars, out / "final_dice.png") if final_bars else None
    cross: list[tuple[str, Path]] = []
    for metric, by_region in (cross_site.matrices if cross_site else {}).items():
        label = METRIC_LABELS.get(metric, metric)
        for region, matrix in by_region.items():
            assert cross_site is not None
            png = plot_cross_site(
                matrix,
                models=cross_site.models,
                sites=cross_site.sites,
                title=f"{region} {label}",
                out=out / f"cross_site_{metric}_{region}.png",
                limits=(0.0, 1.0) if metric == "dice" else None,
            )
            cross.append((f"{region} {label}: trained on (rows), evaluated at (columns)", png))
    return Figures(learning=learning, final=final, cross_site=cross)


def plot_learning_curves(metrics: dict[str, Any], out: Path, *, metric: str = "dice") -> Path:
    """One panel per region: each site's validation ``metric`` per round, and the pooled value.

    HD95 uses a symmetric log axis: it falls from ~80 mm to a few mm over a run (and an empty
    prediction scores 373 mm), which a linear axis would squash into the bottom row.
    """
    rounds = [r for r in metrics.get("rounds", []) if r.get("sites")]
    sites = sorted({s for r in rounds for s in r["sites"]})
    fig, axes = plt.subplots(1, len(REGION_NAMES), figsize=(4.2 * len(REGION_NAMES), 3.6))
    label = METRIC_LABELS.get(metric, metric)
    for ax, region in zip(axes, REGION_NAMES, strict=True):
        for site in sites:
            points = [(r["round"], r["sites"].get(site)) for r in rounds]
            _plot_series(ax, points, metric, region, marker="o", ms=3, label=site)
        pooled = [(r["round"], r.get("pooled")) for r in rounds]
        _plot_series(ax, pooled, metric, region, **POOLED_STYLE)
        ax.set(title=f"{region} {label} (own validation cases)", xlabel="round")
        if metric == "dice":
            ax.set_ylim(0, 1)
        else:
            ax.set_yscale("symlog", linthresh=1.0)
            ax.yaxis.set_major_formatter(ScalarFormatter())  # 10, 100, not 10^1, 10^2
        ax.grid(alpha=0.3)
        if not rounds:
            ax.text(0.5, 0.5, "no validation results", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel(label)
    if rounds:
        axes[-1].legend(loc="lower right" if metric == "dice" else "upper right", fontsize=8)
    return save_figure(fig, out)


def _plot_series(
    ax: Axes, points: Sequence[tuple[int, Any]], metric: str, region: str, **style: Any
) -> None:
    """Plot the rounds where the entry holds a number (a withheld site simply has a gap)."""
    xy = [(x, value) for x, entry in points if (value := _value(entry, metric, region)) is not None]
    if xy:
        ax.plot(*zip(*xy, strict=True), **style)


def _value(entry: Any, metric: str, region: str) -> float | None:
    if not isinstance(entry, dict):
        return None
    value = (entry.get(metric) or {}).get(region)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def plot_final_bars(
    rows: Sequence[tuple[str, dict[str, Whiskers | None]]], out: Path, *, metric: str = "dice"
) -> Path:
    """Grouped bars of the final round: one group per site (and pooled), one bar per region.

    ``rows`` holds, per name, ``region -> (mean, low, high)``; ``low``/``high`` are the p5/p95
    whiskers when the site reported a summary, else equal to the mean (no whisker drawn).
    """
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 3.6))
    width = 0.8 / len(REGION_NAMES)
    for i, region in enumerate(REGION_NAMES):
        xs: list[float] = []
        means: list[float] = []
        errs: tuple[list[float], list[float]] = ([], [])
        for x, (_, values) in enumerate(rows):
            if (value := values.get(region)) is None:
                continue
            mean, low, high = value
            xs.append(x + (i - (len(REGION_NAMES) - 1) / 2) * width)
            means.append(mean)
            errs[0].append(max(0.0, mean - low))
            errs[1].append(max(0.0, high - mean))
        spread = any(errs[0]) or any(errs[1])  # no empty caps where no site sent a summary
        ax.bar(xs, means, width, yerr=errs if spread else None, capsize=2, label=region)
    for x, (_, values) in enumerate(rows):
        if all(v is None for v in values.values()):  # e.g. withheld: too few cases at the site
            ax.text(x, 0.05, "not reported", ha="center", rotation=90, fontsize=8, color="grey")
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=20, ha="right")
    whiskers = any(v is not None and v[1] != v[2] for _, values in rows for v in values.values())
    title = "Final round: mean" + (" (whiskers: p5-p95 over cases)" if whiskers else "")
    ax.set(ylabel=METRIC_LABELS.get(metric, metric), title=title)
    if metric == "dice":
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(REGION_NAMES), loc="lower left")
    return save_figure(fig, out)


def plot_cross_site(
    matrix: Sequence[Sequence[float | None]],
    *,
    models: Sequence[str],
    sites: Sequence[str],
    title: str,
    out: Path,
    limits: tuple[float, float] | None = (0.0, 1.0),
) -> Path:
    """A heatmap with every value written in its cell: model trained on row -> site column.

    Cells where the model's name is the evaluation site (in-site results) get a frame, so the
    generalisation gap reads off the diagonal against the rest of its row.
    """
    values = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.1 * len(sites) + 2.6, 0.6 * len(models) + 1.8))
    finite = [v for row in values for v in row if not math.isnan(v)] or [0.0]
    low, high = limits if limits else (min(finite), max(finite))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # NaN: not evaluated
    image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05)
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            text = "—" if math.isnan(value) else f"{value:.2f}"
            # Dark text on the bright end of viridis, white elsewhere.
            bright = math.isnan(value) or (value - low) > 0.6 * (high - low)
            colour = "black" if bright else "white"
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color=colour)
            if models[r] == sites[c]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set(xlabel="evaluated at site", ylabel="model trained on", title=title)
    return save_figure(fig, out)


def save_figure(fig: Figure, out: Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; return ``out``."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
