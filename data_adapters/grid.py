"""The canonical grid: RAS-aligned at the target spacing, cropped to the head, padded.

Grid construction and resampling are kept apart from the harmonisation steps that use them,
so prediction (which maps back to a scan's own grid) can reuse them without the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from data_adapters.geometry import Vec3

DEFAULT_MARGIN_MM = 5.0
#: SimpleITK (LPS) direction of a RAS+ grid: i to the Right, j Anterior, k Superior.
RAS_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class Step:
    """One applied step: its name and the parameters it ran with."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class Grid:
    """A voxel grid in SimpleITK terms (LPS origin and row-major direction)."""

    size: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, ...] = RAS_DIRECTION

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def target_grid(
    mask: sitk.Image, *, spacing: Sequence[float], margin_mm: float = DEFAULT_MARGIN_MM
) -> tuple[Grid, Step]:
    """RAS-aligned grid at ``spacing`` covering the mask's world bounding box plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)  # (start i, j, k, size i, j, k) in voxels
    start, size = np.array(box[:3], float), np.array(box[3:], float)
    # Corners of the voxels' extent (half a voxel beyond the outer centres).
    corners = [
        mask.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in start - 0.5 + size * np.array(c)]
        )
        for c in np.ndindex(2, 2, 2)
    ]
    ras = np.array(corners) * np.array([-1.0, -1.0, 1.0])
    low, high = ras.min(axis=0) - margin_mm, ras.max(axis=0) + margin_mm
    step = np.array(spacing, dtype=float)
    n = np.ceil((high - low) / step - 1e-6).astype(int)
    # Centre the grid on the box; the first voxel centre is half a voxel in.
    first = (low + high) / 2 - (n - 1) / 2 * step
    origin = (float(-first[0]), float(-first[1]), float(first[2]))
    grid = Grid(
        size=(int(n[0]), int(n[1]), int(n[2])),
        spacing=(float(step[0]), float(step[1]), float(step[2])),
        origin=origin,
    )
    box = {"low": [float(v) for v in low + margin_mm], "high": [float(v) for v in high - margin_mm]}
    return grid, Step(
        "crop", {"margin_mm": float(margin_mm), "bounding_box_ras_mm": box, **grid.to_json()}
    )


def pad_grid(
    grid: Grid, *, min_size: int | Sequence[int] = 0, min_shape_mm: float | Sequence[float] = 0.0
) -> tuple[Grid, Step]:
    """Grow ``grid`` to at least ``min_size`` voxels and ``min_shape_mm`` per axis.

    Whole voxels are added, split evenly before and after (the odd one after), so
    every existing voxel centre keeps its world position; 0 means no minimum.
    """
    sizes, lengths = triple(min_size), triple(min_shape_mm)
    need = [
        max(int(n), math.ceil(mm / step - 1e-6))
        for n, mm, step in zip(sizes, lengths, grid.spacing, strict=True)
    ]
    extra = [max(0, n - have) for n, have in zip(need, grid.size, strict=True)]
    before = np.array([e // 2 for e in extra], dtype=float)
    direction = np.array(grid.direction).reshape(3, 3)
    origin = np.array(grid.origin) - direction @ (before * np.array(grid.spacing))
    padded = replace(
        grid,
        size=(grid.size[0] + extra[0], grid.size[1] + extra[1], grid.size[2] + extra[2]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
    )
    params = {
        "min_size": [int(v) for v in sizes],
        "min_shape_mm": [float(v) for v in lengths],
        "before": [int(v) for v in before],
        "after": [e - int(b) for e, b in zip(extra, before, strict=True)],
    }
    return padded, Step("pad", {**params, **padded.to_json()})


def resample_to_grid(
    image: sitk.Image,
    grid: Grid,
    *,
    interpolator: str,
    transform: sitk.Transform | None = None,
) -> tuple[sitk.Image, Step]:
    """Resample through world coordinates onto ``grid`` (0 outside the source).

    ``interpolator`` is ``"linear"`` (output float32) or ``"nearest"``
    (output keeps the input's pixel type, so labels stay whole numbers).
    ``transform`` maps grid-world points to ``image``-world points (a registration
    result), so registering costs no extra interpolation; None is the identity.
    """
    f = sitk.ResampleImageFilter()
    f.SetSize(list(grid.size))
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetTransform(transform or sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(_INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(sitk.sitkFloat32 if interpolator == "linear" else image.GetPixelID())
    out = f.Execute(image)
    source = {"from_size": list(image.GetSize()), "from_spacing": list(image.GetSpacing())}
    kind = "identity" if transform is None else "rigid"
    return out, Step("resample", {"interpolator": interpolator, "transform": kind, **source})


def triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    """One value for all three axes, or three values."""
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected one value or three, got {value!r}")
    return (values[0], values[1], values[2])
