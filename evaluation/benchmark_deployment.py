"""What a federated round costs on top of the sites' own work, on Flower's deployment engine.

Run as ``python -m evaluation.benchmark_deployment [--sites 2] [--rounds 4] [--out DIR]``.
A SuperLink and one ``fedseg client`` per site on loopback (insecure: TLS costs a handshake
per connection, not per round) run the same short study twice, side by side:

- ``flower``: Flower's default executor, a fresh ``flwr-clientapp`` process per message, so
  torch, MONAI, SimpleITK and nibabel are imported again for every training and every
  validation message;
- ``fedseg``: ``fedseg.deploy.superexec``, which imports them once and forks each ClientApp.

The study is near no-op: one training step on a 32^3 patch and validation of one small case
per site (3 mm grid). A round's time is the interval between consecutive round
checkpoints (round 1, which includes start-up, is left out); its overhead is that minus the
slowest site's own reported training time, i.e. what a round with no-op training would cost
(validating one small case, ~0.4 s, stays in). ``DIR/results.json`` holds both executors'
rounds; the headline is the ratio of their median round times, side by side in one run,
and the goal is a median overhead of at most ``GOAL_SECONDS``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from data_adapters.site import harmonise_site
from fedseg.deploy.loopback import CONNECTION, loopback_federation
from fedseg.synth import generate_federation

#: The issue's goal: a no-op round costs at most a few seconds on loopback.
GOAL_SECONDS = 5.0
EXECUTORS = ("flower", "fedseg")


def make_sites(root: Path, *, n_sites: int) -> list[Path]:
    """``n_sites`` harmonised sites of 3 cases (one held out) on the 3 mm demo grid."""
    raws = generate_federation(root / "raw", n_sites=n_sites, cases_per_site=3, seed=7,
                               overwrite=True)  # fmt: skip
    sites = []
    for raw in raws:
        site = root / "sites" / raw.name
        if not (site / "manifest.json").is_file():
            harmonise_site(raw, site, target_spacing=(3.0, 3.0, 3.0), qc=False,
                           validation_fraction=0.34)  # fmt: skip
        sites.append(site)
    return sites


def study_config(path: Path, *, rounds: int, n_sites: int) -> Path:
    config = {
        "num-server-rounds": rounds, "local-steps": 1, "patch-size": 32,
        "min-train-sites": n_sites, "min-cases-to-report": 1, "wait-for-sites": 120,
    }  # fmt: skip
    path.write_text(tomli_w.dumps(config))
    return path


def round_seconds(run_dir: Path) -> list[float]:
    """Seconds between consecutive round checkpoints (round 2 onwards)."""
    stamps = [p.stat().st_mtime for p in sorted((run_dir / "checkpoints").glob("round-*.pt"))]
    return [b - a for a, b in itertools.pairwise(stamps)]


def run_one(work: Path, sites: list[Path], *, executor: str, rounds: int) -> dict[str, Any]:
    """The study on a fresh loopback federation whose sites use ``executor``."""
    with loopback_federation(work, tls=False) as federation:
        for site in sites:
            toml = federation.site_config(site.name, site, executor=executor)
            federation.start_site(site.name, toml)
        config = study_config(work / "study.toml", rounds=rounds, n_sites=len(sites))
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "fedseg", "study", "--connection", CONNECTION,
             "--config", str(config), "--run-dir", str(work / "run")],
            env=federation.env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        total = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{executor}: fedseg study failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    site_seconds = [max(s["seconds"] for s in r["train"].values()) for r in metrics["rounds"]]
    rounds_s = round_seconds(work / "run")
    overhead = [r - s for r, s in zip(rounds_s, site_seconds[1:], strict=True)]
    return {"executor": executor, "total_seconds": total, "round_seconds": rounds_s,
            "median_round_seconds": statistics.median(rounds_s),
            "site_train_seconds": site_seconds, "overhead_seconds": overhead,
            "median_overhead_seconds": statistics.median(overhead)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmark-deployment"))
    args = parser.parse_args(argv)
    sites = make_sites(args.out / "data", n_sites=args.sites)
    results = {}
    for name in EXECUTORS:  # each on a fresh federation, one after the other
        results[name] = run_one(args.out / name, sites, executor=name, rounds=args.rounds)
    flower, fedseg = (results[n]["median_round_seconds"] for n in EXECUTORS)
    overhead = results["fedseg"]["median_overhead_seconds"]
    summary = {"sites": args.sites, "rounds": args.rounds, "results": results,
               "ratio": fedseg / flower, "goal_seconds": GOAL_SECONDS,
               "meets_goal": overhead <= GOAL_SECONDS}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in EXECUTORS:
        r = results[name]
        print(f"{name:>7}: median round {r['median_round_seconds']:.1f} s, overhead "
              f"{r['median_overhead_seconds']:.1f} s "
              f"(rounds {', '.join(f'{s:.1f}' for s in r['round_seconds'])}; "
              f"study {r['total_seconds']:.0f} s)")  # fmt: skip
    print(f"ratio fedseg/flower {summary['ratio']:.2f}; goal: overhead <= {GOAL_SECONDS} s per "
          f"round: {'met' if summary['meets_goal'] else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
