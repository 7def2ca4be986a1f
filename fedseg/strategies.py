"""Strategy registry and per-site metric bookkeeping.

Flower's aggregated ``Result`` keeps only anonymous averages; a study needs to know how each
hospital did. The strategies here are Flower's own, with ``aggregate_train`` and
``aggregate_evaluate`` first recording every reply under the site name it carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from evaluation.regions import REGION_NAMES
from evaluation.summary import STATISTICS
from fedseg.config import RunConfig


@dataclass
class RoundRecord:
    """Everything the server learnt from the sites in one round."""

    round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

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
        return {
            "round": self.round,
            "sites": self.sites,
            "pooled": {"n_cases": sum(s["n_cases"] for s in self.reported()), **self.pooled()},
            "train": self.train,
            "failures": self.failures,
        }


@dataclass
class MetricsBook:
    """Per-round, per-site records, keyed by site name rather than Flower node id."""

    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    node_sites: dict[int, str] = field(default_factory=dict)

    def _round(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(round=server_round))

    def _site_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if not msg.has_error() and "site" in msg.content:
            identity = msg.content["site"]
            assert isinstance(identity, ConfigRecord)
            self.node_sites[node] = str(identity["site"])
        return self.node_sites.get(node, f"node-{node}")

    def _successes(
        self, record: RoundRecord, replies: list[Message], phase: str
    ) -> Iterator[tuple[str, MetricRecord, ConfigRecord]]:
        """Yield (site, metrics, identity) of good replies; note failures by site name."""
        for msg in replies:
            reason = str(msg.error.reason) if msg.has_error() else declined_reason(msg)
            if reason is not None:
                record.failures.append(
                    {"site": self._site_of(msg), "phase": phase, "reason": reason}
                )
                continue
            metrics, identity = msg.content["metrics"], msg.content["site"]
            assert isinstance(metrics, MetricRecord) and isinstance(identity, ConfigRecord)
            yield self._site_of(msg), metrics, identity

    def record_train(self, server_round: int, replies: list[Message]) -> None:
        """Note each site's training summary, or its failure."""
        record = self._round(server_round)
        for site, m, _ in self._successes(record, replies, "train"):
            record.train[site] = {
                "n_cases": int(m["num-examples"]),  # type: ignore[arg-type]
                "loss": float(m["train-loss"]),  # type: ignore[arg-type]
                "steps": int(m["local-steps"]),  # type: ignore[arg-type]
                "seconds": float(m["train-seconds"]),  # type: ignore[arg-type]
            }

    def record_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """Note each site's validation summary on its own held-out cases, or its failure.

        A site below its minimum case count sends only the count: it is recorded as withheld
        and left out of the pooled values.
        """
        record = self._round(server_round)
        for site, m, identity in self._successes(record, replies, "evaluate"):
            n_cases = int(m["num-examples"])  # type: ignore[arg-type]
            entry: dict[str, Any] = {
                "n_cases": n_cases,
                "fingerprint": str(identity["fingerprint"]),
            }
            if f"dice-{REGION_NAMES[0]}-mean" not in m:
                entry["withheld"] = True
                entry["summary"] = {
                    r: {k: {"count": n_cases} for k in METRICS} for r in REGION_NAMES
                }
            else:
                entry["summary"] = {
                    r: {k: _statistics(m, f"{k}-{r}", n_cases) for k in METRICS}
                    for r in REGION_NAMES
                }
                for k in METRICS:
                    entry[k] = {r: entry["summary"][r][k]["mean"] for r in REGION_NAMES}
            record.sites[site] = entry

    def to_json(self) -> dict[str, Any]:
        """``{"rounds": [...], "final": <last round with validation results>}``."""
        rounds = [self.rounds[r].to_json() for r in sorted(self.rounds)]
        validated = [r for r in rounds if r["sites"]]
        return {"rounds": rounds, "final": validated[-1] if validated else None}


METRICS = ("dice", "hd95")


def _statistics(m: MetricRecord, prefix: str, n_cases: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"count": n_cases}
    for stat in STATISTICS:
        value = m.get(f"{prefix}-{stat}")
        stats[stat] = None if value is None else float(value)  # type: ignore[arg-type]
    return stats


def declined_reason(msg: Message) -> str | None:
    """Why a site declined this round (its data failed validation), or None."""
    if msg.has_error() or "site" not in msg.content:
        return None
    identity = msg.content["site"]
    assert isinstance(identity, ConfigRecord)
    reason = identity.get("declined")
    return None if reason is None else str(reason)


class _Recording:
    """Mixin: record replies per site, then aggregate exactly as the Flower strategy does."""

    book: MetricsBook

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.book.record_train(server_round, replies)
        accepted = [m for m in replies if declined_reason(m) is None]
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc,no-any-return]

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


def build_strategy(run: RunConfig, *, book: MetricsBook) -> Strategy:
    """The strategy a run config asks for, recording into ``book``."""
    common: dict[str, Any] = {
        # An evaluation-only run sends no training message at all.
        "fraction_train": 0.0 if run.mode == "evaluate" else run.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": run.min_train_sites,
        "min_evaluate_nodes": run.min_train_sites,
        "min_available_nodes": run.min_train_sites,
        "weighted_by_key": "num-examples",
    }
    strategy: _Recording
    if run.strategy == "fedavg":
        strategy = RecordingFedAvg(**common)
    elif run.strategy == "fedprox":
        strategy = RecordingFedProx(proximal_mu=run.proximal_mu, **common)
    else:  # RunConfig validates the name; this guards against a registry drift.
        raise ValueError(f"strategy '{run.strategy}' has no implementation")
    strategy.book = book
    assert isinstance(strategy, Strategy)
    return strategy
