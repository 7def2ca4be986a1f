"""Cross-site validation: one model trained at each site alone, and the global model, each
validated at every site, giving a models x sites matrix.

It is the standard test of whether a model generalises to institutions it never saw
(Sheller et al. 2020; NVFlare's cross-site model evaluation): the diagonal is a site's own
model at home, the rest of a row is that model abroad, and the global row is what federation
bought. Each local model is trained with the same budget and code as the study (the same
initialisation, rounds of ``local-steps`` with a fresh optimiser each, the same seeds), only
never averaged, so the comparison is like for like.

A site that does not consent to share a model trained on its data alone
(``share-local-model = false``) or takes part in evaluation only has no row, but still
validates every model; a site that fails is recorded by name and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from evaluation.regions import REGION_NAMES
from fedseg.config import RunConfig
from fedseg.exchange import exchange
from fedseg.records import METRICS, site_entry
from fedseg.rounds import wait_for_sites
from fedseg.strategies import MetricsBook, RoundRecord

#: The row of the federated (global) model.
GLOBAL = "global"


@dataclass
class CrossSiteResult:
    """The local models (by site) and every model's validation entry at every site."""

    local_models: dict[str, ArrayRecord]
    models: list[str]
    entries: dict[str, dict[str, dict[str, Any]]]
    # The global model's row as a round record: what metrics.json's "final" holds.
    evaluation: RoundRecord

    def matrix(self) -> dict[str, Any]:
        """``metrics.json``'s ``cross_site``: mean per model (rows) and site (columns);
        ``None`` where a site withheld its scores, declined or failed."""
        sites = sorted(
            {s for by_site in self.entries.values() for s in by_site}
            | {f["site"] for f in [*self.evaluation.failures, *self.evaluation.abstained]}
        )
        out: dict[str, Any] = {"models": self.models, "sites": sites}
        for metric in METRICS:
            out[metric] = {
                region: [
                    [self.entries.get(m, {}).get(s, {}).get(metric, {}).get(region) for s in sites]
                    for m in self.models
                ]
                for region in REGION_NAMES
            }
        out["entries"] = self.entries
        out["failures"] = self.evaluation.failures
        out["abstained"] = self.evaluation.abstained
        return out


def train_local_models(
    grid: Grid, nodes: list[int], *, start: ArrayRecord, run: RunConfig, book: MetricsBook
) -> dict[str, ArrayRecord]:
    """Train one model per site for ``num-server-rounds`` rounds, never averaging.

    A site that declines or fails in a round drops out (its model would be unfinished).
    """
    models = dict.fromkeys(nodes, start)
    for server_round in range(1, run.num_server_rounds + 1):
        if not models:
            break
        log(INFO, "[ROUND %d/%d] cross-site: one model per site, trained alone",
            server_round, run.num_server_rounds)  # fmt: skip
        messages = [
            Message(
                RecordDict(
                    {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
                ),
                message_type="train.local",
                dst_node_id=node,
            )
            for node, arrays in models.items()
        ]
        replies = exchange(grid, messages, timeout_s=run.round_timeout)
        models = book.record_train(server_round, replies)
    return {book.node_sites[node]: arrays for node, arrays in models.items()}


def evaluate_models(
    grid: Grid,
    nodes: list[int],
    *,
    models: dict[str, ArrayRecord],
    book: MetricsBook,
    server_round: int,
    timeout_s: float,
) -> tuple[dict[str, dict[str, dict[str, Any]]], RoundRecord]:
    """Send every model to every site in one message each; ``entries[model][site]``."""
    names = list(models)
    content = RecordDict({"config": ConfigRecord({"num-models": len(names)})})
    for i, name in enumerate(names):
        content[f"model-{i}"] = models[name]
    log(INFO, "cross-site: %d models validated at %d sites", len(names), len(nodes))
    messages = [
        Message(content, message_type="evaluate.models", dst_node_id=node) for node in nodes
    ]
    replies = exchange(grid, messages, timeout_s=timeout_s)
    record = RoundRecord(round=server_round)
    entries: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in names}
    for msg, site, identity in book.successes(record, replies, "evaluate"):
        for i, name in enumerate(names):
            metrics = msg.content[f"metrics-{i}"]
            assert isinstance(metrics, MetricRecord)
            entries[name][site] = site_entry(metrics, identity)
    record.sites = dict(entries[GLOBAL])
    return entries, record


def run_cross_site(
    grid: Grid, *, run: RunConfig, start: ArrayRecord, global_model: ArrayRecord, book: MetricsBook
) -> CrossSiteResult:
    """Train the local models, then validate them and the global model everywhere."""
    nodes = wait_for_sites(grid, minimum=run.available_sites, timeout_s=run.wait_for_sites)
    local = train_local_models(grid, nodes, start=start, run=run, book=book)
    models = {GLOBAL: global_model, **{site: local[site] for site in sorted(local)}}
    entries, evaluation = evaluate_models(
        grid, nodes, models=models, book=book, server_round=run.num_server_rounds,
        timeout_s=run.round_timeout,
    )  # fmt: skip
    return CrossSiteResult(
        local_models=local, models=list(models), entries=entries, evaluation=evaluation
    )
