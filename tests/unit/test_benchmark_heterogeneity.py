"""The heterogeneity benchmark's bookkeeping: spread over seeds, pooling over sites, the checks
and the table; and (slow) the whole benchmark on a tiny plan through real Flower runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.benchmark_heterogeneity import (
    POOL,
    BenchmarkPlan,
    checks,
    heterogeneous_profiles,
    run_benchmark,
    summarise,
    table,
)


def _scores(fed: float, pooled: float, local: tuple[float, float]) -> dict:
    def same(v: float) -> dict[str, float]:
        return {"WT": v, "TC": v, "ET": v}

    return {
        "fedavg": {"a": same(fed), "b": same(fed - 0.1)},
        "pooled": {"a": same(pooled), "b": same(pooled - 0.1)},
        "local-only": {"a": same(local[0]), "b": same(local[1])},
    }


def test_summary_pools_sites_by_cases_and_spreads_over_seeds() -> None:
    results = summarise(
        [_scores(0.8, 0.8, (0.5, 0.4)), _scores(0.6, 0.8, (0.5, 0.4))], {"a": 3, "b": 1}
    )
    fedavg = results["fedavg"]
    assert fedavg["a"]["WT"]["values"] == [0.8, 0.6]
    assert fedavg["a"]["WT"]["mean"] == pytest.approx(0.7)
    assert fedavg["a"]["WT"]["std"] == pytest.approx(0.1414, abs=1e-4)
    # 3 cases at a, 1 at b: (3 x 0.8 + 1 x 0.7) / 4 in seed 0.
    assert fedavg[POOL]["mean"]["values"][0] == pytest.approx(0.775)


def test_checks_compare_best_federated_to_pooled_and_each_site_to_local_only() -> None:
    good = checks(summarise([_scores(0.79, 0.8, (0.5, 0.4))], {"a": 1, "b": 1}))
    assert good["within_goal"] and good["every_site_better_off"]
    assert good["ratio_to_pooled"] == pytest.approx(0.74 / 0.75)
    bad = checks(summarise([_scores(0.6, 0.8, (0.5, 0.55))], {"a": 1, "b": 1}))
    assert not bad["within_goal"]
    assert bad["sites"]["b"]["better_off"] is False and bad["sites"]["a"]["better_off"]
    assert not bad["every_site_better_off"]


def test_table_lists_every_method_and_site() -> None:
    text = table(summarise([_scores(0.8, 0.8, (0.5, 0.4))], {"a": 1, "b": 1}))
    assert "fedavg" in text and "local-only" in text and POOL in text
    assert "0.800 +- 0.000" in text


def test_benchmark_sites_differ_in_what_harmonisation_keeps() -> None:
    sites = heterogeneous_profiles((16, 10, 8, 6))
    assert [s.n_cases for s in sites] == [16, 10, 8, 6]
    assert max(s.spacing[2] for s in sites) >= 7.0
    mixes = [s.size_mix[0] / sum(s.size_mix) for s in sites]
    assert max(mixes) - min(mixes) > 0.7  # mostly-large vs mostly-small tumour sites
    assert max(s.noise for s in sites) / min(s.noise for s in sites) >= 4


@pytest.mark.slow
def test_tiny_benchmark_runs_every_kind_of_method(tmp_path: Path) -> None:
    plan = BenchmarkPlan(
        cases_per_site=(4, 4),
        seeds=(0,),
        rounds=1,
        local_steps=2,
        personalise_steps=2,
        methods=("fedavg", "cyclic"),
    )
    payload = run_benchmark(tmp_path, plan, log=lambda _: None)
    methods = payload["methods"]
    assert set(methods) == {"fedavg", "fedavg+personalised", "cyclic", "pooled", "local-only"}
    for by_site in methods.values():
        assert set(by_site) == {"hospital-a", "hospital-b", POOL}
        assert all(0 <= by_site[s]["mean"]["mean"] <= 1 for s in by_site)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "heterogeneity.png").is_file()
    assert set(payload["checks"]["sites"]) == {"hospital-a", "hospital-b"}


def test_benchmark_entry_point_names_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.benchmark import main

    assert main(["no-such-benchmark"]) == 2
    assert "heterogeneity, privacy, deployment, harmonise, metrics" in capsys.readouterr().err
