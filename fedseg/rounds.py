"""The server's round loop: Flower's ``Strategy.start`` made restartable and bounded.

``Strategy.start`` always counts rounds from 1 and waits on the grid without limit: a study
restarted after a crash would start over, and a missing site would hang it. This loop calls
the same strategy methods (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) in the same order, from any first round, with a bounded wait for sites
and per-phase timeout, and polls the grid every fraction of a second instead of every 3 s
(Flower's ``send_and_receive`` sleeps 3 s between polls, which each message pays).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

POLL_SECONDS = 0.2


class SitesMissingError(RuntimeError):
    """Too few sites connected within ``wait-for-sites`` seconds."""


def exchange(
    grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float = POLL_SECONDS
) -> list[Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout_s``.

    A site that never answers is simply absent from the result; one whose SuperNode died is
    answered by the SuperLink with an error reply once its heartbeat lapses.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    destination = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                # The SuperLink answers for a node that went silent (NODE_UNAVAILABLE) under
                # its own id; the failure is that node's, so it is recorded under its site.
                dst = destination.get(reply.metadata.reply_to_message_id, SUPERLINK_NODE_ID)
                reply.metadata.__dict__["_src_node_id"] = dst
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if pending:
            time.sleep(poll_s)
    if pending:
        log(INFO, "%d site(s) did not reply within %.0f s", len(pending), timeout_s)
    return replies


def wait_for_sites(grid: Grid, *, minimum: int, timeout_s: float) -> list[int]:
    """The connected node ids once at least ``minimum`` are there; an error after
    ``timeout_s`` (Flower's own sampling would wait forever)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise SitesMissingError(
                f"only {len(nodes)} of the {minimum} sites required (min-train-sites, "
                "min-available-sites) "
                f"connected within {timeout_s:.0f} s (wait-for-sites)"
            )
        time.sleep(POLL_SECONDS)
    return nodes


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """Which rounds to run and how long to wait for sites."""

    first_round: int
    last_round: int
    min_sites: int
    wait_for_sites_s: float
    round_timeout_s: float


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    *,
    arrays: ArrayRecord,
    plan: RoundPlan,
    on_round: Callable[[int, ArrayRecord], None],
) -> ArrayRecord:
    """Train-then-validate rounds ``first_round..last_round``; ``on_round`` after each (the
    checkpoint). A round whose aggregation yields nothing keeps the previous model."""
    for server_round in range(plan.first_round, plan.last_round + 1):
        log(INFO, "[ROUND %d/%d]", server_round, plan.last_round)
        wait_for_sites(grid, minimum=plan.min_sites, timeout_s=plan.wait_for_sites_s)
        train = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = exchange(grid, train, timeout_s=plan.round_timeout_s)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        evaluate = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        strategy.aggregate_evaluate(
            server_round, exchange(grid, evaluate, timeout_s=plan.round_timeout_s)
        )
        on_round(server_round, arrays)
    return arrays
