"""A small generated federation studied through a real Flower simulation, with the study's
audit trail checked by ``fedseg audit verify``: what the privacy integration tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_adapters.site import harmonise_site
from fedseg.config import RunConfig
from fedseg.simulation import FLOWER_ENV, SimulationSpec, app_dir, run_simulation
from fedseg.synth import generate_federation


def harmonised_sites(root: Path, *, cases_per_site: tuple[int, ...], seed: int) -> Path:
    """Generate ``len(cases_per_site)`` raw sites and harmonise each at 3 mm into
    ``root/sites``; that folder."""
    sites = root / "sites"
    raws = generate_federation(root / "raw", n_sites=len(cases_per_site),
                               cases_per_site=cases_per_site, seed=seed)  # fmt: skip
    for raw in raws:
        harmonise_site(raw, sites / raw.name, target_spacing=(3.0, 3.0, 3.0), qc=False)
    return sites


def simulate_and_verify(
    run: RunConfig, *, num_supernodes: int, work_dir: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``run`` on Flower's simulation runtime, then ``fedseg audit verify`` on its run
    folder; the verification's process (its return code and output)."""
    run_simulation(
        SimulationSpec(
            app_dir=app_dir(), run=run, num_supernodes=num_supernodes, work_dir=work_dir
        ),
        on_line=lambda _: None,
    )
    return subprocess.run(
        [sys.executable, "-m", "fedseg", "audit", "verify", str(run.run_dir)],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
