"""The main job on the embedded default: generate, harmonise, train federated, validate, report.

Every stage leaves a file artefact the next one reads (nnU-Net's lesson), so a failed demo can
be inspected stage by stage: ``raw/`` -> ``sites/`` -> ``run/`` -> ``report.md``. The run's
audit trail (``run/audit.jsonl``) is verified before the report is written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from data_adapters.site import harmonise_site
from evaluation.report import load_metrics, write_report
from fedseg.artifacts import write_json
from fedseg.audit import audit_summary
from fedseg.config import RunConfig
from fedseg.simulation import SimulationSpec, app_dir, run_simulation
from fedseg.synth import generate_federation

# The CPU demo grid: 3 mm keeps a head within one 48^3 patch region and a round in seconds.
DEMO_SPACING_MM = (3.0, 3.0, 3.0)


@dataclass(frozen=True, kw_only=True)
class DemoPlan:
    """Sizes of a demo federation and its study."""

    sites: int
    cases_per_site: tuple[int, ...]
    run: RunConfig
    seed: int = 0


def demo_plan(*, sites: int | None, rounds: int | None, quick: bool, seed: int) -> DemoPlan:
    """The default demo, or a smaller, faster ``--quick`` one.

    The default has five sites so that every raw layout the adapters read is exercised
    (BraTS 2023, a DICOM study, BraTS 2021, MSD 4D, nnU-Net raw); ``--quick`` keeps three.
    """
    sites = sites if sites is not None else (3 if quick else 5)
    base = (8, 6, 5) if quick else (12, 9, 7, 8, 6)
    cases = tuple(base[i % len(base)] for i in range(sites))
    run = RunConfig(
        num_server_rounds=rounds if rounds is not None else (6 if quick else 10),
        local_steps=30 if quick else 40,
        min_train_sites=min(sites, 2),
        # Generated phantoms, not patients, and only 1-3 validation cases per site: report all.
        min_cases_to_report=1,
        seed=seed,
    )
    return DemoPlan(sites=sites, cases_per_site=cases, run=run, seed=seed)


def prepare_sites(
    plan: DemoPlan, out: Path, *, progress: Callable[[str], None]
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Generate the raw federation and harmonise each site on its own; return site folders
    and what was skipped (a bad case at one site never stops the others)."""
    raw_sites = generate_federation(
        out / "raw", n_sites=plan.sites, cases_per_site=plan.cases_per_site, seed=plan.seed,
        progress=progress, overwrite=True,
    )  # fmt: skip
    site_dirs, skipped = [], []
    for raw in raw_sites:
        progress(f"harmonising {raw.name}")
        result = harmonise_site(
            raw, out / "sites" / raw.name, target_spacing=DEMO_SPACING_MM, seed=plan.seed,
            progress=progress,
        )  # fmt: skip
        site_dirs.append(result.out_dir)
        skipped += [{"site": raw.name, **asdict(s)} for s in result.skipped]
    return site_dirs, skipped


def run_demo(
    out: Path, *, plan: DemoPlan, progress: Callable[[str], None], on_log: Callable[[str], None]
) -> dict[str, Any]:
    """Run the whole demo into ``out``; return the timings and the final metrics."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _, skipped = prepare_sites(plan, out, progress=progress)
    timings["prepare_s"] = time.perf_counter() - t0

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = replace(
        plan.run, run_dir=str(run_dir.resolve()), sim_sites_dir=str((out / "sites").resolve())
    )
    t1 = time.perf_counter()
    progress(f"federated training: {plan.sites} sites, {run.num_server_rounds} rounds")
    run_simulation(
        SimulationSpec(
            app_dir=app_dir(), run=run, num_supernodes=plan.sites, work_dir=out / "flower"
        ),
        on_line=on_log,
    )
    timings["federated_s"] = time.perf_counter() - t1
    return finish_report(out, run_dir, timings=timings, skipped=skipped)


def finish_report(
    out: Path, run_dir: Path, *, timings: dict[str, float], skipped: list[dict[str, Any]]
) -> dict[str, Any]:
    """Copy the run's artefacts to the top of ``out`` and write the plots and reports."""
    metrics = load_metrics(run_dir)
    audit = audit_summary(run_dir)
    if audit and audit.startswith("FAILS"):
        raise RuntimeError(f"{run_dir}: the demo's own audit trail {audit}")
    if audit:
        metrics["audit"] = f"{audit} (fedseg audit verify {run_dir})"
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["skipped_cases"] = skipped
    write_json(out / "metrics.json", metrics)
    for name in ("model.pt", "model.json"):
        shutil.copy2(run_dir / name, out / name)
    # report.html (self-contained), report.md, learning_curves.png and the other plots; the
    # timings and skipped cases reach the report through metrics.json itself.
    write_report(metrics, out, title="fedseg demo")
    return metrics
