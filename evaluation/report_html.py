"""Rendering: self-contained HTML pages, the run report in HTML, and its Markdown twin.

A page is one file that opens anywhere, offline and printed: CSS inline, PNGs embedded as
``data:image/png;base64`` URIs, no JavaScript, no link to anything outside the file. Every
piece of text goes through :func:`esc`; only :class:`Markup` (HTML this module built) passes
unescaped. :mod:`evaluation.site_report` builds its page from the same pieces.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from evaluation.plots import Figures
from evaluation.regions import REGION_NAMES
from evaluation.report import METRICS, MIN_CASES_NOTE, RunView, Stat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CSS = """
:root { --ink: #1d2330; --muted: #5b6472; --line: #d5d9e0; --accent: #2457a6; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.7em; margin: 0 0 .4em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .6em; padding-bottom: .25em;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
nav { font-size: .9em; color: var(--muted); margin: .5em 0 1em; }
nav a { color: var(--accent); margin-right: .9em; text-decoration: none; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1.2em; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: .4em 0 .8em; font-size: .92em; }
th, td { border: 1px solid var(--line); padding: .3em .6em; vertical-align: top; }
th { background: #eef1f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pooled td { font-weight: 600; background: #f6f8fb; border-top: 2px solid var(--ink); }
td .spread { display: block; font-weight: 400; font-size: .8em; color: var(--muted); }
td.withheld { color: #8a5a00; font-style: italic; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
              font-size: .9em; }
.note { color: var(--muted); font-size: .9em; }
.ok { color: #1f7a3a; }
figure { margin: .6em 0 1.2em; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .88em; margin-top: .2em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
           gap: 12px; }
.gallery.wide { grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
.gallery figure { margin: 0; }
.heatmaps img { max-width: min(100%, 760px); }
td:first-child { white-space: nowrap; }
.banner { border: 3px solid #b00020; background: #fdecee; color: #7a0014; padding: .8em 1em;
          font-weight: 600; margin-bottom: 1em; }
footer { margin-top: 2.5em; color: var(--muted); font-size: .85em;
         border-top: 1px solid var(--line); padding-top: .6em; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav { display: none; }
  h2, h3 { break-after: avoid; }
  table, figure, .banner { break-inside: avoid; }
  .banner, th, tr.pooled td { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


class Markup(str):
    """HTML built here from escaped parts: inserted as is."""


def esc(value: object) -> str:
    """Escape any text for HTML (quotes too: the result may land in an attribute)."""
    return value if isinstance(value, Markup) else html.escape(str(value), quote=True)


def png_data_uri(png: Path | bytes) -> str:
    """A ``data:image/png;base64,...`` URI; refuses anything that is not a PNG."""
    data = png if isinstance(png, bytes) else png.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{png if isinstance(png, Path) else 'image'}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(png: Path | bytes, *, caption: str, alt: str | None = None) -> Markup:
    """An embedded PNG with its caption."""
    return Markup(
        f'<figure><img src="{png_data_uri(png)}" alt="{esc(alt or caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def table(
    headers: Sequence[object],
    rows: Sequence[Sequence[object]],
    *,
    row_classes: Sequence[str] = (),
) -> Markup:
    """A table; cells are escaped unless they are :class:`Markup` (then they carry their td)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    classes = [*row_classes, *[""] * (len(rows) - len(row_classes))]
    body = "".join(
        (f'<tr class="{esc(cls)}">' if cls else "<tr>")
        + "".join(c if isinstance(c, Markup) else f"<td>{esc(c)}</td>" for c in cells)
        + "</tr>"
        for cells, cls in zip(rows, classes, strict=True)
    )
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def facts_list(facts: Iterable[tuple[object, object]]) -> Markup:
    """A two-column list of labelled facts."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return Markup(f'<dl class="facts">{items}</dl>')


def section(anchor: str, heading: str, *parts: str) -> Markup:
    """A titled section; ``parts`` are Markup or plain text (escaped, as a paragraph)."""
    body = "".join(p if isinstance(p, Markup) else f"<p>{esc(p)}</p>" for p in parts)
    return Markup(f'<section id="{esc(anchor)}"><h2>{esc(heading)}</h2>{body}</section>')


def page(
    title: str,
    sections: Sequence[tuple[str, str, Markup]],
    *,
    intro: Markup = Markup(""),
    banner: str | None = None,
    footer: str = "",
) -> str:
    """A whole HTML document: ``sections`` are ``(anchor, heading, body)``, linked from a nav."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(section(a, h, b) for a, h, b in sections)
    top = f'<div class="banner" role="alert">{esc(banner)}</div>' if banner else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{top}"
        f"<header><h1>{esc(title)}</h1>{intro}</header><nav>{nav}</nav>{body}"
        f"<footer>{esc(footer)}</footer></body></html>\n"
    )


# --- the run report ------------------------------------------------------------------------


def html_report(view: RunView, figures: Figures) -> str:
    """The run report as one self-contained HTML page."""
    sections = [
        ("sites", "Sites", _sites(view)),
        ("final", view.final_heading, _final(view, figures)),
        ("curves", "Learning curves", _curves(figures)),
        ("failures", "Failures", _failures(view)),
    ]
    if view.cross_site and figures.cross_site:
        sections.append(("cross-site", "Cross-site evaluation", _cross_site(figures)))
    if view.personalisation:
        sections.append(("personalised", "Global vs personalised", _personalised(view)))
    if view.contributions:
        intro = (
            "Each site left out in turn: the other sites' mean Dice (WT, TC, ET; "
            "case-weighted) with the full federation's model and with the model trained "
            "without that site. A positive difference: the site's data helped the others."
        )
        sections.append(
            (
                "contributions",
                "Leave-one-site-out",
                Markup(
                    f"<p>{esc(intro)}</p>" + table(CONTRIBUTION_HEADERS, contribution_rows(view))
                ),
            )
        )
    sections.append(("config", "Configuration", _config(view)))
    return page(
        view.title,
        sections,
        intro=facts_list(view.facts),
        footer="Aggregate metrics only, as the sites reported them in metrics.json; "
        "no image of any case is in this report.",
    )


def _sites(view: RunView) -> Markup:
    rows = [
        [
            s.name,
            _num(s.validation_cases),
            _num(s.train_cases),
            _num(s.rounds_trained),
            _num(None if s.mean_train_seconds is None else f"{s.mean_train_seconds:.1f}"),
            _num(s.total_steps),
            _num(None if s.total_seconds is None else f"{s.total_seconds:.0f}"),
            _num(None if s.megabytes_sent is None else f"{s.megabytes_sent:.1f}"),
            Markup(f'<td class="mono">{esc(s.fingerprint or "—")}</td>'),
            s.sat_out or "—",
        ]
        for s in view.sites
    ]
    headers = [
        "site",
        "validation cases",
        "training cases",
        "rounds trained",
        "mean local training (s)",
        "local steps (total)",
        "training time (s, total)",
        "updates sent (MB)",
        "dataset fingerprint (short)",
        "sat out (the site's choice)",
    ]
    return table(headers, rows) if rows else Markup('<p class="note">No site took part.</p>')


def _final(view: RunView, figures: Figures) -> Markup:
    if view.final_round is None:
        return Markup('<p class="note">No validation results were recorded.</p>')
    parts = [
        f"<p>{esc(view.final_heading)}: each site validates the global model on its own "
        "held-out cases; <b>pooled</b> is the case-weighted mean over sites.</p>"
    ]
    classes = ["pooled" if r.pooled else "" for r in view.rows]
    for metric, (label, digits) in METRICS.items():
        rows = [
            [
                row.name,
                _num(row.n_cases),
                *(_stat_cell(row.stats[metric][r], digits) for r in REGION_NAMES),
            ]
            for row in view.rows
        ]
        parts += [
            f"<h3>{esc(label)}</h3>",
            table(["site", "cases", *REGION_NAMES], rows, row_classes=classes),
        ]
    if any(s.spread(3) for r in view.rows for by in r.stats.values() for s in by.values()):
        parts.append('<p class="note">mean ± sd; below: median and p5-p95 over cases.</p>')
    if any(r.withheld for r in view.rows):
        parts.append(
            f'<p class="note">{esc(MIN_CASES_NOTE)}: the site had too few validation '
            "cases to report this value without identifying them; only the count "
            "left the site.</p>"
        )
    if figures.final:
        parts.append(figure(figures.final, caption="Final-round Dice per site and pooled."))
    return Markup("".join(parts))


def _stat_cell(stat: Stat, digits: int) -> Markup:
    if stat.withheld:
        count = "" if stat.count is None else f" (n = {stat.count})"
        return Markup(f'<td class="withheld">{esc(MIN_CASES_NOTE + count)}</td>')
    spread = stat.spread(digits)
    extra = f'<span class="spread">{esc(spread)}</span>' if spread else ""
    return Markup(f'<td class="num">{esc(stat.text(digits))}{extra}</td>')


def _num(value: object) -> Markup:
    return Markup(f'<td class="num">{esc("—" if value is None else value)}</td>')


def _curves(figures: Figures) -> Markup:
    captions = {
        "dice": "Validation Dice per round at each site (own cases); dashed: pooled.",
        "hd95": "Validation HD95 (mm, log scale) per round at each site; dashed: pooled.",
    }
    return Markup(
        "".join(figure(p, caption=captions.get(m, m)) for m, p in figures.learning.items())
    )


def _failures(view: RunView) -> Markup:
    if not view.failures:
        parts = [f'<p class="ok">No failures in {view.rounds_recorded} rounds.</p>']
    else:
        rounds, sites, cells = view.failure_counts()
        matrix = table(
            ["site", *(f"round {r}" for r in rounds)],
            [[s, *(cells.get((s, r), "") for r in rounds)] for s in sites],
        )
        details = table(
            ["round", "site", "phase", "reason"],
            [[f.round, f.site, f.phase, f.reason] for f in view.failures],
        )
        parts = [
            f"<p>{len(view.failures)} failures; the other sites went on.</p>",
            matrix,
            "<h3>Reasons</h3>",
            details,
        ]
    if view.skipped:
        parts += [
            "<h3>Cases skipped while harmonising</h3>",
            table(
                ["site", "case", "reason"],
                [
                    [s.get("site", "?"), s.get("case_id", "?"), s.get("reason", "")]
                    for s in view.skipped
                ],
            ),
        ]
    return Markup("".join(parts))


def _cross_site(figures: Figures) -> Markup:
    intro = (
        "<p>Each model evaluated at every site; rows: the site(s) the model was trained on, "
        "columns: the evaluation site. Framed cells: a model at its own site.</p>"
    )
    images = "".join(figure(png, caption=caption) for caption, png in figures.cross_site)
    return Markup(f'{intro}<div class="heatmaps">{images}</div>')


def personalisation_rows(view: RunView) -> list[list[str]]:
    """Per site and region: global Dice, fine-tuned Dice and the change."""
    assert view.personalisation is not None
    rows = []
    for p in view.personalisation.sites:
        cells = [p.site]
        for r in REGION_NAMES:
            before, after = p.dice_global[r], p.dice_personalised[r]
            if before is None or after is None:
                cells.append("withheld")
            else:
                cells.append(f"{before:.3f} → {after:.3f} ({after - before:+.3f})")
        rows.append(cells)
    return rows


CONTRIBUTION_HEADERS = ["site left out", "others' Dice with it", "without it", "its effect"]


def contribution_rows(view: RunView) -> list[list[str]]:
    """One row per site left out: the others' Dice with and without it, and the change."""

    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "—" if value is None else format(value, spec)

    return [[s, fmt(a), fmt(b), fmt(d, "+.3f")] for s, a, b, d in view.contributions]


def _personalised(view: RunView) -> Markup:
    assert view.personalisation is not None
    steps = view.personalisation.steps
    intro = (
        f"<p>After the last round each site fine-tuned the final model for {steps} steps on "
        "its own training cases and validated both on its own validation cases; the "
        "fine-tuned models never left the sites. Dice: global → personalised (change).</p>"
    )
    out = intro + table(["site", *REGION_NAMES], personalisation_rows(view))
    if view.personalisation.not_done:
        items = "".join(f"<li>{esc(s)}: {esc(r)}</li>" for s, r in view.personalisation.not_done)
        out += f'<p class="note">Not personalised:</p><ul>{items}</ul>'
    return Markup(out)


def _config(view: RunView) -> Markup:
    rows = [
        [k, Markup(f'<td class="mono">{esc(json.dumps(v))}</td>')] for k, v in view.config.items()
    ]
    return table(["key", "value"], rows) if rows else Markup('<p class="note">Not recorded.</p>')


# --- the same report in Markdown ------------------------------------------------------


def markdown_text(view: RunView) -> str:
    """The run report for terminals: facts, final table, failures, cross-site tables, config."""
    lines = [f"# {view.title}", "", *(f"- {k}: {v}" for k, v in view.facts), ""]
    lines += _md_table(
        [
            "site",
            "validation cases",
            "training cases",
            "local steps",
            "training s",
            "sent MB",
            "fingerprint",
            "sat out",
        ],
        [
            [
                s.name,
                _dash(s.validation_cases),
                _dash(s.train_cases),
                _dash(s.total_steps),
                "—" if s.total_seconds is None else f"{s.total_seconds:.0f}",
                "—" if s.megabytes_sent is None else f"{s.megabytes_sent:.1f}",
                s.fingerprint or "—",
                s.sat_out or "—",
            ]
            for s in view.sites
        ],
    )
    if view.final_round is None:
        lines += ["", "No validation results were recorded."]
    else:
        lines += ["", f"## {view.final_heading}: validation at each site", ""]
        lines += _md_final_table(view)
    lines += ["", f"Failures recorded: {len(view.failures)}"]
    lines += [f"- round {f.round}, {f.site} ({f.phase}): {f.reason}" for f in view.failures[:50]]
    lines += [
        f"- skipped while harmonising: {s.get('site', '?')} {s.get('case_id', '?')}: "
        f"{s.get('reason', '')}"
        for s in view.skipped
    ]
    if view.cross_site:
        lines += ["", "## Cross-site evaluation (rows: trained on, columns: evaluated at)"]
        for metric, by_region in view.cross_site.matrices.items():
            label, digits = METRICS[metric]
            for region, matrix in by_region.items():
                lines += ["", f"{region} {label}", ""]
                lines += _md_table(
                    ["model \\ site", *view.cross_site.sites],
                    [
                        [m, *("—" if v is None else f"{v:.{digits}f}" for v in row)]
                        for m, row in zip(view.cross_site.models, matrix, strict=True)
                    ],
                )
    if view.personalisation:
        lines += [
            "",
            f"## Global vs personalised ({view.personalisation.steps} steps at "
            "each site; Dice: global → personalised)",
            "",
        ]
        lines += _md_table(["site", *REGION_NAMES], personalisation_rows(view))
        lines += [f"- not personalised: {s}: {r}" for s, r in view.personalisation.not_done]
    if view.contributions:
        lines += ["", "## Leave-one-site-out (the other sites' mean Dice)", ""]
        lines += _md_table(CONTRIBUTION_HEADERS, contribution_rows(view))
    lines += ["", "## Configuration", "", "```toml"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in view.config.items()]
    lines += ["```", "", "![Dice learning curves](learning_curves.png)"]
    lines += ["![HD95 learning curves](learning_curves_hd95.png)", ""]
    return "\n".join(lines)


def _md_final_table(view: RunView) -> list[str]:
    headers = ["site", "cases"] + [
        f"{label.split(' ')[0]} {r}" + (" (mm)" if m == "hd95" else "")
        for m, (label, _) in METRICS.items()
        for r in REGION_NAMES
    ]
    rows = []
    for row in view.rows:
        cells = [
            _md_cell(row.stats[m][r], d) for m, (_, d) in METRICS.items() for r in REGION_NAMES
        ]
        name = f"**{row.name}**" if row.pooled else row.name
        rows.append([name, _dash(row.n_cases), *cells])
    lines = _md_table(headers, rows)
    if any(s.spread(1) for row in view.rows for by in row.stats.values() for s in by.values()):
        lines += ["", "Cells with a site summary read mean ± sd [p5, p95]."]
    if any(row.withheld for row in view.rows):
        lines += ["", f"{MIN_CASES_NOTE}: the site had too few cases to report this value."]
    return lines


def _md_cell(stat: Stat, digits: int) -> str:
    if stat.p5 is None or stat.p95 is None or stat.withheld:
        return stat.text(digits)
    return f"{stat.text(digits)} [{stat.p5:.{digits}f}, {stat.p95:.{digits}f}]"


def _dash(value: int | None) -> str:
    return "—" if value is None else str(value)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|---" * len(headers) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]
