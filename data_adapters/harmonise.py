"""Harmonisation steps: small pure functions on SimpleITK images.

Each step returns its result and a :class:`Step` recording its name and
parameters, so the manifest can say exactly what was done to every case.
:func:`harmonise_case` composes them:

1. read every modality (and the segmentation) with its world geometry;
2. remap labels onto the canonical scheme (values only, before any resampling);
3. reorient to RAS (a permutation / flip of voxels: no voxel moves in the world);
4. co-register: every other modality rigidly onto t1n when asked, or on its own
   when its world box barely overlaps t1n's (see :mod:`data_adapters.register`);
   otherwise modalities are taken as aligned in world space (as BraTS data are);
5. foreground mask: Otsu on the mean of the modalities, largest component, holes filled;
6. crop: RAS axes at the target spacing over the world bounding box of the mask
   and any labelled voxel, plus a margin;
7. pad the grid (whole voxels, so no voxel centre moves) up to a minimum size;
8. resample onto it, each registration transform composed into the one
   interpolation (linear images, nearest labels);
9. z-score each modality inside the mask, 0 outside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import Geometry, axcodes, same_grid
from data_adapters.grid import (
    DEFAULT_MARGIN_MM,
    Grid,
    Step,
    pad_grid,
    resample_to_grid,
    target_grid,
    triple,
)
from data_adapters.labels import remap_labels, remap_record
from data_adapters.layouts import MODALITIES, RawCase
from data_adapters.readers import read_source, read_sources
from data_adapters.register import align_to_reference

#: Bump when a step changes what it writes: it is part of every fingerprint.
HARMONISE_VERSION = 2
#: Below this world-box overlap with t1n a modality is registered even when not asked.
DEFAULT_MIN_OVERLAP = 0.5
#: Each modality is divided by this percentile before averaging for the mask,
#: so one scanner's intensity units do not drown the others.
MASK_SCALE_PERCENTILE = 99.0

T = TypeVar("T")


@dataclass(frozen=True)
class CaseOptions:
    """Options of :func:`harmonise_case` beyond the target spacing (see there)."""

    margin_mm: float = DEFAULT_MARGIN_MM
    register: bool = False
    min_overlap: float = DEFAULT_MIN_OVERLAP
    min_size: int | Sequence[int] = 0
    min_shape_mm: float | Sequence[float] = 0.0
    registration_seed: int = 0

    def check(self) -> None:
        """Raise ValueError for options that cannot work."""
        sizes, lengths = triple(self.min_size), triple(self.min_shape_mm)
        if any(v < 0 or not math.isfinite(v) for v in (*sizes, *lengths, self.margin_mm)):
            raise ValueError("margin, min_size and min_shape_mm must be finite and >= 0")
        if not 0.0 <= self.min_overlap <= 1.0 or self.registration_seed < 0:
            raise ValueError("min_overlap must be in [0, 1] and registration_seed >= 0")


def harmonisation_parameters(
    *,
    target_spacing: Sequence[float],
    margin_mm: float = DEFAULT_MARGIN_MM,
    options: CaseOptions | None = None,
) -> dict[str, Any]:
    """Everything that decides what :func:`harmonise_case` writes, for the manifest."""
    options = options or CaseOptions(margin_mm=margin_mm)
    return {
        "harmonise_version": HARMONISE_VERSION,
        "target_spacing_mm": [float(s) for s in target_spacing],
        "margin_mm": float(options.margin_mm),
        "register": options.register,
        "min_overlap": float(options.min_overlap),
        "registration_seed": options.registration_seed,
        "min_size": [int(v) for v in triple(options.min_size)],
        "min_shape_mm": [float(v) for v in triple(options.min_shape_mm)],
        "orientation": "RAS",
        "mask": f"otsu(mean of modalities / p{MASK_SCALE_PERCENTILE:g}) + largest cc + fill holes",
        "image_interpolator": "linear",
        "label_interpolator": "nearest",
        "normalisation": "zscore inside mask, 0 outside",
        "label_scheme": "brats2023",
    }


def remap_segmentation(
    seg: sitk.Image, scheme: str, *, path: str | Path = "<image>"
) -> tuple[sitk.Image, Step]:
    """Map a segmentation's values onto canonical labels (uint8), same grid."""
    source = sitk.GetArrayViewFromImage(seg)
    mapped = remap_labels(source, scheme, path=path)
    out = sitk.GetImageFromArray(mapped)
    out.CopyInformation(seg)
    # The record lists labels dropped on purpose (BraTS 2024's resection cavity) with counts.
    return out, Step("remap_labels", remap_record(source, scheme))


def reorient_to_ras(image: sitk.Image) -> tuple[sitk.Image, Step]:
    """Permute / flip voxel axes so i, j, k run closest to R, A, S.

    No interpolation: every voxel keeps its value and world position, only the
    index order and the direction matrix change.
    """
    before = axcodes(image)
    out = sitk.DICOMOrient(image, "RAS")
    return out, Step("reorient", {"from": before, "to": axcodes(out)})


def co_register(
    images: Mapping[str, sitk.Image], *, reference: str, sources: Mapping[str, str], **options: Any
) -> tuple[dict[str, sitk.Transform], Step]:
    """Rigid transforms (reference world -> modality world) of the registered modalities.

    Modalities left out of the result are aligned in world space already; ``options``
    (``register``, ``min_overlap``, ``seed``) and the record are those of
    :func:`data_adapters.register.align_to_reference`.
    """
    transforms, params = align_to_reference(images, reference=reference, sources=sources, **options)
    return transforms, Step("register", params)


def foreground_mask(
    images: Sequence[sitk.Image],
    *,
    path: str | Path = "<image>",
    transforms: Sequence[sitk.Transform | None] | None = None,
) -> tuple[sitk.Image, Step]:
    """Head (or, on skull-stripped data, brain) mask on the first image's grid.

    Otsu threshold of the mean of the modalities (each scaled by its
    :data:`MASK_SCALE_PERCENTILE`), largest connected component, holes filled.
    ``transforms[i]`` (first image's world -> image i's world) brings a registered
    image onto the first one; None means aligned in world space.
    """
    reference = images[0]
    mean = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.float32)
    for index, image in enumerate(images):
        transform = transforms[index] if transforms else None
        if transform is not None or not same_grid(image, reference):
            image = sitk.Resample(
                image, reference, transform or sitk.Transform(), sitk.sitkLinear, 0.0,
                sitk.sitkFloat32,
            )  # fmt: skip
        values = sitk.GetArrayViewFromImage(image)
        scale = float(np.percentile(values, MASK_SCALE_PERCENTILE))
        mean += values / np.float32(scale) if scale > 0 else values
    mean /= len(images)
    mean_image = sitk.GetImageFromArray(mean)
    mean_image.CopyInformation(reference)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    mask = otsu.Execute(mean_image)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.BinaryFillhole(sitk.Cast(components == 1, sitk.sitkUInt8), foregroundValue=1)
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    if voxels == 0:
        raise DataError(path, "foreground mask is empty (blank images?)")
    return mask, Step(
        "foreground_mask", {"otsu_threshold": float(otsu.GetThreshold()), "voxels": voxels}
    )


def zscore(
    image: sitk.Image, mask: sitk.Image, *, path: str | Path = "<image>"
) -> tuple[sitk.Image, Step]:
    """Z-score ``image`` inside ``mask`` (same grid), exactly 0 outside; float32."""
    values = sitk.GetArrayViewFromImage(image)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    # Only the masked voxels are copied and widened: statistics in float64.
    selected = values[inside].astype(np.float64)
    mean, std = (float(selected.mean()), float(selected.std())) if selected.size else (0.0, 0.0)
    if selected.size < 2 or not std > 1e-6 * max(1.0, abs(mean)):
        raise DataError(path, "intensity is constant inside the foreground mask; cannot z-score")
    out = np.zeros(values.shape, dtype=np.float32)
    out[inside] = (selected - mean) / std
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result, Step("zscore", {"mean": mean, "std": std, "voxels": int(selected.size)})


@dataclass(frozen=True)
class HarmonisedCase:
    """A case on its canonical grid, with what was done to it and where it came from.

    ``transforms`` holds the rigid registrations applied (t1n world -> modality
    world; absent means identity); ``raw_images`` the modalities as read, for QC.
    """

    raw: RawCase
    images: dict[str, sitk.Image]
    seg: sitk.Image | None
    mask: sitk.Image
    grid: Grid
    source_geometry: dict[str, Geometry]
    steps: list[Step]
    transforms: dict[str, sitk.Transform] = field(default_factory=dict, compare=False)
    raw_images: dict[str, sitk.Image] = field(default_factory=dict, compare=False, repr=False)

    @property
    def original_geometry(self) -> Geometry:
        """Grid of the reference modality (t1n) as read, before any step."""
        return self.source_geometry[MODALITIES[0]]

    @property
    def case_id(self) -> str:
        """The case identifier."""
        return self.raw.case_id


def harmonise_case(
    raw_case: RawCase,
    *,
    target_spacing: Sequence[float],
    margin_mm: float = DEFAULT_MARGIN_MM,
    register: bool = False,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    min_size: int | Sequence[int] = 0,
    min_shape_mm: float | Sequence[float] = 0.0,
    registration_seed: int = 0,
) -> HarmonisedCase:
    """Read one raw case and put it on its canonical RAS grid.

    Parameters
    ----------
    raw_case
        Files of the case (see :mod:`data_adapters.layouts`).
    target_spacing
        Output voxel size in mm along R, A, S.
    margin_mm
        World margin around the foreground's bounding box.
    register
        Rigidly register every other modality onto t1n.  Without it a modality
        is still registered when its world box overlaps t1n's by less than
        ``min_overlap`` (a fraction of the smaller box).
    min_size, min_shape_mm
        Pad the grid to at least this many voxels / this extent in mm per axis
        (one value for all axes or three); 0 means no minimum.
    registration_seed
        Seed of the registration metric's sampling.

    Raises
    ------
    DataError
        Naming the file at fault: unreadable image, unknown label value,
        segmentation off its images' grid, blank images, failed registration.
    """
    options = CaseOptions(
        margin_mm, register, min_overlap, min_size, min_shape_mm, registration_seed
    )
    _check_arguments(raw_case, target_spacing, options)
    reference = MODALITIES[0]
    raw = read_sources({name: raw_case.modalities[name] for name in MODALITIES})
    geometry = {name: Geometry.of(image) for name, image in raw.items()}
    steps: list[Step] = []
    seg = None
    if raw_case.seg is not None:
        seg = _read_segmentation(raw_case, raw[reference], steps)
        geometry["seg"] = Geometry.of(seg)
    oriented = {name: _record(reorient_to_ras(img), steps, name) for name, img in raw.items()}
    if seg is not None:
        seg = _record(reorient_to_ras(seg), steps, "seg")
    sources = {name: raw_case.modalities[name].describe() for name in MODALITIES}
    transforms = _record(
        co_register(
            oriented, reference=reference, sources=sources, register=register,
            min_overlap=min_overlap, seed=registration_seed,
        ),
        steps,
    )  # fmt: skip
    case_dir = raw_case.modalities[reference].path.parent
    modalities = [oriented[n] for n in MODALITIES]
    moves = [transforms.get(n) for n in MODALITIES]
    mask = _record(foreground_mask(modalities, path=case_dir, transforms=moves), steps)
    # The grid covers labelled voxels too, so no label is cropped away even where
    # the foreground mask misses it.
    extent = mask if seg is None else sitk.Or(mask, sitk.Cast(seg > 0, sitk.sitkUInt8))
    grid = _record(target_grid(extent, spacing=target_spacing, margin_mm=margin_mm), steps)
    grid = _record(pad_grid(grid, min_size=min_size, min_shape_mm=min_shape_mm), steps)
    mask_on_grid = _record(resample_to_grid(mask, grid, interpolator="nearest"), steps, "mask")
    resampled = {
        name: _record(
            resample_to_grid(img, grid, interpolator="linear", transform=transforms.get(name)),
            steps,
            name,
        )
        for name, img in oriented.items()
    }
    del oriented  # the reoriented copies are no longer needed; free them before z-scoring
    if seg is not None:
        seg = _record(resample_to_grid(seg, grid, interpolator="nearest"), steps, "seg")
    images = {
        name: _record(zscore(img, mask_on_grid, path=sources[name]), steps, name)
        for name, img in resampled.items()
    }
    return HarmonisedCase(
        raw_case, images, seg, mask_on_grid, grid, geometry, _merge(steps), transforms, raw
    )


def _check_arguments(raw_case: RawCase, spacing: Sequence[float], options: CaseOptions) -> None:
    """Refuse unusable options up front, naming the case."""
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise DataError(raw_case.root, f"target spacing must be 3 positive numbers, got {spacing}")
    try:
        options.check()
    except ValueError as err:
        raise DataError(raw_case.root, str(err)) from err


def _read_segmentation(raw_case: RawCase, reference: sitk.Image, steps: list[Step]) -> sitk.Image:
    assert raw_case.seg is not None
    seg = read_source(raw_case.seg)
    where = raw_case.seg.describe()
    if not same_grid(seg, reference):
        raise DataError(
            where,
            f"segmentation grid {Geometry.of(seg).shape} differs from the {MODALITIES[0]} grid "
            f"{Geometry.of(reference).shape} (size, spacing, origin or direction)",
        )
    return _record(remap_segmentation(seg, raw_case.label_scheme, path=where), steps, "seg")


def _record(result: tuple[T, Step], steps: list[Step], image: str | None = None) -> T:
    """Append a step (tagged with the image it applied to) and return its result."""
    value, step = result
    steps.append(Step(step.name, {"image": image, **step.params}) if image else step)
    return value


def _merge(steps: list[Step]) -> list[Step]:
    """Fold consecutive per-image runs of one step into a single record."""
    merged: list[Step] = []
    for step in steps:
        image = step.params.get("image")
        if image is None:
            merged.append(step)
            continue
        params = {k: v for k, v in step.params.items() if k != "image"}
        if merged and merged[-1].name == step.name and "images" in merged[-1].params:
            merged[-1].params["images"][image] = params
        else:
            merged.append(Step(step.name, {"images": {image: params}}))
    return merged
