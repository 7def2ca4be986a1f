"""The run report: report.html (self-contained), report.md and PNGs from metrics.json."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from evaluation.report import (
    MIN_CASES_NOTE,
    ReportFiles,
    load_metrics,
    markdown_report,
    write_report,
)
from fedseg.cli import app

PNG = b"\x89PNG\r\n\x1a\n"
SITES = (("hospital-a", 3), ("hospital-b", 1))


def _site(r: int, n: int) -> dict[str, Any]:
    return {
        "n_cases": n,
        "dice": {"WT": 0.4 * r, "TC": 0.3 * r, "ET": 0.2 * r},
        "hd95": {"WT": 9.0 / r, "TC": 8.0 / r, "ET": 7.0 / r},
        "fingerprint": "f" * 64,
    }


def _metrics() -> dict[str, Any]:
    """Two rounds at two sites, the schema the server writes today (means only)."""
    rounds = []
    for r in (1, 2):
        pooled = {
            "n_cases": 4,
            "dice": {"WT": 0.4 * r, "TC": 0.3 * r, "ET": 0.2 * r},
            "hd95": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        }
        failures = (
            [{"site": "hospital-c", "phase": "train", "reason": "bad scan"}] if r == 1 else []
        )
        rounds.append(
            {
                "round": r,
                "sites": {name: _site(r, n) for name, n in SITES},
                "pooled": pooled,
                "train": {
                    name: {"n_cases": 9, "seconds": 2.0, "steps": 40, "bytes": 600_000}
                    for name, _ in SITES
                },
                "failures": failures,
            }
        )
    return {"rounds": rounds, "final": rounds[-1], "config": {"strategy": "fedavg"}}


def _rich_metrics() -> dict[str, Any]:
    """Spread at hospital-a, a count-only site, more failures and a cross-site matrix."""
    metrics = _metrics()
    final = metrics["final"]
    final["sites"]["hospital-a"]["summary"] = {
        region: {
            "dice": {"count": 3, "mean": 0.8, "median": 0.81, "std": 0.05, "p5": 0.71, "p95": 0.88},
            "hd95": {"count": 3, "mean": 4.5, "median": 4.0, "std": 1.0, "p5": 3.0, "p95": 6.0},
        }
        for region in ("WT", "TC", "ET")
    }
    small = final["sites"]["hospital-b"]
    small["summary"] = {r: {"dice": {"count": 1}, "hd95": {"count": 1}} for r in ("WT", "TC")}
    small["summary"]["ET"] = {"dice": {"count": 1}, "hd95": {"count": 1}}
    del small["dice"], small["hd95"]  # a site below min cases sends no means either
    metrics["rounds"][0]["failures"].append(
        {"site": "hospital-b", "phase": "evaluate", "reason": "timeout <b>late</b>"}
    )
    metrics["cross_site"] = {
        "models": ["hospital-a", "hospital-b"],
        "sites": ["hospital-a", "hospital-b"],
        "dice": {r: [[0.9, 0.6], [0.5, None]] for r in ("WT", "TC", "ET")},
    }
    return metrics


class _Page(HTMLParser):
    """What a test needs from a page: tags, tables (rows of cell texts), visible text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    @property
    def rows(self) -> list[list[str]]:
        """The rows of every table, in order."""
        return [row for rows in self.tables for row in rows]

    def table(self, *header: str) -> list[list[str]]:
        """Rows of every table with this header, header rows left out."""
        return [row for t in self.tables if t[0] == list(header) for row in t[1:]]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str, rows: list[list[str]] | None = None) -> list[str]:
        """The first row (of ``rows``, or of any table) whose first cell is ``first``."""
        return next(r for r in (self.rows if rows is None else rows) if r and r[0] == first)


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportFiles, _Page]:
    files = write_report(_rich_metrics(), tmp_path_factory.mktemp("rich"), title="t <run>")
    return files, _Page(files.html.read_text())


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportFiles, _Page]:
    files = write_report(_metrics(), tmp_path_factory.mktemp("plain"), title="t")
    return files, _Page(files.html.read_text())


def test_learning_curves_png_is_written(plain: tuple[ReportFiles, _Page]) -> None:
    out = plain[0].html.parent / "learning_curves.png"
    assert out.read_bytes()[:8] == PNG
    assert out.stat().st_size > 10_000  # three panels with lines, not an empty canvas


def test_markdown_report_lists_every_site_pooled_and_failures() -> None:
    text = markdown_report(_metrics(), title="t")
    assert "| hospital-a | 3 | 0.800 | 0.600 | 0.400 | 4.5 | 4.0 | 3.5 |" in text
    assert "| hospital-b | 1 |" in text and "| **pooled** | 4 |" in text
    assert "Failures recorded: 1" in text and "hospital-c (train): bad scan" in text
    assert 'strategy = "fedavg"' in text


def test_html_is_self_contained(rich: tuple[ReportFiles, _Page]) -> None:
    files, page = rich
    text = files.html.read_text()
    assert 'src="http' not in text and "<script" not in text.lower()
    assert not [a for tag, a in page.tags if tag == "link"]  # CSS is inline
    images = [a["src"] or "" for tag, a in page.tags if tag == "img"]
    assert len(images) == 3 + 3  # curves (Dice, HD95), final bars; one heatmap per region
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG
    assert {p.name for p in files.figures} <= {p.name for p in files.html.parent.glob("*.png")}


def test_html_lists_every_site_and_pooled_with_their_numbers(
    plain: tuple[ReportFiles, _Page],
) -> None:
    _, page = plain
    final = page.table("site", "cases", "WT", "TC", "ET")  # Dice, then HD95
    assert [r[0] for r in final] == ["hospital-a", "hospital-b", "pooled"] * 2
    assert final[0] == ["hospital-a", "3", "0.800", "0.600", "0.400"]
    assert final[2] == ["pooled", "4", "0.800", "0.600", "0.400"]
    assert final[4] == ["hospital-b", "1", "4.5", "4.0", "3.5"]
    # Contribution: 2 rounds x 40 steps, 2 x 2.0 s, 2 x 0.6 MB of updates.
    assert page.row("hospital-b") == [
        "hospital-b",
        "1",
        "9",
        "2",
        "2.0",
        "80",
        "4",
        "1.2",
        "ffffffffffff",
        "—",
    ]
    facts = " ".join(page.text)
    assert "fedavg" in facts and "2 recorded" in facts and "ffffffffffff" in facts
    assert page.row("strategy") == ["strategy", '"fedavg"']  # the configuration table


def test_html_shows_spread_and_the_privacy_note(rich: tuple[ReportFiles, _Page]) -> None:
    files, page = rich
    final = page.table("site", "cases", "WT", "TC", "ET")
    assert final[0][2] == "0.800 ± 0.050 median 0.810, p5-p95 [0.710, 0.880]"
    assert final[1][2:] == [f"{MIN_CASES_NOTE} (n = 1)"] * 3
    markdown = files.markdown.read_text()
    assert f"| hospital-b | 1 | {MIN_CASES_NOTE} | {MIN_CASES_NOTE} |" in markdown
    assert "| hospital-a | 3 | 0.800 ± 0.050 [0.710, 0.880] |" in markdown


def test_failures_are_listed_by_site_and_round(rich: tuple[ReportFiles, _Page]) -> None:
    _, page = rich
    # One column per round that had failures (round 2 had none), one row per failing site.
    assert page.table("site", "round 1") == [
        ["hospital-b", "1 evaluate"],
        ["hospital-c", "1 train"],
    ]
    reasons = page.table("round", "site", "phase", "reason")
    assert ["1", "hospital-b", "evaluate", "timeout <b>late</b>"] in reasons  # escaped text


def test_cross_site_section_only_when_present(
    rich: tuple[ReportFiles, _Page], plain: tuple[ReportFiles, _Page]
) -> None:
    assert 'id="cross-site"' in rich[0].html.read_text()
    assert [p.name for p in rich[0].figures if p.name.startswith("cross_site")] == [
        f"cross_site_dice_{r}.png" for r in ("WT", "TC", "ET")
    ]
    assert "| hospital-b | 0.500 | — |" in rich[0].markdown.read_text()
    assert 'id="cross-site"' not in plain[0].html.read_text()
    assert "Cross-site" not in plain[0].markdown.read_text()


def test_text_is_escaped(rich: tuple[ReportFiles, _Page]) -> None:
    text = rich[0].html.read_text()
    assert "<title>t &lt;run&gt;</title>" in text and "&lt;b&gt;late&lt;/b&gt;" in text


def test_broken_cross_site_matrix_is_named(tmp_path: Path) -> None:
    metrics = _rich_metrics()
    metrics["cross_site"]["dice"]["ET"] = [[0.9]]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"metrics.json: cross_site dice ET is not a 2 x 2"):
        load_metrics(tmp_path)


def test_cli_report_writes_the_files(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    for name in ("report.html", "report.md", "learning_curves.png", "learning_curves_hd95.png"):
        assert (tmp_path / "r" / name).is_file(), name


@pytest.mark.parametrize(
    "content", [None, "{not json", '{"rounds": 3}', "[]", '{"rounds": [{"round": 1, "sites": []}]}']
)
def test_cli_report_names_a_missing_or_broken_metrics_file(
    tmp_path: Path, content: str | None
) -> None:
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "metrics.json") in lines[0], result.output
    assert not (tmp_path / "report.html").exists()


def test_cli_report_wants_a_run_or_a_site(tmp_path: Path) -> None:
    assert CliRunner().invoke(app, ["report"]).exit_code == 2
    both = CliRunner().invoke(app, ["report", str(tmp_path), "--site", str(tmp_path)])
    assert both.exit_code == 2


def test_demo_finish_report_writes_html_beside_markdown(tmp_path: Path) -> None:
    from fedseg.demo import finish_report

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(_metrics()))
    for name in ("model.pt", "model.json"):
        (run_dir / name).write_bytes(b"{}")
    out = tmp_path / "out"
    out.mkdir()
    skipped = [{"site": "hospital-b", "case_id": "X", "file": "x.nii.gz", "reason": "no t2f"}]
    finish_report(out, run_dir, timings={"prepare_s": 12.3}, skipped=skipped)
    for name in ("report.html", "report.md", "learning_curves.png", "metrics.json", "model.pt"):
        assert (out / name).is_file(), name
    page = _Page((out / "report.html").read_text())
    assert "time prepare" in page.text and "12 s" in page.text  # from metrics.json's timings
    assert ["hospital-b", "X", "no t2f"] in page.rows


def test_a_run_without_validation_still_reports(tmp_path: Path) -> None:
    failed = {"round": 1, "sites": {}, "failures": [{"site": "hospital-a", "phase": "train"}]}
    files = write_report({"rounds": [failed], "final": None}, tmp_path, title="t")
    assert "No validation results were recorded." in files.html.read_text()
    assert "No validation results were recorded." in files.markdown.read_text()
    assert ["hospital-a", "1 train"] in _Page(files.html.read_text()).table("site", "round 1")


def test_cross_site_report_names_the_global_model_and_evaluation_only_sites(
    tmp_path: Path,
) -> None:
    # Prepare: what a cross-site run writes: local training rounds, the global model's
    # validation as "final", an evaluation-only site that sat training out.
    metrics = _metrics()
    metrics["mode"] = "cross-site"
    for r in metrics["rounds"]:
        r["sites"] = {}
        r["abstained"] = [
            {"site": "hospital-c", "phase": "train", "reason": "evaluation only (train = false)"}
        ]
    final = metrics["final"] = dict(
        metrics["rounds"][-1],
        sites={
            "hospital-a": _site(2, 3),
            "hospital-c": {**_site(1, 5), "fingerprint": "c" * 64},
        },
    )
    final["abstained"] = []
    metrics["cross_site"] = {
        "models": ["global", "hospital-a"],
        "sites": ["hospital-a", "hospital-c"],
        "hd95": {r: [[4.31, 6.0], [3.0, 12.5]] for r in ("WT", "TC", "ET")},
    }
    # Execute
    files = write_report(metrics, tmp_path, title="cross-site")
    page = _Page(files.html.read_text())
    text = files.markdown.read_text()
    # Assert
    assert "The global model at each site" in " ".join(page.text)
    assert "## The global model at each site: validation at each site" in text
    row_c = page.row("hospital-c")
    assert row_c[1] == "5" and row_c[-1] == "train: evaluation only (train = false)"
    assert "cccccccccccc" in row_c
    assert "| global | 4.3 | 6.0 |" in text  # HD95 in mm with one decimal, as elsewhere


def test_personalisation_table_shows_global_personalised_and_change(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["personalisation"] = {
        "steps": 20,
        "sites": {"hospital-a": {"global": _site(1, 3), "personalised": _site(2, 3)}},
        "failures": [],
        "abstained": [
            {
                "site": "hospital-b",
                "phase": "personalise",
                "reason": "the site does not take part in training (train = false)",
            }
        ],
    }
    text = markdown_report(metrics, title="t")
    assert "Global vs personalised (20 steps" in text
    assert "| hospital-a | 0.400 → 0.800 (+0.400) | 0.300 → 0.600 (+0.300) |" in text
    assert "not personalised: hospital-b: the site does not take part in training" in text
    files = write_report(metrics, tmp_path, title="t")
    html = files.html.read_text()
    assert 'id="personalised"' in html and "0.400 → 0.800 (+0.400)" in html
    assert 'id="personalised"' not in markdown_report(_metrics(), title="t")


def test_privacy_spent_and_the_audit_are_among_the_facts() -> None:
    metrics = _metrics()
    for i, r in enumerate(metrics["rounds"], start=1):
        r["privacy"] = {
            "epsilon": 3.5 * i,
            "delta": 1e-5,
            "releases": i,
            "noise_multiplier": 1.0,
            "clipping_norm": 0.5,
        }
    metrics["audit"] = "5 records chained, 3 files match their sha256"
    text = markdown_report(metrics, title="t")
    assert "differential privacy: epsilon 7.00 at delta 1e-05 after 2 releases" in text
    assert "audit trail: 5 records chained" in text
    assert "fixed clipping, last norm 0.5" in text
    assert "differential privacy" not in markdown_report(_metrics(), title="t")
    assert "secure aggregation" not in text
    metrics["config"] = {**metrics.get("config", {}), "secure-aggregation": True}
    assert "secure aggregation: SecAgg+" in markdown_report(metrics, title="t")
