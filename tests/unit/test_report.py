"""The demo's report: learning curves and the final per-site table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.report import markdown_report, plot_learning_curves


def _metrics() -> dict[str, Any]:
    rounds = []
    for r in (1, 2):
        sites = {
            name: {
                "n_cases": n,
                "dice": {"WT": 0.4 * r, "TC": 0.3 * r, "ET": 0.2 * r},
                "hd95": {"WT": 9.0 / r, "TC": 8.0 / r, "ET": 7.0 / r},
            }
            for name, n in (("hospital-a", 3), ("hospital-b", 1))
        }
        pooled = {
            "n_cases": 4,
            "dice": {"WT": 0.4 * r, "TC": 0.3 * r, "ET": 0.2 * r},
            "hd95": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        }
        failures = (
            [{"site": "hospital-c", "phase": "train", "reason": "bad scan"}] if r == 1 else []
        )
        rounds.append({"round": r, "sites": sites, "pooled": pooled, "failures": failures})
    return {"rounds": rounds, "final": rounds[-1], "config": {"strategy": "fedavg"}}


def test_learning_curves_png_is_written(tmp_path: Path) -> None:
    out = plot_learning_curves(_metrics(), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # three panels with lines, not an empty canvas


def test_markdown_report_lists_every_site_pooled_and_failures() -> None:
    text = markdown_report(_metrics(), title="t")
    assert "| hospital-a | 3 | 0.800 | 0.600 | 0.400 | 4.5 | 4.0 | 3.5 |" in text
    assert "| hospital-b | 1 |" in text and "| **pooled** | 4 |" in text
    assert "Failures recorded: 1" in text and "hospital-c (train): bad scan" in text
    assert 'strategy = "fedavg"' in text
