"""Sliding-window inference on a harmonised case."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from numpy.typing import NDArray

from evaluation.regions import regions_to_labels

# Every combination of mirroring the three spatial axes (nnU-Net's test-time mirroring).
MIRRORS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3))


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    roi_size: int,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mirror: bool = False,
) -> torch.Tensor:
    """Region probabilities (3, X, Y, Z) for one image (4, X, Y, Z).

    ``mirror``: the mean over the eight mirrorings of the image, each prediction mirrored
    back (8x the time; written here because MONAI's TestTimeAugmentation draws random
    transforms, for uncertainty rather than a fixed ensemble). ``sw_batch_size`` >= 2 keeps
    CPU convolutions off PyTorch's slow batch-1 path.
    """
    if not mirror:
        return _window(model, image, roi_size=roi_size, sw_batch_size=sw_batch_size,
                       overlap=overlap)  # fmt: skip
    total = torch.zeros((3, *image.shape[1:]), dtype=torch.float32, device=image.device)
    for axes in MIRRORS:
        flipped = torch.flip(image, axes) if axes else image
        probabilities = _window(model, flipped, roi_size=roi_size, sw_batch_size=sw_batch_size,
                                overlap=overlap)  # fmt: skip
        total += torch.flip(probabilities, axes) if axes else probabilities
    return total / len(MIRRORS)


def _window(
    model: torch.nn.Module, image: torch.Tensor, *, roi_size: int, sw_batch_size: int,
    overlap: float,
) -> torch.Tensor:  # fmt: skip
    model.eval()
    # Windows run where the model is; the whole-volume output is stitched on the image's
    # device (the CPU), so a GPU never holds more than a batch of windows.
    logits = sliding_window_inference(
        image[None],
        roi_size=(roi_size,) * 3,
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode="gaussian",
        sw_device=next(model.parameters()).device,
        device=image.device,
    )
    assert isinstance(logits, torch.Tensor)
    return torch.sigmoid(logits[0])


def predict_labels(
    model: torch.nn.Module, image: torch.Tensor, *, roi_size: int, threshold: float = 0.5,
    overlap: float = 0.25, mirror: bool = False,
) -> NDArray[np.uint8]:  # fmt: skip
    """A canonical label map (0 background, 1 NETC, 2 SNFH, 3 ET) for one image."""
    probabilities = predict_probabilities(model, image, roi_size=roi_size, overlap=overlap,
                                          mirror=mirror)  # fmt: skip
    return regions_to_labels((probabilities > threshold).cpu().numpy())
