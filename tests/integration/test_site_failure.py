"""A site whose data fails validation declines; the federation goes on without it."""

from __future__ import annotations

import json
from pathlib import Path

from data_adapters.site import harmonise_site
from fedseg.config import RunConfig
from fedseg.simulation import SimulationSpec, app_dir, run_simulation
from fedseg.synth import generate_federation
from tests.processes import flower_processes


def test_broken_site_is_recorded_by_name_and_others_are_aggregated(tmp_path: Path) -> None:
    # Prepare: three harmonised sites, then one loses a file after harmonisation.
    before = flower_processes()
    raw = generate_federation(tmp_path / "raw", n_sites=3, cases_per_site=(3, 3, 3), seed=3)
    for site in raw:
        harmonise_site(site, tmp_path / "sites" / site.name, target_spacing=(3.0, 3.0, 3.0))
    broken = tmp_path / "sites" / "hospital-c"
    next(broken.glob("cases/*/t1c.nii.gz")).unlink()
    run = RunConfig(
        num_server_rounds=1,
        local_steps=2,
        min_train_sites=2,
        run_dir=str(tmp_path / "run"),
        sim_sites_dir=str(tmp_path / "sites"),
    )
    lines: list[str] = []
    # Execute
    run_simulation(
        SimulationSpec(app_dir=app_dir(), run=run, num_supernodes=3, work_dir=tmp_path / "fl"),
        on_line=lines.append,
    )
    # Assert
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = metrics["final"]
    assert set(final["train"]) == {"hospital-a", "hospital-b"}
    assert set(final["sites"]) == {"hospital-a", "hospital-b"}
    # One validation case each, below min-cases-to-report (3): only counts left the sites.
    assert all(s["withheld"] and "dice" not in s for s in final["sites"].values())
    failures = {(f["site"], f["phase"]) for f in final["failures"]}
    assert failures == {("hospital-c", "train"), ("hospital-c", "evaluate")}
    # The server learns that the site declined, not which file (paths can carry patient ids);
    # the site's own log has the detail.
    assert all("failed validation" in f["reason"] for f in final["failures"])
    assert not any("t1c.nii.gz" in f["reason"] for f in final["failures"])
    assert any("t1c.nii.gz" in line and "declining" in line for line in lines)
    assert (tmp_path / "run" / "model.pt").is_file()
    assert flower_processes() <= before
