"""A study with secure aggregation (SecAgg+) in a real Flower run: every site trains through
the protocol's four messages per round, each one passes the site's egress guard, and the
server records each site's training summary and a verifiable audit trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.config import RunConfig
from tests.integration.simulated_study import harmonised_sites, simulate_and_verify
from tests.processes import flower_processes

# About a minute: a real Flower run; the protocol itself is unit-tested in test_secure.py.
pytestmark = [pytest.mark.privacy, pytest.mark.slow]


def test_a_secure_study_trains_every_site_and_sends_only_masked_vectors(tmp_path: Path) -> None:
    # Prepare
    sites = harmonised_sites(tmp_path, cases_per_site=(4, 3, 3), seed=6)
    run_dir = tmp_path / "run"
    run = RunConfig(
        num_server_rounds=2,
        local_steps=2,
        min_train_sites=3,
        min_cases_to_report=1,
        secure_aggregation=True,
        run_dir=str(run_dir),
        sim_sites_dir=str(sites),
    )
    before = flower_processes()
    # Execute
    verified = simulate_and_verify(run, num_supernodes=3, work_dir=tmp_path / "flower")
    # Assert: both rounds aggregated all three sites, weighted by their cases.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = {p.name for p in sites.iterdir() if p.is_dir()}
    assert len(names) == 3
    for record in metrics["rounds"]:
        assert set(record["train"]) == names and not record.get("not_aggregated")
        assert not record["failures"]
    assert metrics["final"]["pooled"]["dice"]["WT"] >= 0
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Each site sent four training replies a round (keys, key shares, masked vector,
    # unmasking shares), all through its guard; none held weights in the clear.
    for site in names:
        log = [json.loads(x) for x in (sites / site / "egress.jsonl").read_text().splitlines()]
        train = [e for e in log if e["message_type"] == "train"]
        assert len(train) == 2 * 4 and all(e["verdict"] == "sent" for e in log)
        masked = [e for e in train if "fitres.parameters" in e["records"]]
        assert len(masked) == 2
    assert flower_processes() <= before
