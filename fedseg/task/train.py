"""Local training for a fixed number of steps, with the FedProx proximal term."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What one site does with the global model in one round."""

    steps: int
    learning_rate: float
    proximal_mu: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a site reports about its local work (aggregate numbers only)."""

    steps: int
    mean_loss: float
    final_loss: float
    seconds: float


def proximal_term(
    model: torch.nn.Module, global_params: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``||w - w_global||^2`` over the trainable parameters (squared, as in Li et al. 2020).

    ``global_params`` must be detached copies: the global model is a constant here.
    """
    total = torch.zeros((), dtype=torch.float32)
    for name, param in model.named_parameters():
        if param.requires_grad:
            total = total + torch.sum((param - global_params[name]) ** 2)
    return total


def make_loss() -> torch.nn.Module:
    """Dice + cross-entropy on the three overlapping regions, each a sigmoid channel."""
    return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)


def train_local(
    model: torch.nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    *,
    settings: TrainSettings,
) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` optimiser steps.

    A fresh Adam per round: optimiser moments are site-local state that FedAvg does not
    average, and carrying them across rounds would pull towards the site's old model.
    """
    start = time.perf_counter()
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = make_loss()
    model.train()
    losses: list[float] = []
    device = next(model.parameters()).device
    for _ in range(settings.steps):
        batch = next(batches)
        optimiser.zero_grad(set_to_none=True)
        image, label = batch["image"].to(device), batch["label"].to(device)
        loss = loss_fn(model(image), label)
        if settings.proximal_mu > 0:
            loss = loss + settings.proximal_mu / 2 * proximal_term(model, global_params)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        losses.append(float(loss.detach()))
    return TrainResult(
        steps=settings.steps,
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=time.perf_counter() - start,
    )
