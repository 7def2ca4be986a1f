"""Datasets and MONAI transforms over one canonical site folder.

The canonical folder is already RAS, on one grid, z-scored (see DESIGN), so the pipeline here
only loads, samples patches and augments; it never re-harmonises.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from data_adapters.manifest import SiteManifest
from evaluation.regions import region_masks

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")


def case_items(manifest: SiteManifest, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """MONAI data dicts (image = the four modality files in channel order, label = seg)."""
    items = []
    for case_id in case_ids:
        folder = manifest.case_dir(case_id)
        items.append(
            {
                "case_id": case_id,
                "image": [str(folder / f"{m}.nii.gz") for m in MODALITIES],
                "label": str(folder / "seg.nii.gz"),
            }
        )
    return items


class LabelToRegionsd(MapTransform):
    """Canonical label map (1 channel) -> WT/TC/ET masks (3 channels, float)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = np.asarray(d[key])[0].astype(np.int64)
            d[key] = torch.from_numpy(region_masks(labels).astype(np.float32))
        return d


def _nifti_loader(keys: Sequence[str] = ("image", "label")) -> LoadImaged:
    # MONAI builds its GPU DICOM reader even for a named NIfTI reader and warns, each time,
    # that the GPU codec is missing: noise in every site's log, irrelevant to NIfTI.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        level = plugin_log.level
        plugin_log.setLevel(logging.ERROR)
        try:
            # Canonical data is NIfTI only; naming the reader also skips probing the others.
            return LoadImaged(keys=list(keys), reader="NibabelReader", image_only=False)
        finally:
            plugin_log.setLevel(level)


def load_transforms(keys: Sequence[str] = ("image", "label")) -> Compose:
    """Deterministic loading shared by training, validation and prediction (``keys``
    ("image",): no label)."""
    return Compose(
        [
            _nifti_loader(keys),
            EnsureChannelFirstd(keys=list(keys)),
            EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False),
        ]
    )


def train_transforms(*, patch_size: int) -> Compose:
    """Random foreground-biased patches with mild intensity augmentation.

    Two of three patches are centred on tumour so small lesions are seen every step;
    the intensity jitter mimics the residual scanner differences z-scoring leaves.
    """
    patch = (patch_size,) * 3
    return Compose(
        [
            SpatialPadd(keys=["image", "label"], spatial_size=patch),
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=patch, pos=2, neg=1
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            LabelToRegionsd(keys="label"),
            EnsureTyped(keys=["image", "label"], track_meta=False),
        ]
    )


def training_items(manifests: SiteManifest | Sequence[SiteManifest]) -> list[dict[str, Any]]:
    """The training cases of one site, or of several pooled (the centralised baseline)."""
    sites = [manifests] if isinstance(manifests, SiteManifest) else list(manifests)
    cases = [item for m in sites for item in case_items(m, m.train_cases)]
    if not cases:
        folders = ", ".join(str(m.site_dir) for m in sites)
        raise ValueError(f"{folders}: no training cases in the manifest")
    return cases


def training_batches(
    manifest: SiteManifest | Sequence[SiteManifest], *, patch_size: int, batch_size: int,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """An endless, seeded stream of training batches from the site's training split (or
    from several sites' at once).

    Local work is counted in steps, not epochs (FLamby), so the stream simply cycles.
    """
    cases = training_items(manifest)
    # Flat, so CacheDataset caches everything before the first random transform.
    pipeline = Compose(
        [*load_transforms().transforms, *train_transforms(patch_size=patch_size).transforms]
    )
    pipeline.set_random_state(seed=seed)
    dataset = CacheDataset(cases, transform=pipeline, cache_rate=1.0, num_workers=0, progress=False)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(cases)),
        shuffle=True,
        drop_last=True,
        num_workers=0,
        generator=generator,
    )
    while True:
        yield from loader


def load_image(paths: Sequence[str]) -> torch.Tensor:
    """The network input (4, X, Y, Z) from canonical modality files, in MODALITIES order,
    loaded exactly as validation loads a case."""
    data = load_transforms(("image",))({"image": list(paths)})
    image: torch.Tensor = data["image"]
    return image


def load_case(item: Mapping[str, Any]) -> tuple[torch.Tensor, np.ndarray, tuple[float, ...]]:
    """One case for validation: image (4, X, Y, Z), canonical labels (X, Y, Z), spacing (mm)."""
    data = load_transforms()(dict(item))
    labels = np.asarray(data["label"])[0].astype(np.uint8)
    affine = np.asarray(data["label"].affine)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return data["image"], labels, spacing
