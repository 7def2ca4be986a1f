"""A tiny analytic head phantom written as a raw BraTS 2023 case, for the harmonise tests.

The phantom is defined in world coordinates (RAS, mm), so any grid (LPS, oblique,
thick slices) samples the same anatomy, and a modality can be written with its
content moved by a known rigid transform or with a wrong header.  The one test
here checks the writer itself: what is read back sits where it was put.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from data_adapters.layouts import MODALITIES

FloatArray = npt.NDArray[np.float64]

# Head, white matter, ventricles and lesion intensity per modality: a different
# contrast in each, as MRI has, so registration must be multi-modal.
CONTRAST = {
    "t1n": (100.0, 160.0, 30.0, 120.0),
    "t1c": (110.0, 170.0, 35.0, 240.0),
    "t2w": (90.0, 60.0, 220.0, 160.0),
    "t2f": (80.0, 110.0, 40.0, 200.0),
}
HEAD_RADII = (45.0, 55.0, 42.0)
TUMOUR_CENTRE = (12.0, -8.0, 6.0)
#: Label spheres (radius mm, label), outermost first: oedema, enhancing, necrotic core.
TUMOUR = ((25.0, 2), (15.0, 3), (8.0, 1))


def load_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load`` typed as the NIfTI image it returns here."""
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def rotation(degrees: float, axis: tuple[float, float, float]) -> FloatArray:
    """Rotation matrix of ``degrees`` about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    matrix: FloatArray = np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross
    return matrix


def grid_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    codes: str = "RAS",
    rotate: FloatArray | None = None,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> FloatArray:
    """Voxel-to-RAS affine of a grid centred on ``centre``, axes RAS or LPS, optionally rotated."""
    signs = {"RAS": (1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}[codes]
    linear = (rotate if rotate is not None else np.eye(3)) @ np.diag(np.multiply(signs, spacing))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre) - linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def world_points(shape: tuple[int, int, int], affine: FloatArray) -> FloatArray:
    """RAS coordinates of every voxel centre, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.asarray(ijk @ affine[:3, :3].T + affine[:3, 3], dtype=np.float64)


def _inside(points: FloatArray, centre: tuple[float, ...], radii: tuple[float, ...]) -> FloatArray:
    """Soft (1 mm) indicator of an ellipsoid, so coarse grids see partial volume, not aliasing."""
    q = (points - np.asarray(centre)) / np.asarray(radii)
    distance = (np.sqrt((q**2).sum(axis=-1)) - 1.0) * min(radii)
    return np.asarray(1.0 / (1.0 + np.exp(np.clip(distance / 0.7, -50, 50))), dtype=np.float64)


def tissues(points: FloatArray) -> tuple[FloatArray, ...]:
    """Soft head, white matter, ventricles and lesion indicators at world points (RAS mm)."""
    h = _inside(points, (0, 0, 0), HEAD_RADII)
    w = _inside(points, (0, 4, 4), (34.0, 42.0, 30.0))
    left = _inside(points, (-8, 8, 8), (5.0, 14.0, 7.0))
    v = np.clip(left + _inside(points, (9, 8, 8), (5.0, 14.0, 7.0)), 0, 1)
    t = _inside(points, TUMOUR_CENTRE, (15.0, 15.0, 15.0))
    return h, w, v, t


def intensity(parts: tuple[FloatArray, ...], modality: str) -> FloatArray:
    """Phantom signal of ``modality`` from :func:`tissues`."""
    head, white, csf, lesion = CONTRAST[modality]
    h, w, v, t = parts
    return h * (head + (white - head) * w + (csf - white) * v * w + (lesion - head) * t)


def labels(points: FloatArray) -> npt.NDArray[np.uint8]:
    """Canonical tumour labels at world points (hard spheres)."""
    out = np.zeros(points.shape[:-1], np.uint8)
    distance = np.linalg.norm(points - np.asarray(TUMOUR_CENTRE), axis=-1)
    for radius, value in TUMOUR:
        out[distance < radius] = value
    return out


@dataclass(frozen=True)
class Scan:
    """How a modality (or the whole case) is stored: its grid and any misplacement.

    ``move`` = (R, t) moves the modality's *content* by x -> R x + t (RAS mm);
    ``header_shift`` moves the stored affine by t (mm) without moving the content.
    """

    shape: tuple[int, int, int] = (34, 40, 30)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    codes: str = "RAS"
    rotate: FloatArray | None = None
    move: tuple[FloatArray, FloatArray] | None = None
    header_shift: tuple[float, float, float] | None = None
    noise_only: bool = False
    noise: float = 2.0

    def affine(self) -> FloatArray:
        """The stored voxel-to-RAS affine."""
        affine = grid_affine(self.shape, self.spacing, codes=self.codes, rotate=self.rotate)
        if self.header_shift is not None:
            affine[:3, 3] += self.header_shift
        return affine


def write_raw_case(
    root: Path,
    case_id: str,
    scan: Scan,
    *,
    overrides: Mapping[str, Scan] | None = None,
    labelled: bool = True,
    empty_label: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``root/case_id/case_id-{t1n,t1c,t2w,t2f,seg}.nii.gz``; return the case folder."""
    folder = root / case_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cache: dict[int, tuple[FloatArray, ...]] = {}
    for name in MODALITIES:
        this = (overrides or {}).get(name, scan)
        if id(this) not in cache:
            affine = grid_affine(this.shape, this.spacing, codes=this.codes, rotate=this.rotate)
            points = world_points(this.shape, affine)
            if this.move is not None:  # sample the content at the pre-image: content moves by A
                r, t = this.move
                points = (points - t) @ r  # R^T (y - t) for row vectors
            cache[id(this)] = tissues(points)
        data = intensity(cache[id(this)], name)
        if this.noise > 0:
            data = data + rng.normal(0.0, this.noise, this.shape)
        if this.noise_only:
            data = rng.normal(100.0, 30.0, this.shape)
        image = nib.Nifti1Image(data.astype(np.float32), this.affine())
        nib.save(image, folder / f"{case_id}-{name}.nii.gz")
    if labelled:
        seg = labels(world_points(scan.shape, scan.affine()))
        if empty_label:
            seg[:] = 0
        nib.save(nib.Nifti1Image(seg, scan.affine()), folder / f"{case_id}-seg.nii.gz")
    return folder


def test_phantom_case_reads_back_where_it_was_put(tmp_path: Path) -> None:
    scan = Scan(codes="LPS", rotate=rotation(15, (1, 1, 0)))
    folder = write_raw_case(tmp_path, "p0", scan)
    seg = load_nifti(folder / "p0-seg.nii.gz")
    assert "".join(nib.aff2axcodes(seg.affine)) == "LPS"
    ijk = np.argwhere(np.asarray(seg.dataobj) > 0).mean(axis=0)
    centroid = seg.affine[:3, :3] @ ijk + seg.affine[:3, 3]
    np.testing.assert_allclose(centroid, TUMOUR_CENTRE, atol=1.0)
