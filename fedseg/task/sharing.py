"""Which parts of a model travel between a site and the server.

Every strategy sends the model's float tensors; integer buffers (BatchNorm's
``num_batches_tracked``) never travel: they count the site's own batches, are not weights, and
are unused while BatchNorm's momentum is set. FedBN (Li et al. 2021) also keeps every
normalisation layer's parameters and running statistics at the site, so each hospital
normalises features with its own scanner's statistics and those never leave it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# _NormBase is the common base of torch's BatchNorm and InstanceNorm layers.
_NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def normalisation_keys(model: torch.nn.Module) -> frozenset[str]:
    """State-dict keys of the model's normalisation layers (weights, biases, statistics)."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            keys |= {f"{prefix}.{name}" for name in module.state_dict()}
    return frozenset(keys)


def travelling_state(model: torch.nn.Module, *, keep_norm_local: bool) -> dict[str, torch.Tensor]:
    """The state entries that leave a site (and that the server sends), in state-dict order."""
    local = normalisation_keys(model) if keep_norm_local else frozenset()
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and name not in local
    }


def local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The normalisation entries FedBN keeps at the site, detached copies on the CPU."""
    keys = normalisation_keys(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}


def load_partial(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the entries in ``state`` and keep the rest of ``model`` as it is."""
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"state entries {unknown[:3]} are not in the model")
    model.load_state_dict({**model.state_dict(), **state})
