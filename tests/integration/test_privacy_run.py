"""A differentially private study (adaptive clipping) in a real Flower run: epsilon per round,
a clipping norm that moves, an audit trail that verifies, and each site's egress log matching
what the server recorded receiving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.config import RunConfig
from tests.integration.simulated_study import harmonised_sites, simulate_and_verify
from tests.processes import flower_processes

# About a minute: a real Flower run; the same accounting is unit-tested in test_privacy.py.
pytestmark = [pytest.mark.privacy, pytest.mark.slow]


def test_dp_study_accounts_epsilon_and_both_sides_log_the_same_bytes(tmp_path: Path) -> None:
    # Prepare
    sites = harmonised_sites(tmp_path, cases_per_site=(4, 3), seed=5)
    run_dir = tmp_path / "run"
    run = RunConfig(
        num_server_rounds=2,
        local_steps=2,
        min_train_sites=2,
        min_cases_to_report=1,
        dp_noise_multiplier=0.8,
        dp_clipping_norm=0.5,
        # Adaptive: the sites' clipped flags must pass their egress guards to move the norm.
        dp_clipping="adaptive",
        dp_count_stddev=1.0,
        run_dir=str(run_dir),
        sim_sites_dir=str(sites),
    )
    before = flower_processes()
    # Execute
    verified = simulate_and_verify(run, num_supernodes=2, work_dir=tmp_path / "flower")
    # Assert: epsilon grows with each release and is in the audit trail too.
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    epsilons = [r["privacy"]["epsilon"] for r in rounds]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]
    assert all(set(r["train"]) == {"hospital-a", "hospital-b"} for r in rounds)
    norms = [r["privacy"]["clipping_norm"] for r in rounds]
    assert norms[0] == 0.5 and norms[1] == rounds[0]["privacy"]["next_clipping_norm"] != 0.5
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "4 records chained" in verified.stdout + verified.stderr
    audit = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    received = {
        (site, e["bytes"], e["sha256"])
        for r in audit
        if r["event"] == "round"
        for site, entries in r["received"].items()
        for e in entries
    }
    # Each site logged exactly what the server says it received from it (training and
    # validation replies of both rounds), and nothing was blocked.
    for site in ("hospital-a", "hospital-b"):
        log = [json.loads(x) for x in (sites / site / "egress.jsonl").read_text().splitlines()]
        assert all(e["verdict"] == "sent" for e in log)
        sent = {(site, e["bytes"], e["sha256"]) for e in log if e["message_type"] != "query"}
        assert {x for x in received if x[0] == site} <= sent
        assert len([e for e in log if e["message_type"] == "train"]) == 2
    assert flower_processes() <= before
