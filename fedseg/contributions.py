"""Leave-one-site-out: what each site's data did for the other sites.

On request (``leave-one-out = true``), after the study the server reruns it once per training
site with that site left out: same initialisation, rounds, strategy and budget. The other
sites validate the result on their own cases. A site's effect is the case-weighted mean Dice
(WT, TC, ET averaged) of the other sites with the full federation's model, minus the same
with the model trained without it. Positive: the site's data helped the others. It costs one
study per site and is meant for a pilot or a benchmark more than a long clinical study.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from evaluation.regions import REGION_NAMES
from fedseg.config import RunConfig
from fedseg.rounds import RoundPlan, run_rounds
from fedseg.strategies import MetricsBook, RoundRecord, build_strategy


class _Without:
    """The grid with one node left out of every round."""

    def __init__(self, grid: Grid, node: int) -> None:
        self._grid, self._node = grid, node

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n != self._node]

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


def _reporting(record: RoundRecord, *, without: str) -> set[str]:
    return {s for s, e in record.sites.items() if s != without and not e.get("withheld")}


def mean_dice(record: RoundRecord, sites: set[str]) -> float | None:
    """Case-weighted mean Dice (WT, TC, ET averaged) over ``sites`` of a round: the round's
    own pooling, restricted to those sites."""
    subset = RoundRecord(round=record.round, sites={s: record.sites[s] for s in sites})
    pooled = subset.pooled()
    return statistics.fmean(pooled["dice"][r] for r in REGION_NAMES) if pooled else None


def leave_one_out(
    grid: Grid, *, run: RunConfig, start: ArrayRecord, book: MetricsBook
) -> dict[str, Any]:
    """``metrics.json``'s ``contributions``: per training site, the other sites' Dice with
    and without it, and the difference."""
    last = book.rounds[max(book.rounds)]
    trained = {n: s for n, s in book.node_sites.items() if s in last.train}
    if len(trained) < 2:
        return {"skipped": "fewer than two sites trained in the last round"}
    rerun = replace(
        run,
        min_train_sites=min(run.min_train_sites, len(trained) - 1),
        min_available_sites=0,
        personalise_steps=0,
        resume=False,
    )
    plan = RoundPlan(
        first_round=1,
        last_round=run.num_server_rounds,
        min_sites=rerun.available_sites,
        wait_for_sites_s=run.wait_for_sites,
        round_timeout_s=run.round_timeout,
    )
    out: dict[str, Any] = {}
    for node, site in sorted(trained.items(), key=lambda item: item[1]):
        log(INFO, "leave-one-out: the study again without %s", site)
        alone = MetricsBook(weights_size=book.weights_size, node_sites=dict(book.node_sites))
        strategy = build_strategy(rerun, book=alone)
        run_rounds(
            strategy,
            _Without(grid, node),  # type: ignore[arg-type]
            arrays=start,
            plan=plan,
            on_round=lambda *_: None,
        )
        final = alone.rounds[run.num_server_rounds]
        # Compared where both models were validated: a site failing in one run drops out.
        sites = _reporting(final, without=site) & _reporting(last, without=site)
        without, with_all = mean_dice(final, sites), mean_dice(last, sites)
        out[site] = {
            "other_sites": sorted(sites),
            "dice_with": with_all,
            "dice_without": without,
            "effect": None if with_all is None or without is None else with_all - without,
        }
    return {"sites": out}
