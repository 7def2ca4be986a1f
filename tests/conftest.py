"""Test-wide settings: one torch thread (no oversubscription on 2 cores), Flower kept offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)
