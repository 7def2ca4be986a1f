"""The comparators of a federated study, through the same training code as the sites.

- pooled: every site's training cases in one process, as if the data had been centralised;
- local-only: one site's cases alone.

Both start from the study's seeded initialisation and get the federation's budget: a round
is ``local_steps`` optimiser steps per site with a fresh Adam (what a site does), so pooled
training does ``local_steps x sites`` steps per round. They exist for benchmarks on generated
or public data; pooling patients' scans is what fedseg exists to avoid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_adapters.manifest import SiteManifest
from fedseg.task.data import training_batches
from fedseg.task.model import build_model
from fedseg.task.train import TrainSettings, train_local


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The federated study's training budget, which a baseline matches."""

    model_preset: str
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    patch_size: int
    seed: int


def train_centrally(manifests: Sequence[SiteManifest], budget: Budget) -> torch.nn.Module:
    """Pooled training over ``manifests`` (local-only when there is one)."""
    model = build_model(budget.model_preset, seed=budget.seed)
    batches = training_batches(list(manifests), patch_size=budget.patch_size,
                               batch_size=budget.batch_size, seed=budget.seed)  # fmt: skip
    settings = TrainSettings(
        steps=budget.local_steps * len(manifests), learning_rate=budget.learning_rate
    )
    for _ in range(budget.rounds):
        train_local(model, batches, settings=settings)
    return model
