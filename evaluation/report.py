"""What evaluators read: ``report.html``, ``report.md`` and PNG figures from ``metrics.json``.

:func:`report_run` reads a run folder's ``metrics.json``; :func:`write_report` renders a metrics
dict (the demo passes its own). Both go through one view of the run (:func:`build_view`), so
the HTML and the Markdown always say the same thing. The report holds aggregate metrics only:
nothing in ``metrics.json`` is an image of a case, and nothing else is read.

Per-site values are means over a site's validation cases. When a site also sends a summary,
``sites[site]["summary"][region][metric] = {"count", "mean", "median", "std", "p5", "p95"}``
(``[metric][region]`` is read too), its spread is shown; a summary holding only ``count``
means the site had too few cases to report a value, shown as :data:`MIN_CASES_NOTE`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.plots import draw_figures
from evaluation.plots import plot_learning_curves as plot_learning_curves  # re-exported
from evaluation.regions import REGION_NAMES

MIN_CASES_NOTE = "n < min cases"
METRICS: dict[str, tuple[str, int]] = {"dice": ("Dice", 3), "hd95": ("HD95 (mm)", 1)}
FINGERPRINT_CHARS = 12


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/metrics.json`` (or that file itself), with one-line errors naming it."""
    path = run_dir if run_dir.suffix == ".json" else run_dir / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics.json; did the run finish a round?") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    check_metrics(data, source=str(path))
    return data  # type: ignore[no-any-return]


def check_metrics(data: Any, *, source: str) -> None:
    """Raise ValueError naming ``source`` when ``data`` is not shaped like ``metrics.json``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a JSON object; is this a fedseg metrics.json?")
    rounds = data.get("rounds")
    if not isinstance(rounds, list) or not all(
        isinstance(r, dict) and isinstance(r.get("round"), int) for r in rounds
    ):
        raise ValueError(f'{source}: "rounds" must be a list of objects with a "round" number')
    for key in ("final", "config", "cross_site"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f'{source}: "{key}" must be an object')
    for entry in [*rounds, *([data["final"]] if data.get("final") else [])]:
        _check_round(entry, source=source)
    if data.get("cross_site") is not None:
        _check_cross_site(data["cross_site"], source=source)


def _check_round(entry: dict[str, Any], *, source: str) -> None:
    where = f"{source}: round {entry.get('round')}"
    for key in ("sites", "train", "pooled"):
        value = entry.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f'{where}: "{key}" must be an object')
    for key in ("sites", "train"):
        if not all(isinstance(v, dict) for v in (entry.get(key) or {}).values()):
            raise ValueError(f'{where}: every entry of "{key}" must be an object')
    if not isinstance(entry.get("failures") or [], list):
        raise ValueError(f'{where}: "failures" must be a list')


def _check_cross_site(cross: dict[str, Any], *, source: str) -> None:
    models, sites = cross.get("models"), cross.get("sites")
    if not isinstance(models, list) or not isinstance(sites, list):
        raise ValueError(f'{source}: cross_site needs "models" and "sites" lists')
    for metric in METRICS:
        by_region = cross.get(metric) or {}
        if not isinstance(by_region, dict):
            raise ValueError(f"{source}: cross_site {metric} must map regions to matrices")
        for region, matrix in by_region.items():
            ok = isinstance(matrix, list) and len(matrix) == len(models)
            if not ok or any(not isinstance(row, list) or len(row) != len(sites) for row in matrix):
                raise ValueError(
                    f"{source}: cross_site {metric} {region} is not a "
                    f"{len(models)} x {len(sites)} matrix (models x sites)"
                )


@dataclass(frozen=True, kw_only=True)
class Stat:
    """One metric in one region at one site (or pooled): a mean, maybe with its spread."""

    mean: float | None = None
    count: int | None = None
    median: float | None = None
    std: float | None = None
    p5: float | None = None
    p95: float | None = None
    missing: int | None = None  # cases whose value could not be computed
    withheld: bool = False  # the site sent only a count: too few cases to report

    @classmethod
    def from_entry(cls, entry: dict[str, Any], metric: str, region: str) -> Stat:
        """Read the summary when there is one, else the plain mean."""
        summary = _summary(entry, metric, region)
        if summary is not None:
            if summary.get("mean") is None:
                return cls(count=_int(summary.get("count")), withheld=True)
            return cls(
                mean=_num(summary["mean"]),
                count=_int(summary.get("count")),
                median=_num(summary.get("median")),
                std=_num(summary.get("std")),
                p5=_num(summary.get("p5")),
                p95=_num(summary.get("p95")),
                missing=_int(summary.get("missing")),
            )
        return cls(mean=_num((entry.get(metric) or {}).get(region)))

    def text(self, digits: int) -> str:
        """The value for a table cell: ``mean ± std`` or ``mean``."""
        if self.withheld:
            return MIN_CASES_NOTE
        if self.mean is None:
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def spread(self, digits: int) -> str:
        """``median m, p5-p95 [a, b]`` when the site sent a summary, else empty."""
        parts = []
        if self.median is not None:
            parts.append(f"median {self.median:.{digits}f}")
        if self.p5 is not None and self.p95 is not None:
            parts.append(f"p5-p95 [{self.p5:.{digits}f}, {self.p95:.{digits}f}]")
        if self.missing:
            parts.append(f"{self.missing} missing")
        return ", ".join(parts)

    def whiskers(self) -> tuple[float, float, float] | None:
        """``(mean, p5, p95)`` for a bar chart; the mean thrice when there is no spread."""
        if self.mean is None:
            return None
        low, high = self.p5 if self.p5 is not None else self.mean, self.p95
        return self.mean, low, high if high is not None else self.mean


def _summary(entry: dict[str, Any], metric: str, region: str) -> dict[str, Any] | None:
    summary = entry.get("summary")
    if not isinstance(summary, dict):
        return None
    for outer, inner in ((region, metric), (metric, region)):
        found = (summary.get(outer) or {}).get(inner)
        if isinstance(found, dict):
            return found
    return None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True, kw_only=True)
class Row:
    """A line of the final table: one site, or the pooled values."""

    name: str
    n_cases: int | None
    stats: dict[str, dict[str, Stat]]  # metric -> region -> Stat
    pooled: bool = False

    @property
    def withheld(self) -> bool:
        """Whether any value of this row was withheld for having too few cases."""
        return any(s.withheld for by_region in self.stats.values() for s in by_region.values())


@dataclass(frozen=True, kw_only=True)
class SiteFacts:
    """What the run knows about a site: case counts, fingerprint, participation."""

    name: str
    validation_cases: int | None
    train_cases: int | None
    fingerprint: str
    rounds_trained: int
    mean_train_seconds: float | None
    # Contribution over the whole study: optimiser steps, training seconds, MB of updates sent.
    total_steps: int | None = None
    total_seconds: float | None = None
    megabytes_sent: float | None = None
    # Phases the site sat out by its own choice, e.g. "train: evaluation only".
    sat_out: str = ""


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A site that failed a phase of a round, and why (as the site reported it)."""

    round: int
    site: str
    phase: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CrossSite:
    """Models trained on X evaluated at site Y: ``matrices[metric][region]`` is models x sites."""

    models: list[str]
    sites: list[str]
    matrices: dict[str, dict[str, list[list[float | None]]]]


@dataclass(frozen=True, kw_only=True)
class Personalised:
    """One site's Dice with the global model and with it fine-tuned there (``None``: withheld)."""

    site: str
    dice_global: dict[str, float | None]
    dice_personalised: dict[str, float | None]


@dataclass(frozen=True, kw_only=True)
class Personalisation:
    """metrics.json's ``personalisation``: global vs fine-tuned per site, and who could not."""

    steps: int
    sites: list[Personalised]
    not_done: list[tuple[str, str]]


def _personalisation(data: dict[str, Any] | None) -> Personalisation | None:
    if not data:
        return None
    sites = [
        Personalised(
            site=name,
            dice_global={r: _num((e["global"].get("dice") or {}).get(r)) for r in REGION_NAMES},
            dice_personalised={
                r: _num((e["personalised"].get("dice") or {}).get(r)) for r in REGION_NAMES
            },
        )
        for name, e in sorted(data.get("sites", {}).items())
    ]
    not_done = [
        (f["site"], f["reason"]) for f in [*data.get("failures", []), *data.get("abstained", [])]
    ]
    return Personalisation(steps=int(data.get("steps", 0)), sites=sites, not_done=not_done)


@dataclass(frozen=True, kw_only=True)
class RunView:
    """Everything the report says, in the order it says it."""

    title: str
    facts: list[tuple[str, str]]
    sites: list[SiteFacts]
    final_round: int | None
    final_heading: str
    rows: list[Row]
    rounds_recorded: int
    failures: list[Failure]
    skipped: list[dict[str, Any]]
    config: dict[str, Any]
    cross_site: CrossSite | None
    personalisation: Personalisation | None = None
    # Leave-one-site-out: (site, the others' Dice with it, without it, the difference).
    contributions: list[tuple[str, float | None, float | None, float | None]] = field(
        default_factory=list
    )

    def failure_counts(self) -> tuple[list[int], list[str], dict[tuple[str, int], str]]:
        """Rounds with failures, failing sites, and ``(site, round) -> "1 train, 1 evaluate"``."""
        rounds = sorted({f.round for f in self.failures})
        sites = sorted({f.site for f in self.failures})
        tally: dict[tuple[str, int], dict[str, int]] = {}
        for f in self.failures:
            phases = tally.setdefault((f.site, f.round), {})
            phases[f.phase] = phases.get(f.phase, 0) + 1
        cells = {k: ", ".join(f"{n} {p}" for p, n in v.items()) for k, v in tally.items()}
        return rounds, sites, cells


def build_view(
    metrics: dict[str, Any], *, title: str, extra: dict[str, str] | None = None
) -> RunView:
    """Turn a (checked) metrics dict into what the report shows."""
    rounds: list[dict[str, Any]] = metrics.get("rounds", [])
    final = metrics.get("final")
    rows: list[Row] = []
    if final:
        for name, entry in sorted(final.get("sites", {}).items()):
            rows.append(_row(name, entry))
        rows.append(_row("pooled", final.get("pooled") or {}, pooled=True))
    sites = _site_facts(rounds, final)
    final_round = final.get("round") if final else None
    cross = metrics.get("mode") == "cross-site"
    return RunView(
        title=title,
        facts=_facts(metrics, sites, extra),
        sites=sites,
        final_round=final_round,
        final_heading="The global model at each site" if cross else f"Final round ({final_round})",
        rows=rows,
        rounds_recorded=len(rounds),
        failures=_failures(rounds),
        skipped=list(metrics.get("skipped_cases") or []),
        config=dict(metrics.get("config") or {}),
        cross_site=_cross_site(metrics.get("cross_site")),
        personalisation=_personalisation(metrics.get("personalisation")),
        contributions=[
            (site, _num(e.get("dice_with")), _num(e.get("dice_without")), _num(e.get("effect")))
            for site, e in sorted(((metrics.get("contributions") or {}).get("sites") or {}).items())
        ],
    )


def _failures(rounds: list[dict[str, Any]]) -> list[Failure]:
    return [
        Failure(
            round=r["round"],
            site=str(f.get("site", "?")),
            phase=str(f.get("phase", "?")),
            reason=" ".join(str(f.get("reason", "")).split()),  # one line in both tables
        )
        for r in rounds
        for f in r.get("failures") or []
        if isinstance(f, dict)
    ]


def _row(name: str, entry: dict[str, Any], *, pooled: bool = False) -> Row:
    stats = {m: {r: Stat.from_entry(entry, m, r) for r in REGION_NAMES} for m in METRICS}
    return Row(name=name, n_cases=_int(entry.get("n_cases")), stats=stats, pooled=pooled)


def _site_facts(rounds: list[dict[str, Any]], final: dict[str, Any] | None) -> list[SiteFacts]:
    final_sites = (final or {}).get("sites") or {}
    sat_out: dict[str, set[str]] = {}
    for entry in [*rounds, *([final] if final else [])]:
        for a in entry.get("abstained") or []:
            if isinstance(a, dict):
                sat_out.setdefault(str(a.get("site", "?")), set()).add(
                    f"{a.get('phase', '?')}: {a.get('reason', '')}"
                )
    names = sorted(
        {s for r in rounds for key in ("sites", "train") for s in r.get(key) or {}}
        | set(final_sites)
        | set(sat_out)
    )
    facts = []
    for name in names:
        validated = [r["sites"][name] for r in rounds if name in (r.get("sites") or {})]
        validated += [final_sites[name]] if name in final_sites else []
        trained = [r["train"][name] for r in rounds if name in (r.get("train") or {})]
        seconds = [s for t in trained if (s := _num(t.get("seconds"))) is not None]
        last_val = (validated or [{}])[-1]  # the final record, when there is one
        fingerprint = next(
            (v["fingerprint"] for v in reversed(validated) if "fingerprint" in v), ""
        )
        site = SiteFacts(
            name=name,
            validation_cases=_int(last_val.get("n_cases")),
            train_cases=_int(trained[-1].get("n_cases")) if trained else None,
            fingerprint=str(fingerprint)[:FINGERPRINT_CHARS],
            rounds_trained=len(trained),
            mean_train_seconds=sum(seconds) / len(seconds) if seconds else None,
            total_steps=_total(trained, "steps"),
            total_seconds=sum(seconds) if seconds else None,
            megabytes_sent=None if (b := _total(trained, "bytes")) is None else b / 1e6,
            sat_out="; ".join(sorted(sat_out.get(name, ()))),
        )
        facts.append(site)
    return facts


def _total(entries: list[dict[str, Any]], key: str) -> int | None:
    values = [v for e in entries if (v := _int(e.get(key))) is not None]
    return sum(values) if values else None


def _fmt(value: Any, spec: str) -> str:
    number = _num(value)
    return "?" if number is None else format(number, spec)


def _facts(
    metrics: dict[str, Any], sites: list[SiteFacts], extra: dict[str, str] | None
) -> list[tuple[str, str]]:
    config = metrics.get("config") or {}
    strategy = str(config.get("strategy", "unknown"))
    if strategy == "fedprox":
        strategy += f" (proximal-mu {config.get('proximal-mu', '?')})"
    rounds = metrics.get("rounds", [])
    validated = sum(1 for r in rounds if r.get("sites"))
    planned = config.get("num-server-rounds", "?")
    facts = [
        ("fedseg version", str(metrics.get("fedseg_version", "unknown"))),
        *([("mode", str(config["mode"]))] if "mode" in config else []),
        ("strategy", strategy),
        ("rounds", f"{len(rounds)} recorded of {planned} planned, {validated} with validation"),
        ("sites", f"{len(sites)}: " + ", ".join(s.name for s in sites)),
    ]
    spent = [r["privacy"] for r in rounds if isinstance(r.get("privacy"), dict)]
    if spent:
        last = spent[-1]
        facts.append((
            "differential privacy",
            f"epsilon {_fmt(last.get('epsilon'), '.2f')} at delta {last.get('delta', '?')} after "
            f"{last.get('releases', '?')} releases (noise multiplier "
            f"{last.get('noise_multiplier', '?')}, {last.get('clipping', 'fixed')} clipping, last "
            f"norm {_fmt(last.get('clipping_norm'), '.3g')}; user-level: one user is one site)",
        ))  # fmt: skip
    if config.get("secure-aggregation"):
        facts.append((
            "secure aggregation",
            "SecAgg+: the server saw only the case-weighted mean of the sites' models "
            f"(threshold {config.get('secagg-threshold', '?')} of the shares)",
        ))  # fmt: skip
    if metrics.get("audit"):
        facts.append(("audit trail", str(metrics["audit"])))
    for key, seconds in (metrics.get("timings") or {}).items():
        value = _num(seconds)
        facts.append((f"time {key.removesuffix('_s')}", "?" if value is None else f"{value:.0f} s"))
    if "skipped_cases" in metrics:
        facts.append(("skipped cases", str(len(metrics["skipped_cases"] or []))))
    facts += [(k, v) for k, v in (extra or {}).items() if k not in dict(facts)]
    return facts


def _cross_site(data: dict[str, Any] | None) -> CrossSite | None:
    if not data:
        return None
    matrices = {
        metric: {region: [[_num(v) for v in row] for row in rows] for region, rows in by.items()}
        for metric in METRICS
        if isinstance(by := data.get(metric), dict) and by
    }
    models, sites = [str(m) for m in data["models"]], [str(s) for s in data["sites"]]
    return CrossSite(models=models, sites=sites, matrices=matrices) if matrices else None


@dataclass(frozen=True, kw_only=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    html: Path
    markdown: Path
    figures: list[Path]


def report_run(
    run_dir: Path, *, out: Path | None = None, title: str | None = None, audit: str | None = None
) -> ReportFiles:
    """Write the report of the run in ``run_dir`` (its ``metrics.json``) into ``out``;
    ``audit`` is what checking its audit trail found, shown among the facts."""
    metrics = load_metrics(run_dir)
    if audit:
        metrics["audit"] = audit
    folder = run_dir.parent if run_dir.suffix == ".json" else run_dir
    return write_report(metrics, out or folder, title=title or f"fedseg run: {folder.name}")


def write_report(
    metrics: dict[str, Any], out: Path, *, title: str, extra: dict[str, str] | None = None
) -> ReportFiles:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNGs into ``out``."""
    # Imported here: the renderers import this module's view types.
    from evaluation.report_html import html_report, markdown_text

    check_metrics(metrics, source="metrics")
    out.mkdir(parents=True, exist_ok=True)
    view = build_view(metrics, title=title, extra=extra)
    bars = [(r.name, {g: s.whiskers() for g, s in r.stats["dice"].items()}) for r in view.rows]
    figures = draw_figures(metrics, out, final_bars=bars, cross_site=view.cross_site)
    markdown = out / "report.md"
    markdown.write_text(markdown_text(view), encoding="utf-8")
    html = out / "report.html"
    html.write_text(html_report(view, figures), encoding="utf-8")
    return ReportFiles(html=html, markdown=markdown, figures=figures.all())


def markdown_report(
    metrics: dict[str, Any], *, title: str, extra: dict[str, str] | None = None
) -> str:
    """The report for terminals: facts, final table, failures, cross-site tables, config."""
    from evaluation.report_html import markdown_text

    return markdown_text(build_view(metrics, title=title, extra=extra))
