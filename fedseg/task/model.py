"""MONAI 3D U-Net presets.

Instance normalisation by default: its statistics are computed per scan, so nothing about one
site's intensity distribution is baked into shared running averages (BatchNorm would be). The
``-bn`` presets use BatchNorm, whose scale, shift and running statistics are what FedBN keeps at
each site (Li et al. 2021): with instance normalisation there is nothing for it to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from monai.networks.nets import UNet

IN_CHANNELS = 4  # t1n, t1c, t2w, t2f
OUT_CHANNELS = 3  # WT, TC, ET (overlapping regions, sigmoid outputs)


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """A network size (the patch size is the study's choice, in the run config)."""

    name: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    # MONAI's norm name: "instance" (no learnt parameters) or "batch".
    norm: str = "instance"


PRESETS: dict[str, ModelPreset] = {
    # Fast enough to train on two CPU cores in minutes (see DESIGN: ~0.13 s/step at 48^3).
    "tiny": ModelPreset(name="tiny", channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1),
    # The usual BraTS-sized U-Net for 1 mm data on a GPU.
    "brats": ModelPreset(
        name="brats",
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    ),
}
# BatchNorm twins, for FedBN (strategy = "fedbn") and for comparing against it like for like.
PRESETS |= {f"{n}-bn": replace(p, name=f"{n}-bn", norm="batch") for n, p in list(PRESETS.items())}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name, with the valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model preset '{name}' unknown; choose from {sorted(PRESETS)}") from None


def build_model(preset: str, *, seed: int) -> torch.nn.Module:
    """A freshly initialised network; the same seed gives the same weights."""
    spec = get_preset(preset)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return UNet(
            spatial_dims=3,
            in_channels=IN_CHANNELS,
            out_channels=OUT_CHANNELS,
            channels=spec.channels,
            strides=spec.strides,
            num_res_units=spec.num_res_units,
            norm=spec.norm,
        )
    finally:
        torch.random.set_rng_state(generator_state)
