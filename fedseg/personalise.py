"""Personalisation after a study: each site fine-tunes the final model on its own training
cases and validates both versions on its own held-out cases.

The seed paper notes that the global optimum need not be the best model for a given site;
this measures by how much, per site, without the fine-tuned model ever leaving the site: only
the two validation summaries travel (``evaluate.personalised``).
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedseg.config import RunConfig
from fedseg.exchange import exchange
from fedseg.records import site_entry
from fedseg.strategies import MetricsBook, RoundRecord

VERSIONS = ("global", "personalised")


def run_personalisation(
    grid: Grid, *, arrays: ArrayRecord, run: RunConfig, book: MetricsBook
) -> dict[str, Any]:
    """``metrics.json``'s ``personalisation``: per site the global and the personalised
    model's validation entry, and the failures and abstentions by site."""
    nodes = sorted(grid.get_node_ids())
    log(INFO, "personalisation: %d sites fine-tune the final model for %d steps",
        len(nodes), run.personalise_steps)  # fmt: skip
    config = ConfigRecord({"personalise-steps": run.personalise_steps})
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            message_type="evaluate.personalised",
            dst_node_id=node,
        )
        for node in nodes
    ]
    replies = exchange(grid, messages, timeout_s=run.round_timeout)
    record = RoundRecord(round=run.num_server_rounds)
    sites: dict[str, dict[str, Any]] = {}
    for msg, site, identity in book.successes(record, replies, "personalise"):
        entries = {}
        for version in VERSIONS:
            metrics = msg.content[f"metrics-{version}"]
            assert isinstance(metrics, MetricRecord)
            entries[version] = site_entry(metrics, identity)
        sites[site] = {**entries, "steps": run.personalise_steps}
    return {
        "steps": run.personalise_steps,
        "sites": sites,
        "failures": record.failures,
        "abstained": record.abstained,
    }
