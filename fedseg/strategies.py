"""Strategy registry and per-site metric bookkeeping.

Flower's aggregated ``Result`` keeps only anonymous averages; a study needs to know how each
hospital did. The strategies here are Flower's own, with ``aggregate_train`` and
``aggregate_evaluate`` first recording every reply under the site name it carries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from evaluation.regions import REGION_NAMES
from fedseg.config import RunConfig
from fedseg.privacy import (
    CLIPPED_METRIC,
    KEY_REPORT_CLIPPED,
    AdaptiveClipping,
    DpSettings,
    PrivateRelease,
)
from fedseg.records import METRICS, WEIGHTS, content_digest, declined, site_entry, update_problem
from fedseg.secure import SecAggSettings


@dataclass
class RoundRecord:
    """Everything the server learnt from the sites in one round."""

    round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    # Sites that sat a phase out by their own choice (evaluation-only, no consent): no failure.
    abstained: list[dict[str, str]] = field(default_factory=list)
    # Why the global model was not updated this round ("" when it was).
    not_aggregated: str = ""
    # What each site's replies held, by size and sha256 (fedseg.records.content_digest): the
    # audit trail's side of the comparison with each site's egress log. Not in metrics.json.
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Differential privacy spent after this round's release (fedseg.privacy); {} without DP.
    privacy: dict[str, Any] = field(default_factory=dict)

    def reported(self) -> list[dict[str, Any]]:
        """Sites that sent scores (not withheld for too few cases)."""
        return [s for s in self.sites.values() if not s.get("withheld")]

    def pooled(self) -> dict[str, dict[str, float]]:
        """Case-weighted means over reporting sites, i.e. the mean over their cases."""
        sites = self.reported()
        total = sum(s["n_cases"] for s in sites)
        if total == 0:
            return {}
        return {
            metric: {
                r: sum(s[metric][r] * s["n_cases"] for s in sites) / total for r in REGION_NAMES
            }
            for metric in METRICS
        }

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` form of one round (see README for the schema)."""
        out = {
            "round": self.round,
            "sites": self.sites,
            "pooled": {"n_cases": sum(s["n_cases"] for s in self.reported()), **self.pooled()},
            "train": self.train,
            "failures": self.failures,
            "abstained": self.abstained,
        }
        if self.not_aggregated:
            out["not_aggregated"] = self.not_aggregated
        if self.privacy:
            out["privacy"] = self.privacy
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """Back from ``to_json`` (``pooled`` is derived, so recomputed rather than read)."""
        return cls(
            round=int(data["round"]),
            sites=dict(data["sites"]),
            train=dict(data["train"]),
            failures=list(data["failures"]),
            abstained=list(data.get("abstained", [])),
            not_aggregated=str(data.get("not_aggregated", "")),
            privacy=dict(data.get("privacy", {})),
        )


@dataclass
class MetricsBook:
    """Per-round, per-site records, keyed by site name rather than Flower node id."""

    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    node_sites: dict[int, str] = field(default_factory=dict)
    # Values in the model's packed weights; a trained update of another size is refused.
    weights_size: int = 0

    def round_record(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(round=server_round))

    def _site_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if not msg.has_error() and "site" in msg.content:
            identity = msg.content["site"]
            assert isinstance(identity, ConfigRecord)
            self.node_sites[node] = str(identity["site"])
        return self.node_sites.get(node, f"node-{node}")

    def successes(
        self, record: RoundRecord, replies: list[Message], phase: str
    ) -> Iterator[tuple[Message, str, ConfigRecord]]:
        """Yield (reply, site, identity) of good replies; note the others by site name."""
        for msg in replies:
            site = self._site_of(msg)
            if msg.has_error():
                reason = str(msg.error.reason)
                record.failures.append({"site": site, "phase": phase, "reason": reason})
                continue
            size, sha256 = content_digest(msg.content)
            record.received.setdefault(site, []).append(
                {"phase": phase, "bytes": size, "sha256": sha256}
            )
            no = declined(msg)
            if no is not None:
                kind, reason = no
                into = record.abstained if kind == "abstain" else record.failures
                into.append({"site": site, "phase": phase, "reason": reason})
                continue
            identity = msg.content["site"]
            assert isinstance(identity, ConfigRecord)
            yield msg, site, identity

    def record_train(
        self, server_round: int, replies: list[Message], *, masked: bool = False
    ) -> dict[int, ArrayRecord]:
        """Note each site's training summary, or its failure; return the trained arrays of
        the good replies by node id. ``masked``: secure aggregation, whose replies carry
        the summary beside a masked vector and no weights to check."""
        record = self.round_record(server_round)
        trained: dict[int, ArrayRecord] = {}
        for msg, site, identity in self.successes(record, replies, "train"):
            m, arrays = msg.content["metrics"], msg.content["arrays"]
            assert isinstance(m, MetricRecord) and isinstance(arrays, ArrayRecord)
            checked = self.weights_size and not masked
            problem = update_problem(arrays, size=self.weights_size) if checked else None
            if problem:
                record.failures.append({"site": site, "phase": "train", "reason": problem})
                continue
            record.train[site] = {
                "fingerprint": str(identity["fingerprint"]),
                "bytes": record.received[site][-1]["bytes"],
                "n_cases": int(m["num-examples"]),  # type: ignore[arg-type]
                "loss": float(m["train-loss"]),  # type: ignore[arg-type]
                "steps": int(m["local-steps"]),  # type: ignore[arg-type]
                "seconds": float(m["train-seconds"]),  # type: ignore[arg-type]
            }
            if "harmonisation" in identity:
                harmonisation = json.loads(str(identity["harmonisation"]))
                record.train[site]["harmonisation"] = harmonisation
            trained[msg.metadata.src_node_id] = arrays
        return trained

    def harmonisation_by_site(self) -> dict[str, dict[str, Any]]:
        """The harmonisation each site last reported with a training reply."""
        return {site: entry["harmonisation"] for _, record in sorted(self.rounds.items())
                for site, entry in record.train.items() if "harmonisation" in entry}  # fmt: skip

    def screen_outliers(
        self, server_round: int, trained: dict[int, ArrayRecord], *, reference: ArrayRecord,
        max_ratio: float,
    ) -> dict[int, ArrayRecord]:  # fmt: skip
        """Drop updates whose norm (distance from ``reference``, the round's global model) is
        over ``max_ratio`` times the median of the other sites' (0: keep all).

        A site with a broken or poisoned update (scaled, exploded) is recorded as a failure
        rather than averaged in; scale-free, so it works from round 1 to the last.
        """
        if max_ratio <= 0 or len(trained) < 2:
            return trained
        start = reference[WEIGHTS].numpy()
        norms = {n: float(np.linalg.norm(a[WEIGHTS].numpy() - start)) for n, a in trained.items()}

        def problem(node: int, _: str) -> str | None:
            others = float(np.median([v for k, v in norms.items() if k != node]))
            if others > 0 and norms[node] > max_ratio * others:
                return (f"update norm {norms[node]:.3g} is {norms[node] / others:.0f}x the "
                        f"median of the other sites' ({others:.3g}; max-update-ratio "
                        f"{max_ratio:g}): not averaged in")  # fmt: skip
            return None

        return self._screen(server_round, trained, problem)

    def screen_dp(
        self, server_round: int, trained: dict[int, ArrayRecord], *, steps: int,
        clipped: dict[int, bool] | None = None,
    ) -> dict[int, ArrayRecord]:  # fmt: skip
        """Under DP every site weighs the same (its ``local-steps``): refuse one claiming
        other work, which would weigh it more than the noise is calibrated for. With adaptive
        clipping (``clipped``: the flags the sites sent) an update must say whether it was
        clipped, or the norm cannot follow."""
        record = self.round_record(server_round)

        def problem(node: int, site: str) -> str | None:
            claimed = record.train.get(site, {}).get("steps")
            if claimed != steps:
                return f"reported {claimed} local steps, the study asked {steps}: not averaged in"
            if clipped is not None and node not in clipped:
                return "did not say whether its update was clipped (adaptive DP): not averaged in"
            return None

        return self._screen(server_round, trained, problem)

    def _screen(
        self, server_round: int, trained: dict[int, ArrayRecord],
        problem: Callable[[int, str], str | None],
    ) -> dict[int, ArrayRecord]:  # fmt: skip
        """The updates ``problem`` (node, site) finds nothing wrong with; each other one is
        recorded as its site's training failure and taken out of the round's training."""
        record = self.round_record(server_round)
        kept = {}
        for node, arrays in trained.items():
            site = self.node_sites.get(node, f"node-{node}")
            reason = problem(node, site)
            if reason:
                record.failures.append({"site": site, "phase": "train", "reason": reason})
                record.train.pop(site, None)
                continue
            kept[node] = arrays
        return kept

    def record_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """Note each site's validation summary on its own held-out cases, or its failure.

        A site below its minimum case count sends only the count: it is recorded as withheld
        and left out of the pooled values.
        """
        record = self.round_record(server_round)
        for msg, site, identity in self.successes(record, replies, "evaluate"):
            m = msg.content["metrics"]
            assert isinstance(m, MetricRecord)
            record.sites[site] = site_entry(m, identity)

    def to_json(self) -> dict[str, Any]:
        """``{"rounds": [...], "final": <last round with validation results>}``."""
        rounds = [self.rounds[r].to_json() for r in sorted(self.rounds)]
        validated = [r for r in rounds if r["sites"]]
        return {"rounds": rounds, "final": validated[-1] if validated else None}

    @classmethod
    def restore(
        cls, rounds: list[dict[str, Any]], *, node_sites: dict[int, str], up_to: int,
        weights_size: int = 0,
    ) -> MetricsBook:  # fmt: skip
        """The book as it stood after round ``up_to`` (a resumed study's history)."""
        kept = [RoundRecord.from_json(r) for r in rounds if int(r["round"]) <= up_to]
        return cls(rounds={r.round: r for r in kept}, node_sites=dict(node_sites),
                   weights_size=weights_size)  # fmt: skip


def too_few_trained(trained: int, required: int) -> str:
    """Why a round kept the previous global model: fewer sites trained than required."""
    return (
        f"only {trained} of the {required} sites required (min-train-sites) trained; the "
        "global model is unchanged"
    )


def clipped_flags(replies: list[Message]) -> dict[int, bool]:
    """Whether each site that says so clipped its update (adaptive DP clipping), by node.
    Read from the replies, never kept per site: only the noised count is released."""
    flags = {}
    for msg in replies:
        metrics = msg.content.get("metrics") if msg.has_content() else None
        if isinstance(metrics, MetricRecord) and CLIPPED_METRIC in metrics:
            flags[msg.metadata.src_node_id] = bool(metrics[CLIPPED_METRIC])
    return flags


def training_harmonisation(book: MetricsBook) -> tuple[dict[str, Any] | None, list[str]]:
    """The harmonisation every site that trained used, or None and the sites' differences
    (a model trained on two spacings has no one way to prepare a new scan)."""
    by_site = book.harmonisation_by_site()
    distinct = {json.dumps(h, sort_keys=True) for h in by_site.values()}
    if len(distinct) == 1:
        return json.loads(distinct.pop()), []
    spacings = [f"{site}: {h.get('target_spacing_mm')}" for site, h in sorted(by_site.items())]
    return None, spacings


class _Recording:
    """Mixin: record replies per site, then aggregate exactly as the Flower strategy does."""

    book: MetricsBook
    # Updates this many times the median norm of the others are refused (0: off).
    max_update_ratio: float = 0.0
    # The global model the round's training started from (configure_train's).
    _start: ArrayRecord | None = None

    # Differential privacy (fedseg.privacy): clipping asked of the sites, noise on the mean.
    privacy: PrivateRelease | None = None
    # With DP every site weighs the same; an update claiming other work is refused.
    expected_steps: int = 0
    # Secure aggregation (fedseg.secure): training rounds run SecAgg+ (None: plain).
    secure: SecAggSettings | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        self._start = arrays
        if self.privacy is not None:
            config[KEY_CLIPPING_NORM] = self.privacy.clipping_norm
            config[KEY_REPORT_CLIPPED] = self.privacy.settings.adaptive is not None
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc, no-any-return]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        trained = self.book.record_train(server_round, replies)
        if self._start is not None:
            trained = self.book.screen_outliers(server_round, trained, reference=self._start,
                                                max_ratio=self.max_update_ratio)  # fmt: skip
        adaptive = self.privacy is not None and self.privacy.settings.adaptive is not None
        flags = clipped_flags(replies) if adaptive else None
        if self.privacy is not None:
            trained = self.book.screen_dp(
                server_round, trained, steps=self.expected_steps, clipped=flags
            )
        required = int(getattr(self, "min_train_nodes", 1))
        if replies and len(trained) < required:
            # Averaging fewer sites than the study requires would let one hospital's update
            # stand for the federation: keep the previous global model instead.
            self.book.rounds[server_round].not_aggregated = too_few_trained(len(trained), required)
            return None, None
        accepted = [m for m in replies if m.metadata.src_node_id in trained]
        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if arrays is None:
            return None, metrics
        # The model is float32 everywhere; Flower's FedOpt family computes in float64, which
        # would double what travels and make a resumed study differ from an uninterrupted one.
        as32 = ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()})
        if self.privacy is not None:
            said = None if flags is None else [flags[n] for n in trained]
            as32, spent = self.privacy.release(as32, clipped=said)
            self.book.rounds[server_round].privacy = spent
        return as32, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        # Not FedAvg's own aggregation: a site withholding its scores sends other metric keys
        # than the rest, which Flower's consistency check refuses; the pooled values are ours.
        self.book.record_evaluate(server_round, list(replies))
        record = self.book.rounds[server_round]
        pooled = {f"{k}-{r}": v for k, by in record.pooled().items() for r, v in by.items()}
        return MetricRecord(
            {"num-examples": sum(s["n_cases"] for s in record.reported()), **pooled}
        )


class RecordingFedAvg(_Recording, FedAvg):
    """FedAvg weighted by each site's number of training cases (Rieke et al., Alg. 1)."""


class RecordingFedProx(_Recording, FedProx):
    """FedProx: FedAvg plus ``proximal-mu`` sent to the sites, which add the proximal term."""


class RecordingFedBN(RecordingFedAvg):
    """FedBN (Li et al. 2021): FedAvg over everything but normalisation layers, which the
    sites keep (they are not in what travels: :mod:`fedseg.task.sharing`)."""


class RecordingCyclic(RecordingFedAvg):
    """The cyclic compute plan (Rieke et al. 2020, Fig. 2e; Chang et al. 2018): each round the
    model visits the sites one after another in ``order``, each training it further, instead
    of being averaged. :func:`fedseg.rounds.cyclic_round` runs the visits; validation is
    FedAvg's (every site validates the round's model)."""

    #: Site names in visiting order; empty: every connected site, by name.
    order: list[str]


class _ServerMoments:
    """Mixin for Flower's FedOpt family: its server-side moments (``m_t``, ``v_t``) are the
    strategy's state, saved with every checkpoint so a resumed study continues them."""

    m_t: dict[str, Any] | None
    v_t: dict[str, Any] | None

    def state_arrays(self) -> dict[str, Any]:
        out = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name) or {}).items():
                out[f"{name}/{key}"] = value
        return out

    def load_state_arrays(self, arrays: Mapping[str, Any]) -> None:
        for name in ("m_t", "v_t"):
            found = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
            setattr(self, name, found or None)


class RecordingFedAdam(_ServerMoments, _Recording, FedAdam):
    """FedAdam (Reddi et al. 2021): the averaged update drives a server-side Adam step."""


class RecordingFedYogi(_ServerMoments, _Recording, FedYogi):
    """FedYogi (Reddi et al. 2021): as FedAdam with Yogi's additive second moment."""


class RecordingFedMedian(_Recording, FedMedian):
    """Coordinate-wise median of the sites' models: one faulty site cannot drag it far."""


class RecordingFedTrimmedAvg(_Recording, FedTrimmedAvg):
    """Mean after dropping the ``trim-fraction`` largest and smallest values per coordinate."""


class RecordingKrum(_Recording, Krum):
    """Krum (Blanchard et al. 2017): the one site model closest to its neighbours."""


def _options(run: RunConfig) -> dict[str, dict[str, Any]]:
    """Each strategy's own options from the run config."""
    server_opt = {"eta": run.server_learning_rate, "tau": run.server_tau}
    return {
        "fedavg": {},
        "fedprox": {"proximal_mu": run.proximal_mu},
        "fedadam": server_opt,
        "fedyogi": server_opt,
        "fedmedian": {},
        "fedtrimmedavg": {"beta": run.trim_fraction},
        "krum": {"num_malicious_nodes": run.faulty_sites},
        "fedbn": {},
        "cyclic": {},
    }


#: The strategies a run config may name (``strategy = "..."``).
REGISTRY: dict[str, type[_Recording]] = {
    "fedavg": RecordingFedAvg,
    "fedprox": RecordingFedProx,
    "fedadam": RecordingFedAdam,
    "fedyogi": RecordingFedYogi,
    "fedmedian": RecordingFedMedian,
    "fedtrimmedavg": RecordingFedTrimmedAvg,
    "krum": RecordingKrum,
    "fedbn": RecordingFedBN,
    "cyclic": RecordingCyclic,
}


#: Strategies whose new model is a weighted mean of the sites' (Flower's FedAvg aggregation).
MEAN_AGGREGATION = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedbn"})


def weighting(run: RunConfig) -> tuple[str, str]:
    """What weighs a site in the mean: its metric key and the ``RoundRecord.train`` field.

    FedAvg weights sites by cases (Rieke et al., Alg. 1); DP's noise assumes equal weights,
    and every site does the same ``local-steps``.
    """
    return ("local-steps", "steps") if run.private else ("num-examples", "n_cases")


def aggregation_weights(run: RunConfig, train: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each trained site's weight in the round's mean (``{}`` for a strategy that takes none:
    median, trimmed mean, Krum, the cyclic plan)."""
    _, field_name = weighting(run)
    total = sum(entry[field_name] for entry in train.values())
    if run.strategy not in MEAN_AGGREGATION or not total:
        return {}
    return {site: entry[field_name] / total for site, entry in train.items()}


def _adaptive(run: RunConfig) -> AdaptiveClipping | None:
    if run.dp_clipping != "adaptive":
        return None
    return AdaptiveClipping(
        target_quantile=run.dp_target_quantile,
        learning_rate=run.dp_clip_lr,
        count_stddev=run.count_stddev,
    )


def build_strategy(run: RunConfig, *, book: MetricsBook) -> Strategy:
    """The strategy a run config asks for, recording into ``book``."""
    common: dict[str, Any] = {
        # An evaluation-only run sends no training message at all.
        "fraction_train": 0.0 if run.mode == "evaluate" else run.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": run.min_train_sites,
        "min_evaluate_nodes": run.min_train_sites,
        "min_available_nodes": run.available_sites,
        "weighted_by_key": weighting(run)[0],
    }
    if run.strategy not in REGISTRY:  # RunConfig validates the name; this guards a drift
        raise ValueError(f"strategy '{run.strategy}' has no implementation")
    strategy = REGISTRY[run.strategy](**common, **_options(run)[run.strategy])  # type: ignore[call-arg]
    strategy.book = book
    strategy.max_update_ratio = run.max_update_ratio
    if run.private:
        strategy.privacy = PrivateRelease(DpSettings(
            noise_multiplier=run.dp_noise_multiplier, clipping_norm=run.dp_clipping_norm,
            delta=run.dp_delta, min_sites=run.min_train_sites,
            adaptive=_adaptive(run)))  # fmt: skip
        strategy.expected_steps = run.local_steps
    if run.secure_aggregation:
        strategy.secure = SecAggSettings(shares=run.secagg_shares, threshold=run.secagg_threshold,
                                         clipping_range=run.secagg_clipping_range,
                                         max_weight=run.secagg_max_weight)  # fmt: skip
    if isinstance(strategy, RecordingCyclic):
        strategy.order = run.site_sequence
    assert isinstance(strategy, Strategy)
    return strategy
