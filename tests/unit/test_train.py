"""Local training: the FedProx proximal term and its equivalence to FedAvg at mu = 0."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from fedseg.task.model import build_model
from fedseg.task.train import TrainSettings, make_loss, proximal_term, train_local


def _batches(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.randn(2, 4, 16, 16, 16, generator=g)
        label = (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).float()
        out.append({"image": image, "label": label})
    return out


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_proximal_term_is_squared_norm_and_nonzero_when_weights_differ() -> None:
    # Prepare
    model = build_model("tiny", seed=0)
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    # Execute
    term = proximal_term(model, global_params)
    # Assert: sum of 0.5^2, not the unsquared norm sqrt(n) * 0.5
    assert term.item() == pytest.approx(n_params * 0.25, rel=1e-5)
    assert proximal_term(build_model("tiny", seed=0), global_params).item() == 0.0


def test_proximal_gradient_pulls_towards_global_weights() -> None:
    model = build_model("tiny", seed=0)
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mu = 0.3
    (mu / 2 * proximal_term(model, global_params)).backward()  # type: ignore[no-untyped-call]
    for p in model.parameters():
        assert p.grad is not None
        assert torch.allclose(p.grad, torch.full_like(p, mu * 1.0))


def _reference_fedavg_training(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> None:
    """Plain local training as a FedAvg client does it: no proximal term at all."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = make_loss()
    model.train()
    for batch in batches:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(batch["image"]), batch["label"]).backward()
        optimiser.step()


def test_fedprox_with_mu_zero_equals_fedavg_exactly() -> None:
    # Prepare
    batches = _batches(seed=1, n=3)
    prox_model = build_model("tiny", seed=0)
    avg_model = copy.deepcopy(prox_model)
    # Execute
    torch.manual_seed(0)
    train_local(
        prox_model,
        iter(batches),
        settings=TrainSettings(steps=3, learning_rate=1e-3, proximal_mu=0.0),
    )
    torch.manual_seed(0)
    _reference_fedavg_training(avg_model, batches)
    # Assert: bit-identical weights
    assert torch.equal(_flat(prox_model), _flat(avg_model))


def test_positive_mu_keeps_local_model_closer_to_global() -> None:
    batches = _batches(seed=2, n=6)
    start = build_model("tiny", seed=0)
    w0 = _flat(start)
    distances = {}
    for mu in (0.0, 50.0):
        model = copy.deepcopy(start)
        it: Iterator[dict[str, torch.Tensor]] = iter(batches)
        train_local(model, it, settings=TrainSettings(steps=6, learning_rate=1e-2, proximal_mu=mu))
        distances[mu] = float(torch.linalg.norm(_flat(model) - w0))
    assert distances[50.0] < 0.9 * distances[0.0]


def test_training_reports_steps_and_finite_loss() -> None:
    model = build_model("tiny", seed=0)
    result = train_local(
        model, iter(_batches(seed=3, n=2)), settings=TrainSettings(steps=2, learning_rate=1e-3)
    )
    assert result.steps == 2
    assert torch.isfinite(torch.tensor(result.mean_loss))
    assert result.seconds > 0
