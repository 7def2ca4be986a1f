"""Dice against epsilon: user-level differential privacy on the heterogeneity federation.

Run as ``python -m evaluation.benchmark privacy --out DIR [--quick]``. The same generated
federation, budget and code as ``heterogeneity`` (:mod:`evaluation.benchmark_heterogeneity`);
FedAvg with client-side clipping at ``--clipping-norm`` (``--clipping adaptive``: the first
round's norm, then following the sites' median update norm) and Gaussian noise multipliers
``--noise`` (0: plain FedAvg without DP, the reference), through real Flower runs.
``DIR/privacy.json`` holds, per noise multiplier, the epsilon spent at delta after the last
round and the Dice per site and pooled; ``DIR/privacy.png`` plots pooled Dice against epsilon
and the table is printed.

User-level DP counts each hospital as one user, and the noise on the average scales as
``sigma x C / sites``: with a handful of sites, a small epsilon costs most of the model. This
benchmark measures how much, rather than assuming it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from evaluation.benchmark_heterogeneity import (
    BenchmarkPlan,
    benchmark_plan,
    prepare_federation,
    simulate_study,
    study_config,
)
from evaluation.plots import save_figure
from evaluation.regions import REGION_NAMES
from fedseg.artifacts import write_json

QUICK_NOISE = (0.0, 0.05, 0.5)
FULL_NOISE = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True, kw_only=True)
class Clipping:
    """How the sites clip: ``fixed`` at ``norm``, or ``adaptive`` starting there."""

    kind: str = "fixed"
    norm: float = 5.0
    count_stddev: float = 0.0


def run_private(
    sites: list[Path], plan: BenchmarkPlan, *, noise: float, clipping: Clipping, work: Path
) -> dict[str, Any]:
    """One FedAvg study with DP at ``noise`` (0: plain FedAvg, the reference); its epsilon,
    Dice and the clipping norm of its last round."""
    run = replace(
        study_config(plan, seed=plan.seeds[0]),
        dp_noise_multiplier=noise,
        dp_clipping_norm=clipping.norm,
        dp_clipping=clipping.kind,
        dp_count_stddev=clipping.count_stddev,
    )
    metrics = simulate_study(run, sites, work=work)
    final = metrics["final"]
    spent = metrics["rounds"][-1].get("privacy", {})
    return {
        "noise_multiplier": noise,
        "epsilon": spent.get("epsilon") if noise > 0 else None,
        "delta": spent.get("delta"),
        "last_clipping_norm": spent.get("clipping_norm"),
        "sites": {s: e["dice"] for s, e in final["sites"].items()},
        "pooled": final["pooled"]["dice"],
        "mean_dice": statistics.fmean(final["pooled"]["dice"][r] for r in REGION_NAMES),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Noise, epsilon, pooled Dice per region and their mean."""
    head = "noise   epsilon        " + "".join(r.rjust(8) for r in REGION_NAMES)
    lines = [head + "    mean  last C"]
    for row in rows:
        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        cells = "".join(f"{row['pooled'][r]:8.3f}" for r in REGION_NAMES)
        norm = row.get("last_clipping_norm")
        last = "" if norm is None else f"{norm:8.3g}"
        lines.append(f"{row['noise_multiplier']:<8g}{eps:<15}{cells}{row['mean_dice']:8.3f}{last}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Pooled mean Dice against epsilon (log scale); the run without DP as a line."""

    fig, ax = plt.subplots(figsize=(6, 4))
    noisy = [r for r in rows if r["epsilon"] is not None]
    ax.plot([r["epsilon"] for r in noisy], [r["mean_dice"] for r in noisy], "o-", label="DP")
    for r in noisy:
        ax.annotate(f"sigma={r['noise_multiplier']:g}", (r["epsilon"], r["mean_dice"]), fontsize=8)
    for r in rows:
        if r["epsilon"] is None:
            ax.axhline(r["mean_dice"], ls="--", color="grey", label="no DP")
    ax.set(
        xscale="log",
        xlabel="epsilon (user level, one user = one site)",
        ylabel="pooled mean Dice (WT, TC, ET)",
        ylim=(0, 1.05),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    """``privacy --out DIR [--quick] [--noise 0,0.1,1] [--clipping-norm 5]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for data, runs, results")
    parser.add_argument("--quick", action="store_true", help="3 sites, short runs")
    parser.add_argument("--noise", help="comma-separated noise multipliers")
    parser.add_argument(
        "--clipping-norm",
        type=float,
        default=5.0,
        help="L2 norm each site clips its update to (adaptive: the first round's; default 5)",
    )
    parser.add_argument("--clipping", choices=("fixed", "adaptive"), default="fixed")
    parser.add_argument(
        "--count-stddev",
        type=float,
        default=0.0,
        help="adaptive: noise on the clipped count (0: sites / 20); must exceed noise / 2",
    )
    args = parser.parse_args(argv)
    plan = replace(benchmark_plan(quick=args.quick), seeds=(0,))
    default = QUICK_NOISE if args.quick else FULL_NOISE
    noises = [float(x) for x in args.noise.split(",")] if args.noise else list(default)
    clipping = Clipping(kind=args.clipping, norm=args.clipping_norm, count_stddev=args.count_stddev)
    start = time.perf_counter()
    sites = prepare_federation(args.out, plan, log=print)
    rows = []
    for noise in noises:
        print(f"noise multiplier {noise:g}")
        rows.append(
            run_private(
                sites,
                plan,
                noise=noise,
                clipping=clipping,
                work=args.out / "runs" / f"{clipping.kind}-noise-{noise:g}",
            )
        )
    payload = {
        "plan": plan.__dict__,
        "clipping_norm": args.clipping_norm,
        "clipping": args.clipping,
        "count_stddev": args.count_stddev,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(args.out / "privacy.json", payload)
    plot(rows, args.out / "privacy.png")
    print(table(rows))
    print(f"\n{args.out / 'privacy.json'}, {args.out / 'privacy.png'}; {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
