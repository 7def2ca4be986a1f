"""Configuration parsed once into frozen dataclasses.

Flower hands both sides flat ``key -> scalar`` mappings: the run config (the study, the same
for every participant) and the node config (one site's own settings, which never leave it).
Everything downstream receives these typed objects, never the raw mappings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

Scalar = bool | int | float | str | bytes

STRATEGIES = ("fedavg", "fedprox")
MODES = ("train", "evaluate")


class ConfigError(ValueError):
    """A configuration value is missing or out of range."""


def _get(config: Mapping[str, object], key: str, kind: type, default: object) -> object:
    value = config.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind):
        raise ConfigError(f"config key '{key}': expected {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One study: what every site trains, for how long, and how the server aggregates."""

    mode: str = "train"
    initial_model: str = ""
    num_server_rounds: int = 10
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    model_preset: str = "tiny"
    local_steps: int = 40
    batch_size: int = 2
    learning_rate: float = 2e-3
    patch_size: int = 48
    fraction_train: float = 1.0
    min_train_sites: int = 2
    min_cases_to_report: int = 3
    seed: int = 0
    run_dir: str = ""
    sim_sites_dir: str = ""
    sim_client_threads: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode '{self.mode}' unknown; choose from {MODES}")
        if self.mode == "evaluate" and not self.initial_model:
            raise ConfigError("mode 'evaluate' needs initial-model (the weights to validate)")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy '{self.strategy}' unknown; choose from {STRATEGIES}")
        if self.num_server_rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ConfigError("num-server-rounds, local-steps and batch-size must be >= 1")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.min_cases_to_report < 1:
            raise ConfigError("min-cases-to-report must be >= 1")
        if self.patch_size % 16:
            raise ConfigError(f"patch-size must be a multiple of 16, got {self.patch_size}")

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse Flower's run config (keys spelled with dashes)."""
        values = {
            f.name: _get(run_config, f.name.replace("_", "-"), type(f.default), f.default)
            for f in fields(cls)
        }
        return cls(**values)  # type: ignore[arg-type]

    def to_flower(self) -> dict[str, Scalar]:
        """The run config as ``flwr run --run-config`` expects it."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One site's own settings, from its SuperNode's node config."""

    data_path: Path
    num_threads: int = 0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], run: RunConfig) -> SiteConfig:
        """Resolve the site folder.

        A deployed SuperNode names its folder (``data-path``); a simulated one only has a
        partition id, which picks the n-th canonical site under ``sim-sites-dir``.
        """
        if "data-path" in node_config:
            threads = _get(node_config, "num-threads", int, 0)
            return cls(data_path=Path(str(node_config["data-path"])), num_threads=int(threads))  # type: ignore[call-overload]
        if "partition-id" not in node_config or not run.sim_sites_dir:
            raise ConfigError("node config has neither 'data-path' nor a simulation partition")
        sites = simulation_sites(Path(run.sim_sites_dir))
        index = int(node_config["partition-id"])  # type: ignore[call-overload]
        if index >= len(sites):
            raise ConfigError(
                f"{run.sim_sites_dir}: partition {index} but only {len(sites)} site folders"
            )
        return cls(data_path=sites[index], num_threads=run.sim_client_threads)


def simulation_sites(root: Path) -> list[Path]:
    """Canonical site folders under ``root`` (those holding a manifest), in a stable order."""
    return sorted(p.parent for p in root.glob("*/manifest.json"))


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (``hash()`` is salted per process, so not that)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
