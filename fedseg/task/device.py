"""Which torch device a site computes on: its own choice, in its site settings."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA GPU when torch sees one, else the CPU; an explicit ``cuda``
    that torch cannot see is an error rather than a silent fall-back to a far slower CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device '{name}' unknown; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} GPU(s) visible")
    return device
