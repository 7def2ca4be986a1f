"""What evaluators read: learning curves and a short Markdown report from ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers without a display
import matplotlib.pyplot as plt

from evaluation.regions import REGION_NAMES


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read a run's ``metrics.json`` with a clear error when it is missing or broken."""
    path = run_dir / "metrics.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics.json; did the run finish a round?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    return data


def plot_learning_curves(metrics: dict[str, Any], out: Path) -> Path:
    """One panel per region: each site's validation Dice per round, and the pooled value."""
    rounds = [r for r in metrics["rounds"] if r["sites"]]
    sites = sorted({s for r in rounds for s in r["sites"]})
    fig, axes = plt.subplots(1, len(REGION_NAMES), figsize=(4.2 * len(REGION_NAMES), 3.6))
    for ax, region in zip(axes, REGION_NAMES, strict=True):
        for site in sites:
            points = [
                (r["round"], r["sites"][site]["dice"][region]) for r in rounds if site in r["sites"]
            ]
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=site)
        pooled = [
            (r["round"], r["pooled"]["dice"][region]) for r in rounds if "dice" in r["pooled"]
        ]
        ax.plot(*zip(*pooled, strict=True), color="black", lw=2, ls="--", label="pooled")
        ax.set(title=f"{region} Dice (own validation cases)", xlabel="round", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_report(
    metrics: dict[str, Any], *, title: str, extra: dict[str, str] | None = None
) -> str:
    """A short report: the final per-site table, pooled values and the run's configuration."""
    final = metrics.get("final")
    lines = [f"# {title}", ""]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    if final is None:
        return "\n".join([*lines, "", "No validation results were recorded."]) + "\n"
    header = (
        " | ".join(f"Dice {r}" for r in REGION_NAMES)
        + " | "
        + " | ".join(f"HD95 {r} (mm)" for r in REGION_NAMES)
    )
    lines += ["", f"## Final round ({final['round']}): validation at each site", ""]
    lines += [f"| site | cases | {header} |", "|---" * (2 + 2 * len(REGION_NAMES)) + "|"]
    rows = [(name, s) for name, s in sorted(final["sites"].items())]
    rows.append(("**pooled**", final["pooled"]))
    for name, s in rows:
        dice = " | ".join(f"{s['dice'][r]:.3f}" for r in REGION_NAMES)
        hd = " | ".join(f"{s['hd95'][r]:.1f}" for r in REGION_NAMES)
        lines.append(f"| {name} | {s['n_cases']} | {dice} | {hd} |")
    failures = [f for r in metrics["rounds"] for f in r.get("failures", [])]
    lines += ["", f"Failures recorded: {len(failures)}"]
    lines += [f"- {f['site']} ({f['phase']}): {f['reason']}" for f in failures[:20]]
    lines += ["", "## Configuration", "", "```toml"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in metrics.get("config", {}).items()]
    lines += ["```", "", "![learning curves](learning_curves.png)", ""]
    return "\n".join(lines)
