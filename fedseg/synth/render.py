# nibabel ships py.typed but leaves most methods unannotated.
# mypy: disable-error-code="no-untyped-call"
"""Render a phantom head on a site's grid with the site's scanner.

The stored field of view is laid out on the site's voxel spacing and array orientation;
thick slices are sampled at several points per voxel (partial volume); the tissue signal
gets texture, a smooth multiplicative bias field per modality and Rician noise, then the
site's gain and offset.  Everything draws from an explicit ``numpy.random.Generator``:
the same state gives byte-identical arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from fedseg.synth.phantom import (
    CONTRAST,
    ET,
    NETC,
    SNFH,
    TEXTURE,
    WM_LEVEL,
    Anatomy,
    classify,
    sample_anatomy,
)
from fedseg.synth.profiles import AXIS_OF_CODE, MODALITIES, SiteProfile

F32 = NDArray[np.float32]


# Stored field of view (world mm, RAS) and its centre: z is shifted up because a
# head scan stops at the neck, not symmetrically around the brain centre.
_FOV_MM = np.array([200.0, 232.0, 180.0])
_FOV_CENTRE = np.array([0.0, 0.0, 6.0])


def site_grid(profile: SiteProfile) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """Array shape and voxel-to-world affine of the site's stored field of view.

    Voxel centres are laid out symmetrically about the field-of-view centre, so
    profiles that differ only in orientation sample exactly the same world points.
    """
    linear = np.zeros((3, 3))
    shape = []
    for i, code in enumerate(profile.orientation.upper()):
        axis = AXIS_OF_CODE[code]
        linear[axis, i] = (1.0 if code in "RAS" else -1.0) * profile.spacing[i]
        shape.append(max(1, round(float(_FOV_MM[axis]) / profile.spacing[i])))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = _FOV_CENTRE - linear @ ((np.array(shape) - 1) / 2.0)
    return (shape[0], shape[1], shape[2]), affine


def _subsample_offsets(spacing: tuple[float, float, float]) -> list[NDArray[np.float64]]:
    """Sub-voxel sample offsets (voxel units) per axis that simulate partial volume.

    Thick axes (> 2.5 mm) are sampled at an odd number of points ~2 mm apart whose
    middle one is the voxel centre (where the label is taken); others once.
    """
    offsets = []
    for s in spacing:
        n = 1 if s <= 2.5 else 2 * math.ceil((s / 2.0 - 1.0) / 2.0) + 1
        offsets.append((np.arange(n) - (n - 1) / 2.0) / n)
    return offsets


def _mapped_coords(
    matrix: NDArray[np.float64], shape: tuple[int, int, int], shift: tuple[float, float, float]
) -> tuple[F32, F32, F32]:
    """Apply a 4x4 (voxel -> mm) matrix to the grid, with voxel indices shifted by ``shift``.

    Zero coefficients are skipped, so an axis-aligned mapping returns cheap
    broadcastable arrays rather than full volumes.
    """
    idx = [
        (np.arange(n, dtype=np.float32) + np.float32(s)).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, (n, s) in enumerate(zip(shape, shift, strict=True))
    ]
    out = []
    for row in matrix[:3]:
        acc: F32 = np.full((1, 1, 1), row[3], dtype=np.float32)
        for i in range(3):
            if row[i] != 0.0:
                acc = acc + np.float32(row[i]) * idx[i]
        out.append(acc)
    return out[0], out[1], out[2]


def _texture(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: Sequence[float]
) -> F32:
    """Smooth unit-variance noise with a ~2 mm correlation length (tissue texture)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth: F32 = ndimage.gaussian_filter(white, sigma=[2.0 / s for s in spacing], mode="wrap")
    return smooth / np.float32(max(float(smooth.std()), 1e-6))


def _bias_fields(
    rng: np.random.Generator,
    affine: NDArray[np.float64],
    shape: tuple[int, int, int],
    strength: float,
) -> list[F32]:
    """One smooth multiplicative bias field per modality (quadratic in world mm)."""
    x, y, z = (c / np.float32(100.0) for c in _mapped_coords(affine, shape, (0.0, 0.0, 0.0)))
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    shared = rng.standard_normal(len(terms))
    fields = []
    for _ in MODALITIES:
        # Sequences share the coil's profile but differ in detail.
        coef = (shared + 0.4 * rng.standard_normal(len(terms))) * strength / 2.0
        log_bias = sum(
            (np.float32(c) * t for c, t in zip(coef, terms, strict=True)), np.float32(0.0)
        )
        fields.append(np.broadcast_to(np.exp(log_bias, dtype=np.float32), shape))
    return fields


def _rician(rng: np.random.Generator, signal: F32, sigma: float) -> F32:
    """Magnitude of the signal plus complex Gaussian noise (Rician; Rayleigh in air)."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude: F32 = np.sqrt(real * real + imag * imag)
    return magnitude


@dataclass(frozen=True)
class RenderedCase:
    """A rendered case before it is written: arrays, affine and ground truth."""

    images: dict[str, NDArray[np.int16]]
    seg: NDArray[np.uint8]
    tissue: NDArray[np.uint8]  # phantom class per voxel (BG .. SNFH)
    brain: NDArray[np.bool_]  # inside the pial surface
    affine: NDArray[np.float64]
    info: dict[str, Any]


def render_case(profile: SiteProfile, rng: np.random.Generator) -> RenderedCase:
    """Draw a head and render it on the site's grid with the site's scanner."""
    anatomy = sample_anatomy(rng, profile.size_mix)
    shape, affine = site_grid(profile)
    signal, tissue, brain = tissue_signal(anatomy, profile, shape, affine)
    signal *= 1 + TEXTURE[tissue] * _texture(rng, shape, profile.spacing)
    biases = _bias_fields(rng, affine, shape, profile.bias_strength)
    images = {}
    for m, name in enumerate(MODALITIES):
        noisy = _rician(rng, signal[m] * biases[m], profile.noise * WM_LEVEL)
        scaled = noisy * np.float32(profile.gain[m]) + np.float32(profile.offset[m])
        images[name] = np.clip(np.rint(scaled), 0, np.iinfo(np.int16).max).astype(np.int16)
    labels = np.zeros(len(CONTRAST), dtype=np.uint8)
    labels[[NETC, SNFH, ET]] = profile.label_values
    return RenderedCase(images, labels[tissue], tissue, brain, affine, _tumour_info(anatomy))


def tissue_signal(
    anatomy: Anatomy,
    profile: SiteProfile,
    shape: tuple[int, int, int],
    affine: NDArray[np.float64],
) -> tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.bool_]]:
    """Noise-free signal (modality, *shape) with partial volume, tissue and brain at centres."""
    to_template = anatomy.world_to_template @ affine
    offsets = _subsample_offsets(profile.spacing)
    shifts = np.stack(np.meshgrid(*offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    signal = np.zeros((len(MODALITIES), *shape), dtype=np.float32)
    tissue, brain = np.zeros(shape, dtype=np.uint8), np.zeros(shape, dtype=bool)
    for shift in shifts:
        coords = _mapped_coords(to_template, shape, (shift[0], shift[1], shift[2]))
        cls, inside = classify(anatomy, *(np.broadcast_to(c, shape) for c in coords))
        if not shift.any():  # labels come from the voxel centre, as a rater would draw them
            tissue, brain = cls, inside
        for m in range(len(MODALITIES)):
            signal[m] += CONTRAST[cls, m]
    signal /= np.float32(len(shifts))
    return signal, tissue, brain


def _tumour_info(anatomy: Anatomy) -> dict[str, Any]:
    """Ground-truth description of a case's tumour for ``federation.json``."""
    t = anatomy.tumour
    world_centre = np.linalg.inv(anatomy.world_to_template) @ np.append(t.centre, 1.0)
    return {
        "size": t.size,
        "hemisphere": "right" if t.side > 0 else "left",
        "necrosis": t.necrosis,
        "core_radius_mm": round(t.core_radius, 2),
        "min_rim_mm": round(t.rim, 2),
        "oedema_margin_mm": round(t.oedema, 2),
        "centre_world_mm": [round(float(v), 2) for v in world_centre[:3]],
    }


def nifti_image(data: NDArray[Any], affine: NDArray[np.float64]) -> nib.Nifti1Image:
    """NIfTI image with sform and qform both set to ``affine`` (code 1, scanner)."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(data.dtype)
    return img


def make_case(
    profile: SiteProfile, *, rng: np.random.Generator
) -> tuple[dict[str, nib.Nifti1Image], nib.Nifti1Image]:
    """Generate one case as the site's scanner would store it.

    Parameters
    ----------
    profile
        The site's scanner profile (grid, orientation, intensities, label convention).
    rng
        Source of randomness; the head and tumour are drawn first, so two profiles
        that share a grid up to orientation give the same anatomy for the same state.

    Returns
    -------
    images, seg
        int16 images keyed by canonical modality (t1n, t1c, t2w, t2f) and the uint8
        label map in the site's convention (ET = ``profile.et_label``).
    """
    case = render_case(profile, rng)
    images = {name: nifti_image(arr, case.affine) for name, arr in case.images.items()}
    return images, nifti_image(case.seg, case.affine)
