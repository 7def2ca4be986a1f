"""Configuration parsed once into frozen dataclasses.

Flower hands both sides flat ``key -> scalar`` mappings: the run config (the study, the same
for every participant) and the node config (one site's own settings, which never leave it).
Everything downstream receives these typed objects, never the raw mappings.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

Scalar = bool | int | float | str | bytes

STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "fedbn",
    "cyclic",
)  # fmt: skip
# The strategies DP can wrap: their new model is the mean of the sites' updates, which the
# noise is calibrated for. FedAdam/FedYogi's server step rescales that mean per weight, so
# noise added after it would not be calibrated (and before it is not what Flower exposes).
DP_STRATEGIES = ("fedavg", "fedprox", "fedbn")
DP_CLIPPING = ("fixed", "adaptive")
SECAGG_STRATEGIES = ("fedavg", "fedprox")
# A site's compute device: auto (a CUDA GPU when torch sees one), cpu, cuda, cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
MODES = ("train", "evaluate", "cross-site")


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
    # FedAdam / FedYogi: the server optimiser's step size and adaptivity (Reddi et al. 2021).
    server_learning_rate: float = 0.01
    server_tau: float = 1e-3
    # FedTrimmedAvg: fraction of the largest and of the smallest values dropped per weight.
    trim_fraction: float = 0.2
    # Krum: how many faulty sites to tolerate.
    faulty_sites: int = 0
    # An update whose norm is over this many times the median of the other sites' is refused
    # and recorded as that site's failure (0: off).
    max_update_ratio: float = 10.0
    # User-level differential privacy (fedseg.privacy): Gaussian noise multiplier (0: off),
    # the L2 norm each site clips its update to, and the delta epsilon is reported at.
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    # "fixed": every round clips at dp-clipping-norm; "adaptive": dp-clipping-norm is the
    # first round's, then the norm follows the dp-target-quantile of the sites' update norms
    # (Andrew et al. 2021) with step dp-clip-lr, from a noised count of the clipped updates
    # (noise stdev dp-count-stddev; 0: min-train-sites / 20, the paper's choice).
    dp_clipping: str = "fixed"
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_count_stddev: float = 0.0
    # Secure aggregation (SecAgg+, fedseg.secure; fedavg and fedprox): the server learns only
    # the weighted mean. Each site's secrets are split among secagg-shares of the round's
    # sites, secagg-threshold of the shares recover them (the dropout tolerance); weights are
    # clipped to +-secagg-clipping-range, and no site may weigh (cases) over secagg-max-weight.
    secure_aggregation: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    secagg_max_weight: float = 1000.0
    # Cyclic: the order the model visits the sites in each round, comma-separated site names
    # ("": by site name). A site not named is not visited.
    site_order: str = ""
    # After the last round each site fine-tunes the final model this many steps on its own
    # training cases and validates both (0: no personalisation). The fine-tuned model stays.
    personalise_steps: int = 0
    # After the study, rerun it once per site with that site left out, to measure what each
    # site's data did for the others (fedseg.contributions; one study's cost per site).
    leave_one_out: bool = False
    model_preset: str = "tiny"
    local_steps: int = 40
    batch_size: int = 2
    learning_rate: float = 2e-3
    patch_size: int = 48
    fraction_train: float = 1.0
    min_train_sites: int = 2
    # Sites that must be connected before a round starts (0: min-train-sites); more than
    # min-train-sites when evaluation-only sites must take part too.
    min_available_sites: int = 0
    min_cases_to_report: int = 3
    seed: int = 0
    run_dir: str = ""
    sim_sites_dir: str = ""
    sim_client_threads: int = 1
    # Seconds to wait for min-train-sites sites to connect before giving up with an error.
    wait_for_sites: int = 600
    # Seconds a round's training (or validation) waits for replies; a silent site is left out.
    round_timeout: int = 3600
    # Continue the study in run-dir from its last completed round (see fedseg.resume).
    resume: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode '{self.mode}' unknown; choose from {MODES}")
        if self.mode != "train" and not self.initial_model:
            raise ConfigError(f"mode '{self.mode}' needs initial-model (the weights to validate)")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy '{self.strategy}' unknown; choose from {STRATEGIES}")
        if self.num_server_rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ConfigError("num-server-rounds, local-steps and batch-size must be >= 1")
        if self.server_learning_rate <= 0 or self.server_tau <= 0:
            raise ConfigError("server-learning-rate and server-tau must be > 0")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.personalise_steps < 0:
            raise ConfigError(f"personalise-steps must be >= 0, got {self.personalise_steps}")
        if self.strategy == "fedbn":
            self._check_fedbn()
        if self.private:
            self._check_dp()
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.site_order and self.strategy != "cyclic":
            raise ConfigError(f"site-order is for strategy cyclic, not {self.strategy}")
        named = self.site_sequence
        if len(set(named)) != len(named):
            raise ConfigError(f"site-order names a site twice: {self.site_order!r}")
        if self.max_update_ratio < 0 or 0 < self.max_update_ratio <= 1:
            raise ConfigError(
                f"max-update-ratio must be 0 (off) or > 1, got {self.max_update_ratio}"
            )
        if self.faulty_sites < 0:
            raise ConfigError(f"faulty-sites must be >= 0, got {self.faulty_sites}")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.min_cases_to_report < 1:
            raise ConfigError("min-cases-to-report must be >= 1")
        if self.resume and (self.mode != "train" or not self.run_dir):
            raise ConfigError('resume needs mode = "train" and the run-dir of the study')
        if self.wait_for_sites < 0 or self.round_timeout < 1:
            raise ConfigError("wait-for-sites must be >= 0 and round-timeout >= 1")
        if self.patch_size % 16:
            raise ConfigError(f"patch-size must be a multiple of 16, got {self.patch_size}")

    def _check_fedbn(self) -> None:
        # The sites' normalisation lives in Flower's per-run site state: nothing outside the
        # running study can supply or restore it.
        if self.mode != "train":
            raise ConfigError(f"strategy fedbn trains; mode '{self.mode}' cannot use it")
        if self.initial_model:
            raise ConfigError(
                "strategy fedbn keeps normalisation at the sites, so initial-model's cannot "
                "reach them: start fedbn from the preset's initialisation"
            )
        if self.resume:
            raise ConfigError(
                "a fedbn study cannot resume: each site's normalisation was kept in the "
                "interrupted run's site state"
            )

    def _check_secure_aggregation(self) -> None:
        # The server sees only the masked sum: whatever needs one site's update is out.
        if self.strategy not in SECAGG_STRATEGIES:
            raise ConfigError(
                f"secure aggregation gives the server only the weighted mean; strategy "
                f"{self.strategy} needs more (use one of {SECAGG_STRATEGIES})"
            )
        if self.private:
            raise ConfigError(
                "secure aggregation with differential privacy is not supported: fedseg's DP "
                "checks each site's clipping and steps at the server, which SecAgg+ hides"
            )
        if self.min_train_sites < 2:
            raise ConfigError(
                "secure aggregation needs min-train-sites >= 2 (one site hides nothing)"
            )
        if not 0 < self.secagg_shares <= 1 or not 0 < self.secagg_threshold <= 1:
            raise ConfigError("secagg-shares and secagg-threshold must be in (0, 1]")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ConfigError("secagg-clipping-range and secagg-max-weight must be > 0")

    def _check_dp(self) -> None:
        if self.strategy not in DP_STRATEGIES:
            raise ConfigError(
                f"differential privacy needs a mean of the updates; strategy {self.strategy} is "
                f"not one (use one of {DP_STRATEGIES})"
            )
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0:
            raise ConfigError("dp-noise-multiplier must be >= 0 and dp-clipping-norm > 0")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_clipping not in DP_CLIPPING:
            raise ConfigError(
                f"dp-clipping '{self.dp_clipping}' unknown; choose from {DP_CLIPPING}"
            )
        if self.dp_clipping == "adaptive":
            self._check_adaptive_clipping()

    def _check_adaptive_clipping(self) -> None:
        if not 0 <= self.dp_target_quantile <= 1 or self.dp_clip_lr <= 0:
            raise ConfigError("dp-target-quantile must be in [0, 1] and dp-clip-lr > 0")
        if self.dp_count_stddev < 0:
            raise ConfigError(f"dp-count-stddev must be >= 0, got {self.dp_count_stddev}")
        # The clipped count spends privacy too: the update noise z_u satisfies
        # z^-2 = z_u^-2 + (2 sigma_b)^-2, which has a solution only for z < 2 sigma_b.
        stddev = self.count_stddev
        if self.dp_noise_multiplier >= 2 * stddev:
            raise ConfigError(
                f"adaptive clipping with dp-noise-multiplier {self.dp_noise_multiplier} needs "
                f"dp-count-stddev above {self.dp_noise_multiplier / 2:g} (it is {stddev:g}): "
                'raise dp-count-stddev or use dp-clipping = "fixed"'
            )

    @property
    def count_stddev(self) -> float:
        """Noise stdev on the adaptive clipped count (``dp-count-stddev`` or its default)."""
        return self.dp_count_stddev or self.min_train_sites / 20

    @property
    def private(self) -> bool:
        """Differential privacy is on (a positive noise multiplier)."""
        return self.dp_noise_multiplier > 0

    @property
    def keeps_norm_local(self) -> bool:
        """FedBN: normalisation layers never leave the sites."""
        return self.strategy == "fedbn"

    @property
    def site_sequence(self) -> list[str]:
        """``site-order`` as a list of site names (empty: every site, by name)."""
        return [s.strip() for s in self.site_order.split(",") if s.strip()]

    @property
    def available_sites(self) -> int:
        """Connected sites a round waits for (at most wait-for-sites seconds)."""
        return max(self.min_available_sites, self.min_train_sites)

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


#: The file in a site folder (simulation) or named by ``fedseg client`` (deployment) that holds
#: the site's own settings. It stays at the site: the app bundle never includes it.
SITE_CONFIG_NAME = "site.toml"
# Node-config keys a site may set (``--node-config`` or the flattened site.toml). An unknown key
# is refused: a misspelt ``trian = false`` must not silently leave a site training.
_SITE_KEYS = (
    "data-path",
    "device",
    "egress-log",
    "num-threads",
    "min-cases-to-report",
    "train",
    "evaluate",
    "share-per-case",
    "share-local-model",
)
# What Flower itself puts in a simulated node's config.
_FLOWER_NODE_KEYS = ("partition-id", "num-partitions")


@dataclass(frozen=True, kw_only=True)
class Consent:
    """What a site agrees to take part in. The site decides; the server can only ask.

    Defaults are a training site that validates and shares aggregate metrics only.
    ``train = false`` makes an evaluation-only site (the seed paper's institutions that only
    validate). ``share_local_model`` covers cross-site validation, where a model trained on
    this site's data alone is sent to the other sites: more revealing than a federated
    update, so a site can refuse it.
    """

    train: bool = True
    evaluate: bool = True
    share_per_case: bool = False
    share_local_model: bool = True


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One site's own settings, from its SuperNode's node config or its ``site.toml``."""

    data_path: Path
    # auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N: fedseg.task.device.
    device: str = "auto"
    num_threads: int = 0
    consent: Consent = Consent()
    # The site's own floor for min-cases-to-report: the server sets the study's, but cannot
    # lower a site's below this (0: the study's value applies).
    min_cases_to_report: int = 0
    # Where the egress guard logs every reply sent or blocked (None: beside the data).
    egress_log: Path | None = None

    def min_cases(self, run: RunConfig) -> int:
        """Fewer validation cases than this and only their count leaves the site."""
        return max(run.min_cases_to_report, self.min_cases_to_report)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], run: RunConfig) -> SiteConfig:
        """Resolve the site folder and its settings.

        A deployed SuperNode names its folder (``data-path``) and settings in its node
        config; a simulated one only has a partition id, which picks the n-th canonical site
        under ``sim-sites-dir``, whose optional ``site.toml`` holds its settings.
        """
        if "data-path" in node_config:
            return cls.from_mapping(node_config, source="node config")
        if "partition-id" not in node_config or not run.sim_sites_dir:
            raise ConfigError("node config has neither 'data-path' nor a simulation partition")
        sites = simulation_sites(Path(run.sim_sites_dir))
        index = int(node_config["partition-id"])  # type: ignore[call-overload]
        if index >= len(sites):
            raise ConfigError(
                f"{run.sim_sites_dir}: partition {index} but only {len(sites)} site folders"
            )
        settings: dict[str, object] = {"num-threads": run.sim_client_threads}
        settings |= read_site_toml(sites[index] / SITE_CONFIG_NAME)
        settings["data-path"] = str(sites[index])
        return cls.from_mapping(settings, source=str(sites[index] / SITE_CONFIG_NAME))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], *, source: str) -> SiteConfig:
        """Parse flat site keys (``data-path``, ``train``, ``share-per-case``, ...)."""
        unknown = sorted(set(values) - set(_SITE_KEYS) - set(_FLOWER_NODE_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown site setting(s) {unknown}; known: {_SITE_KEYS}")
        try:
            consent = {
                f.name: _get(values, f.name.replace("_", "-"), bool, f.default)
                for f in fields(Consent)
            }
            threads = _get(values, "num-threads", int, 0)
            device = str(_get(values, "device", str, "auto"))
            if not DEVICE_PATTERN.fullmatch(device):
                raise ConfigError(f"device '{device}' unknown; use auto, cpu, cuda or cuda:N")
            floor = _get(values, "min-cases-to-report", int, 0)
            egress_log = str(_get(values, "egress-log", str, ""))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return cls(
            data_path=Path(str(values["data-path"])),
            device=device,
            num_threads=int(threads),  # type: ignore[call-overload]
            consent=Consent(**consent),  # type: ignore[arg-type]
            min_cases_to_report=int(floor),  # type: ignore[call-overload]
            egress_log=Path(egress_log) if egress_log else None,
        )


#: The tables of a site.toml: the site's settings, its consent, and (deployment only, read by
#: ``fedseg client``) how its SuperNode connects.
SITE_TABLES = ("site", "consent", "connection")


def read_site_tables(path: Path) -> dict[str, dict[str, object]]:
    """A site.toml's tables, refusing unknown ones; ``{}`` when there is no file."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    for table, values in data.items():
        if table not in SITE_TABLES or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown table [{table}]; expected {list(SITE_TABLES)}")
    return data


def read_site_toml(path: Path) -> dict[str, object]:
    """A site's ``site.toml`` flattened to node-config keys; ``{}`` when there is none.

    ``[site]`` holds ``data-path``, ``num-threads`` and ``min-cases-to-report`` (the site's
    own floor), ``[consent]`` the four consent keys. ``[site] name`` is checked against the
    dataset by ``fedseg client`` and ``[connection]`` is for it alone: neither is node config.
    """
    return node_keys(read_site_tables(path))


def node_keys(tables: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The node-config keys of a site.toml's tables (``[site]`` without ``name``, and
    ``[consent]``)."""
    flat = {**tables.get("site", {}), **tables.get("consent", {})}
    flat.pop("name", None)
    return flat


def simulation_sites(root: Path) -> list[Path]:
    """Canonical site folders under ``root`` (those holding a manifest), in a stable order."""
    return sorted(p.parent for p in root.glob("*/manifest.json"))


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (``hash()`` is salted per process, so not that)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
