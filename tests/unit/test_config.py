"""Run and site configuration: parsed once, validated, consistent with the Flower app."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedseg.config import ConfigError, RunConfig, SiteConfig, derive_seed

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_matches_runconfig_defaults() -> None:
    # Flower rejects run-config keys the app does not declare, so the two must agree.
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_flower()


def test_from_flower_parses_dashed_keys_and_coerces_numbers() -> None:
    run = RunConfig.from_flower({"num-server-rounds": 3, "proximal-mu": 1, "strategy": "fedprox"})
    assert run.num_server_rounds == 3
    assert run.proximal_mu == 1.0 and isinstance(run.proximal_mu, float)
    assert run.strategy == "fedprox"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"strategy": "fedsgd"}, "strategy 'fedsgd' unknown"),
        ({"proximal-mu": -0.1}, "proximal-mu must be >= 0"),
        ({"patch-size": 50}, "multiple of 16"),
        ({"local-steps": "ten"}, "expected int"),
        ({"mode": "predict"}, "mode 'predict' unknown"),
        ({"mode": "evaluate"}, "needs initial-model"),
    ],
)
def test_invalid_run_config_is_refused_with_the_key(
    override: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(override)


def test_site_config_deployed_and_simulated(tmp_path: Path) -> None:
    deployed = SiteConfig.from_node_config({"data-path": "/data/site"}, RunConfig())
    assert deployed.data_path == Path("/data/site")
    for name in ("b-site", "a-site"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "not-a-site").mkdir()
    run = RunConfig(sim_sites_dir=str(tmp_path))
    assert SiteConfig.from_node_config({"partition-id": 1}, run).data_path == tmp_path / "b-site"
    with pytest.raises(ConfigError, match="partition 2 but only 2 site folders"):
        SiteConfig.from_node_config({"partition-id": 2}, run)


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, 1, "hospital-a") == derive_seed(0, 1, "hospital-a")
    assert derive_seed(0, 1, "hospital-a") != derive_seed(0, 2, "hospital-a")
    assert 0 <= derive_seed("x") < 2**31


@pytest.mark.parametrize("preset", sorted((PYPROJECT.parent / "configs").glob("*.toml")))
def test_study_presets_are_valid_run_configs(preset: Path) -> None:
    values = tomllib.loads(preset.read_text())
    declared = set(RunConfig().to_flower())
    assert set(values) <= declared, f"{preset.name}: undeclared keys {set(values) - declared}"
    run = RunConfig.from_flower(values)
    from fedseg.task.model import get_preset

    # The U-Net needs patches divisible by its total downsampling.
    assert run.patch_size % math.prod(get_preset(run.model_preset).strides) == 0


def test_simulation_outcome_is_read_from_the_status_file(tmp_path: Path) -> None:
    from fedseg.artifacts import write_json
    from fedseg.simulation import SimulationError, check_status

    with pytest.raises(SimulationError, match="did not finish"):
        check_status(tmp_path)
    write_json(tmp_path / "status.json", {"status": "failed", "reason": "KeyError: 'dice'"})
    with pytest.raises(SimulationError, match="KeyError: 'dice'"):
        check_status(tmp_path)
    write_json(tmp_path / "status.json", {"status": "completed"})
    check_status(tmp_path)
