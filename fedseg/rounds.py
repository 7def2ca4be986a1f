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
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseg.exchange import POLL_SECONDS, exchange
from fedseg.secure import secure_round, training_replies
from fedseg.strategies import MetricsBook, RecordingCyclic, too_few_trained


class SitesMissingError(RuntimeError):
    """Too few sites connected within ``wait-for-sites`` seconds."""


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


class _Snapshot:
    """The grid as Flower's strategy sees it: the nodes of one bounded wait.

    Flower's ``sample_nodes`` waits without limit until ``min_available_nodes`` are online, and
    counts them twice; a site dropping out in between would hang the study. Against a
    snapshot it never waits, and a node that went offline meanwhile is answered for by the
    SuperLink (recorded as that site's failure).
    """

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


def _sites(grid: Grid, plan: RoundPlan) -> Grid:
    nodes = wait_for_sites(grid, minimum=plan.min_sites, timeout_s=plan.wait_for_sites_s)
    return _Snapshot(grid, nodes)  # type: ignore[return-value]


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
        if isinstance(strategy, RecordingCyclic):
            arrays = cyclic_round(strategy, grid, server_round=server_round, arrays=arrays,
                                  plan=plan)  # fmt: skip
        elif getattr(strategy, "secure", None) is not None:
            arrays = secure_train(strategy, grid, server_round=server_round, arrays=arrays,
                                  plan=plan)  # fmt: skip
        else:
            sites = _sites(grid, plan)
            train = strategy.configure_train(server_round, arrays, ConfigRecord(), sites)
            replies = exchange(grid, train, timeout_s=plan.round_timeout_s)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                arrays = aggregated
        evaluate = strategy.configure_evaluate(
            server_round, arrays, ConfigRecord(), _sites(grid, plan)
        )
        strategy.aggregate_evaluate(
            server_round, exchange(grid, evaluate, timeout_s=plan.round_timeout_s)
        )
        on_round(server_round, arrays)
    return arrays


def secure_train(
    strategy: Strategy, grid: Grid, *, server_round: int, arrays: ArrayRecord, plan: RoundPlan
) -> ArrayRecord:
    """A training phase through SecAgg+ (:mod:`fedseg.secure`): the same sites and train
    config as a plain round, the weighted mean unmasked at the server, each site's summary
    recorded. Fewer than ``min-train-sites`` trained sites, or a protocol that halted (too
    many dropouts for the threshold), keep the round's starting model."""
    book: MetricsBook = strategy.book  # type: ignore[attr-defined]
    train = list(strategy.configure_train(server_round, arrays, ConfigRecord(), _sites(grid, plan)))
    result = secure_round(train, grid, server_round=server_round, arrays=arrays,
                          settings=strategy.secure, timeout_s=plan.round_timeout_s)  # type: ignore[attr-defined]  # fmt: skip
    trained = book.record_train(server_round, training_replies(result.replies), masked=True)
    required = int(getattr(strategy, "min_train_nodes", 2))
    record = book.round_record(server_round)
    if len(trained) < required:
        record.not_aggregated = too_few_trained(len(trained), required)
    elif result.mean is None:
        record.not_aggregated = (
            "secure aggregation halted (too few sites answered for the reconstruction "
            "threshold); the global model is unchanged"
        )
    else:
        return result.mean
    return arrays


def roll_call(grid: Grid, book: MetricsBook, *, timeout_s: float) -> dict[str, int]:
    """Ask every connected node its site name (``query.identity``); ``{site: node id}``.

    Node ids are Flower's; a study names sites, so the cyclic order needs this mapping before
    the first model is sent. A node that does not answer is simply not found.
    """
    nodes = sorted(grid.get_node_ids())
    asks = [Message(RecordDict(), message_type=f"{MessageType.QUERY}.identity", dst_node_id=n)
            for n in nodes]  # fmt: skip
    for reply in exchange(grid, asks, timeout_s=timeout_s):
        if not reply.has_error() and "site" in reply.content:
            identity = reply.content["site"]
            assert isinstance(identity, ConfigRecord)
            book.node_sites[reply.metadata.src_node_id] = str(identity["site"])
    return {book.node_sites[n]: n for n in nodes if n in book.node_sites}


def cyclic_round(
    strategy: RecordingCyclic, grid: Grid, *, server_round: int, arrays: ArrayRecord,
    plan: RoundPlan,
) -> ArrayRecord:  # fmt: skip
    """One pass of the cyclic plan: the model goes to each site in ``strategy.order`` (all
    connected sites by name when empty) and each site's trained model is the next one's start.

    A site that is not connected, fails or declines is recorded and skipped; the model goes on
    from the last good site. Fewer than ``min-train-sites`` good visits keep the round's
    starting model, as an aggregating strategy would.
    """
    book = strategy.book
    wait_for_sites(grid, minimum=plan.min_sites, timeout_s=plan.wait_for_sites_s)
    by_site = roll_call(grid, book, timeout_s=min(60.0, plan.round_timeout_s))
    record = book.round_record(server_round)
    start, visited = arrays, 0
    for site in strategy.order or sorted(by_site):
        node = by_site.get(site)
        if node is None:
            reason = "not connected when its turn in site-order came"
            record.failures.append({"site": site, "phase": "train", "reason": reason})
            continue
        config = ConfigRecord({"server-round": server_round})
        msg = Message(RecordDict({"arrays": arrays, "config": config}),
                      message_type=MessageType.TRAIN, dst_node_id=node)  # fmt: skip
        trained = book.record_train(
            server_round, exchange(grid, [msg], timeout_s=plan.round_timeout_s)
        )
        if node in trained:
            arrays, visited = trained[node], visited + 1
    if visited < strategy.min_train_nodes:
        record.not_aggregated = too_few_trained(visited, strategy.min_train_nodes)
        return start
    return arrays
