# nibabel ships py.typed but leaves most methods unannotated.
# mypy: disable-error-code="no-untyped-call"
"""Deterministic generator of a heterogeneous multi-site raw BraTS-like federation.

Each case is a brain phantom defined in world coordinates (RAS+, millimetres, head
near the origin): scalp, skull, CSF (subarachnoid space, sulci, fissure,
ventricles), cortical and deep grey matter, white matter, and a glioma made of a
necrotic core (NETC), an enhancing rim (ET) and surrounding oedema (SNFH).  The
phantom is rendered into the four BraTS modalities (t1n, t1c, t2w, t2f) with
tissue contrasts as on real MRI, smooth texture, a multiplicative bias field and
Rician noise.

Each site is a :class:`SiteProfile`: a scanner and a curation habit.  Sites
differ in voxel spacing (one writes thick slices, with partial volume), in the
orientation of the stored array (one is not RAS; its affine is still right), in
intensity scale, bias and noise, in the number of cases and tumour sizes, and in
folder layout and label convention (one writes BraTS 2021 names with ET = 4).

Everything is driven by explicit ``numpy.random.Generator`` objects: the same seed
gives byte-identical arrays.  Only numpy, scipy and nibabel are used.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "SiteProfile",
    "case_files",
    "case_name",
    "default_profiles",
    "generate_federation",
    "make_case",
]

F32 = NDArray[np.float32]

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

# File suffix per canonical modality name, and how a case folder is named, per layout.
LAYOUTS: dict[str, dict[str, str]] = {
    "brats2023": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "seg"},
    "brats2021": {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"},
}

# Stored field of view (world mm, RAS) and its centre: z is shifted up because a
# head scan stops at the neck, not symmetrically around the brain centre.
_FOV_MM = np.array([200.0, 232.0, 180.0])
_FOV_CENTRE = np.array([0.0, 0.0, 6.0])

# Tissue classes of the phantom (internal; the label map is derived from them).
BG, SCALP, SKULL, CSF, GM, WM, NETC, ET, SNFH = range(9)

# Relative signal per class and modality (t1n, t1c, t2w, t2f), on a 0..1 scale.
# WM > GM on T1 and < GM on T2; CSF bright on T2 only (FLAIR nulls it); oedema
# bright on T2 and FLAIR; the rim enhances on T1c; necrosis is dark on T1c and
# bright on T2; scalp fat is bright on T1; cortical bone is dark everywhere.
_CONTRAST = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.85, 0.86, 0.55, 0.60],  # scalp
        [0.08, 0.09, 0.06, 0.06],  # skull
        [0.18, 0.20, 1.00, 0.08],  # CSF
        [0.45, 0.47, 0.62, 0.55],  # grey matter
        [0.66, 0.67, 0.42, 0.42],  # white matter
        [0.25, 0.22, 0.92, 0.52],  # necrosis (NETC)
        [0.42, 1.00, 0.62, 0.70],  # enhancing rim (ET)
        [0.40, 0.41, 0.82, 0.88],  # oedema (SNFH)
    ],
    dtype=np.float32,
)
# Relative texture amplitude per class: tumour tissue is more heterogeneous.
_TEXTURE = np.array([0.0, 0.06, 0.15, 0.02, 0.05, 0.04, 0.12, 0.12, 0.08], dtype=np.float32)
_WM_LEVEL = 0.66  # noise is specified relative to the white-matter signal

# Tumour geometry (mm).  The core surface wobbles by +-_CORE_WOBBLE (relative),
# the rim is >= _RIM_MIN (+ up to _RIM_EXTRA) thick, the necrotic radius >= _NECROSIS_MIN.
_CORE_RADIUS = {"small": (10.0, 16.0), "large": (16.0, 24.0)}
_OEDEMA_MARGIN = {"small": (5.0, 12.0), "large": (8.0, 20.0)}
_CORE_WOBBLE = 0.12
_RIM_MIN, _RIM_EXTRA = 5.0, 2.0
_NECROSIS_MIN = 5.0
_NO_NECROSIS_RATE = 0.15

_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and curation habits of one simulated site.

    Attributes
    ----------
    name
        Folder name of the site, e.g. ``"hospital-a"``.
    layout
        File naming: ``"brats2023"`` (``-t1n``, ``-t1c``, ...) or ``"brats2021"``
        (``_t1``, ``_t1ce``, ``_t2``, ``_flair``).
    spacing
        Voxel size in mm along the three stored array axes.
    orientation
        Axis codes of the stored array as ``nibabel.aff2axcodes`` spells them,
        e.g. ``"RAS"`` or ``"LPS"``.
    gain, offset
        Per-modality scanner scale (t1n, t1c, t2w, t2f): stored = gain * signal + offset.
    bias_strength
        Amplitude of the smooth multiplicative bias field, on a log scale.
    noise
        Rician noise sigma relative to the white-matter signal.
    n_cases
        Number of cases at this site.
    size_mix
        Relative weights of (small, large) tumours.
    et_label
        Value written for enhancing tumour: 3 (BraTS 2023) or 4 (BraTS 2021).
    """

    name: str
    layout: str = "brats2023"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    orientation: str = "RAS"
    gain: tuple[float, float, float, float] = (1000.0, 1000.0, 1000.0, 1000.0)
    offset: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    bias_strength: float = 0.15
    noise: float = 0.03
    n_cases: int = 8
    size_mix: tuple[float, float] = (0.5, 0.5)
    et_label: int = 3

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            problems.append(f"name {self.name!r} is not a plain folder name")
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} is not one of {sorted(LAYOUTS)}")
        if len(self.spacing) != 3 or not all(0.5 <= s <= 10.0 for s in self.spacing):
            problems.append(f"spacing {self.spacing} must be three values in 0.5..10 mm")
        codes = self.orientation.upper()
        if len(codes) != 3 or sorted(_AXIS_OF_CODE.get(c, -1) for c in codes) != [0, 1, 2]:
            problems.append(f"orientation {self.orientation!r} is not axis codes like 'RAS'")
        if len(self.gain) != 4 or len(self.offset) != 4 or min(self.gain) <= 0:
            problems.append("gain and offset need four values (t1n, t1c, t2w, t2f), gain > 0")
        if not 0.0 <= self.bias_strength <= 1.0 or not 0.0 <= self.noise <= 0.5:
            problems.append("bias_strength must be in 0..1 and noise in 0..0.5")
        if self.n_cases < 2 or self.n_cases > 999:
            problems.append(f"n_cases {self.n_cases} must be in 2..999")
        if len(self.size_mix) != 2 or min(self.size_mix) < 0 or sum(self.size_mix) <= 0:
            problems.append(f"size_mix {self.size_mix} must be two non-negative weights")
        if self.et_label not in (3, 4):
            problems.append(f"et_label {self.et_label} must be 3 or 4")
        if problems:
            raise ValueError(f"SiteProfile {self.name!r}: " + "; ".join(problems))


# The three archetypes the default federation cycles through.
_ARCHETYPES = (
    # Modern 3D protocol: isotropic voxels, RAS storage, BraTS 2023 conventions.
    SiteProfile(
        name="hospital-a",
        layout="brats2023",
        spacing=(2.0, 2.0, 2.0),
        orientation="RAS",
        gain=(1100.0, 1250.0, 1500.0, 950.0),
        offset=(0.0, 0.0, 0.0, 0.0),
        bias_strength=0.12,
        noise=0.025,
        size_mix=(0.3, 0.7),
        et_label=3,
    ),
    # DICOM-converted data kept in LPS order, strong coil bias, noisier, small tumours.
    SiteProfile(
        name="hospital-b",
        layout="brats2023",
        spacing=(1.7, 1.7, 2.2),
        orientation="LPS",
        gain=(1800.0, 2000.0, 1900.0, 1600.0),
        offset=(40.0, 40.0, 25.0, 30.0),
        bias_strength=0.3,
        noise=0.04,
        size_mix=(0.7, 0.3),
        et_label=3,
    ),
    # Older 2D protocol: thick axial slices, BraTS 2021 names with ET written as 4.
    SiteProfile(
        name="hospital-c",
        layout="brats2021",
        spacing=(1.8, 1.8, 6.0),
        orientation="RAS",
        gain=(700.0, 820.0, 1000.0, 640.0),
        offset=(10.0, 10.0, 10.0, 10.0),
        bias_strength=0.2,
        noise=0.03,
        size_mix=(0.5, 0.5),
        et_label=4,
    ),
)


def _site_name(index: int) -> str:
    """Return ``hospital-a`` .. ``hospital-z``, then ``hospital-27`` onwards."""
    return f"hospital-{chr(ord('a') + index)}" if index < 26 else f"hospital-{index + 1}"


def default_profiles(n_sites: int, *, cases_per_site: int | Sequence[int]) -> list[SiteProfile]:
    """Return the default heterogeneous site profiles.

    Parameters
    ----------
    n_sites
        Number of sites (>= 1).  Sites beyond the three archetypes cycle through
        them under new names, with slightly shifted intensity scale and noise.
    cases_per_site
        One count per site, or one int ``n`` scaled per site to ``n``, ``~0.75 n``,
        ``~0.5 n`` (cycling, at least ``min(n, 4)``) so the sites stay unequal.

    Returns
    -------
    list of SiteProfile
    """
    counts = _case_counts(n_sites, cases_per_site)
    profiles = []
    for i, n in enumerate(counts):
        base = _ARCHETYPES[i % len(_ARCHETYPES)]
        cycle = i // len(_ARCHETYPES)
        # Later cycles get another scanner of the same kind: shifted scale and noise.
        factor = 1.0 + 0.08 * cycle
        profiles.append(
            replace(
                base,
                name=_site_name(i),
                n_cases=n,
                gain=tuple(g * factor for g in base.gain),  # type: ignore[arg-type]
                noise=min(0.5, base.noise * (1.0 + 0.15 * cycle)),
            )
        )
    return profiles


def _case_counts(n_sites: int, cases_per_site: int | Sequence[int]) -> list[int]:
    """Turn the ``cases_per_site`` argument into one validated count per site."""
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if isinstance(cases_per_site, bool):
        raise ValueError(f"cases_per_site must be a count, got {cases_per_site!r}")
    if isinstance(cases_per_site, int):
        if cases_per_site < 2:
            raise ValueError(f"cases_per_site must be >= 2, got {cases_per_site}")
        floor = min(cases_per_site, 4)
        scales = (1.0, 0.75, 0.5)
        counts = [max(floor, round(cases_per_site * scales[i % 3])) for i in range(n_sites)]
    else:
        counts = [int(c) for c in cases_per_site]
        if len(counts) != n_sites:
            raise ValueError(f"cases_per_site has {len(counts)} counts for {n_sites} sites")
    bad = [c for c in counts if c < 2 or c > 999]
    if bad:
        raise ValueError(f"every site needs 2..999 cases, got {counts}")
    return counts


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Tumour:
    """Glioma parameters in template space (mm)."""

    size: str  # "small" or "large"
    side: int  # +1: right hemisphere (x > 0), -1: left
    centre: NDArray[np.float64]
    core_radius: float
    rim: float  # minimum ET rim thickness
    oedema: float  # mean oedema margin beyond the core
    necrosis: bool
    waves: NDArray[np.float64]  # (3 surfaces, n waves, 6): direction, frequency, phase, weight


@dataclass(frozen=True)
class _Anatomy:
    """One head: template-space shape and its placement in the world."""

    world_to_template: NDArray[np.float64]  # 4x4
    radii_pos: NDArray[np.float64]  # brain half-axes toward +x, +y, +z
    radii_neg: NDArray[np.float64]  # brain half-axes toward -x, -y, -z
    csf: float
    skull: float
    scalp: float
    cortex: float
    sulci: NDArray[np.float64]  # (3 waves, 4): wave vector (rad/mm), phase
    tumour: _Tumour


def _unit_vectors(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    """Return ``n`` directions uniformly distributed on the sphere."""
    v = rng.standard_normal((n, 3))
    unit: NDArray[np.float64] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


def _rotation(angles: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation matrix for angles (rad) about x, y and z, applied in that order."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix: NDArray[np.float64] = rz @ ry @ rx
    return matrix


def _sample_anatomy(rng: np.random.Generator, size_mix: tuple[float, float]) -> _Anatomy:
    """Draw one head: size, shape, pose, layer thicknesses, folding and tumour.

    The number of draws does not depend on the site's grid, so the same generator
    state gives the same head (and tumour) whatever the spacing or orientation.
    """
    scale = rng.uniform(0.95, 1.05, 3)
    rot = _rotation(np.deg2rad(rng.uniform(-6.0, 6.0, 3)))
    shift = rng.uniform(-5.0, 5.0, 3)
    template_to_world = np.eye(4)
    template_to_world[:3, :3] = rot @ np.diag(scale)
    template_to_world[:3, 3] = shift
    # Egg-shaped brain: flatter base (-z) and a slightly shorter occiput (-y).
    radii_pos = np.array([68.0, 84.0, 64.0]) * rng.uniform(0.97, 1.03, 3)
    radii_neg = np.array([68.0, 80.0, 52.0]) * rng.uniform(0.97, 1.03, 3)
    csf, skull, scalp, cortex = (
        rng.uniform(2.0, 3.0),
        rng.uniform(5.0, 8.0),
        rng.uniform(4.0, 7.0),
        rng.uniform(2.5, 3.5),
    )
    wavelengths = rng.uniform(20.0, 28.0, 3)
    sulci = np.concatenate(
        [
            _unit_vectors(rng, 3) * (2 * np.pi / wavelengths)[:, None],
            rng.uniform(0, 2 * np.pi, (3, 1)),
        ],
        axis=1,
    )
    tumour = _sample_tumour(rng, size_mix, radii_pos, radii_neg)
    return _Anatomy(
        np.asarray(np.linalg.inv(template_to_world), dtype=np.float64),
        radii_pos,
        radii_neg,
        csf,
        skull,
        scalp,
        cortex,
        sulci,
        tumour,
    )


def _sample_tumour(
    rng: np.random.Generator,
    size_mix: tuple[float, float],
    radii_pos: NDArray[np.float64],
    radii_neg: NDArray[np.float64],
) -> _Tumour:
    """Draw tumour size, composition, irregularity and a position inside one hemisphere."""
    size = "large" if rng.random() * sum(size_mix) >= size_mix[0] else "small"
    necrosis = rng.random() >= _NO_NECROSIS_RATE
    rim = rng.uniform(_RIM_MIN, _RIM_MIN + 1.0)
    low, high = _CORE_RADIUS[size]
    if necrosis:
        # The necrotic radius must stay >= 5 mm where the core dips and the rim is thickest.
        low = max(low, (_NECROSIS_MIN + rim + _RIM_EXTRA) / (1 - _CORE_WOBBLE))
    core = rng.uniform(low, max(low, high))
    oedema = rng.uniform(*_OEDEMA_MARGIN[size])
    side = 1 if rng.random() < 0.5 else -1
    n_waves = 4
    waves = np.concatenate(
        [
            _unit_vectors(rng, 3 * n_waves).reshape(3, n_waves, 3),
            rng.uniform(1.5, 3.5, (3, n_waves, 1)),
            rng.uniform(0.0, 2 * np.pi, (3, n_waves, 1)),
            rng.uniform(0.5, 1.0, (3, n_waves, 1)),
        ],
        axis=2,
    )
    # The whole core (at its widest, plus a margin) must fit inside the brain
    # ellipsoid and stay off the midline; oedema is clipped to the hemisphere later.
    reach = core * (1 + _CORE_WOBBLE) + 2.0
    half_x = radii_pos[0] if side > 0 else radii_neg[0]
    inner = np.array([half_x, min(radii_pos[1], radii_neg[1]), min(radii_pos[2], radii_neg[2])])
    inner = inner - reach
    centre = np.array([(reach + inner[0]) / 2, 0.0, 0.0])  # fallback, always valid
    for _ in range(200):
        cand = np.array(
            [
                rng.uniform(reach, inner[0]),
                rng.uniform(-inner[1], inner[1]),
                rng.uniform(-0.5 * inner[2], inner[2]),  # gliomas sit above the skull base
            ]
        )
        if np.sum((cand / inner) ** 2) <= 1.0:
            centre = cand
            break
    centre[0] *= side
    return _Tumour(size, side, centre, core, rim, oedema, necrosis, waves)


def _angular(waves: NDArray[np.float64], u: F32) -> F32:
    """Smooth random function on the sphere, in [-1, 1], at unit vectors ``u`` (m, 3)."""
    total = np.zeros(u.shape[0], dtype=np.float32)
    for direction, freq, phase, weight in zip(
        waves[:, :3], waves[:, 3], waves[:, 4], waves[:, 5], strict=True
    ):
        total += np.float32(weight) * np.sin(
            np.float32(freq) * (u @ direction.astype(np.float32)) + np.float32(phase)
        )
    return total / np.float32(waves[:, 5].sum())


def _brain_depth(an: _Anatomy, x: F32, y: F32, z: F32) -> F32:
    """Depth (mm) below the brain surface along the ray from the centre; < 0 outside."""
    a = np.where(x >= 0, np.float32(an.radii_pos[0]), np.float32(an.radii_neg[0]))
    b = np.where(y >= 0, np.float32(an.radii_pos[1]), np.float32(an.radii_neg[1]))
    c = np.where(z >= 0, np.float32(an.radii_pos[2]), np.float32(an.radii_neg[2]))
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    dist = np.sqrt(x * x + y * y + z * z)
    # Distance to the surface along the ray: dist / rho is the surface radius there.
    depth: F32 = dist * (1 - rho) / np.maximum(rho, np.float32(1e-3))
    return depth


def _classify(an: _Anatomy, x: F32, y: F32, z: F32) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Tissue class of each template-space point, and the brain mask (inside the pia)."""
    depth = _brain_depth(an, x, y, z)
    cls = np.zeros(x.shape, dtype=np.uint8)
    cls[depth >= -(an.csf + an.skull + an.scalp)] = SCALP
    cls[depth >= -(an.csf + an.skull)] = SKULL
    cls[depth >= -an.csf] = CSF
    brain = depth >= 0
    cls[brain] = WM
    _fold_cortex(an, cls, depth, x, y, z)
    _deep_structures(cls, brain, x, y, z)
    _place_tumour(an.tumour, cls, x, y, z)
    return cls, brain


def _fold_cortex(an: _Anatomy, cls: NDArray[np.uint8], depth: F32, x: F32, y: F32, z: F32) -> None:
    """Cortical ribbon, gyri with CSF-filled sulci, and the interhemispheric fissure."""
    shell = np.nonzero((depth >= 0) & (depth < 20))
    d = depth[shell]
    xs, ys, zs = x[shell], y[shell], z[shell]
    # Zero sets of a sum of plane waves make folded sheets: grey matter around each
    # sheet, CSF in its middle, reaching ~15 mm deep (where sulci stop).
    waves: F32 = np.zeros(d.shape, dtype=np.float32)
    for kx, ky, kz, phase in an.sulci.astype(np.float32):
        waves += np.sin(kx * xs + ky * ys + kz * zs + phase)
    g = np.abs(waves) / np.float32(3.0)  # 0 on a sulcus' midline, up to 1
    sulcus_depth = np.float32(14.0)
    grey = (d < an.cortex) | ((g < 0.22) & (d < sulcus_depth + an.cortex))
    csf = (g < 0.06) & (d < sulcus_depth)
    ax = np.abs(xs)
    grey |= (ax < 1.2 + an.cortex) & (d < 35 + an.cortex)
    csf |= (ax < 1.2) & (d < 35)
    sub = cls[shell]
    sub[grey] = GM
    sub[csf] = CSF
    cls[shell] = sub


def _deep_structures(
    cls: NDArray[np.uint8], parenchyma: NDArray[np.bool_], x: F32, y: F32, z: F32
) -> None:
    """Basal ganglia / thalami (grey matter), lateral and third ventricles (CSF)."""
    core = np.nonzero(parenchyma & (np.abs(x) < 30) & (np.abs(y) < 32) & (np.abs(z - 4) < 20))
    ax, ys, zs = np.abs(x[core]), y[core], z[core]
    sub = cls[core]
    sub[((ax - 17) / 9) ** 2 + ((ys + 2) / 15) ** 2 + ((zs - 2) / 10) ** 2 < 1] = GM
    # Lateral ventricles bend down at both ends like a banana.
    zc = 14 - 0.012 * (ys - 2) ** 2
    sub[((ax - 8) / 5) ** 2 + ((ys - 2) / 26) ** 2 + ((zs - zc) / 6) ** 2 < 1] = CSF
    sub[(ax < 1.5) & (np.abs(ys + 5) < 12) & (np.abs(zs - 2) < 8)] = CSF
    cls[core] = sub


def _place_tumour(t: _Tumour, cls: NDArray[np.uint8], x: F32, y: F32, z: F32) -> None:
    """Overwrite classes with oedema, enhancing rim and necrotic core."""
    dx, dy, dz = (
        x - np.float32(t.centre[0]),
        y - np.float32(t.centre[1]),
        z - np.float32(t.centre[2]),
    )
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    near = np.nonzero(dist < t.core_radius * (1 + _CORE_WOBBLE) + 20.0)
    d = np.maximum(dist[near], np.float32(1e-3))
    u = np.stack([dx[near] / d, dy[near] / d, dz[near] / d], axis=1)
    r_core = t.core_radius * (1 + _CORE_WOBBLE * _angular(t.waves[0], u))
    r_necrosis = r_core - (t.rim + _RIM_EXTRA * (1 + _angular(t.waves[1], u)) / 2)
    margin = np.clip(t.oedema * (1 + 0.4 * _angular(t.waves[2], u)), 5.0, 20.0)
    sub = cls[near]
    # Oedema spreads through brain tissue of its own hemisphere, not into CSF.
    tissue = (sub == GM) | (sub == WM)
    sub[(d < r_core + margin) & tissue & (t.side * x[near] > 0)] = SNFH
    sub[d < r_core] = ET
    if t.necrosis:
        sub[d < r_necrosis] = NETC
    cls[near] = sub


# --------------------------------------------------------------------------- rendering


def _grid(profile: SiteProfile) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """Array shape and voxel-to-world affine of the site's stored field of view.

    Voxel centres are laid out symmetrically about the field-of-view centre, so
    profiles that differ only in orientation sample exactly the same world points.
    """
    linear = np.zeros((3, 3))
    shape = []
    for i, code in enumerate(profile.orientation.upper()):
        axis = _AXIS_OF_CODE[code]
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
class _Case:
    """A rendered case before it is written: arrays, affine and ground truth."""

    images: dict[str, NDArray[np.int16]]
    seg: NDArray[np.uint8]
    tissue: NDArray[np.uint8]  # phantom class per voxel (BG .. SNFH)
    brain: NDArray[np.bool_]  # inside the pial surface
    affine: NDArray[np.float64]
    info: dict[str, Any]


def _render_case(profile: SiteProfile, rng: np.random.Generator) -> _Case:
    """Draw a head and render it on the site's grid with the site's scanner."""
    anatomy = _sample_anatomy(rng, profile.size_mix)
    shape, affine = _grid(profile)
    signal, tissue, brain = _tissue_signal(anatomy, profile, shape, affine)
    signal *= 1 + _TEXTURE[tissue] * _texture(rng, shape, profile.spacing)
    biases = _bias_fields(rng, affine, shape, profile.bias_strength)
    images = {}
    for m, name in enumerate(MODALITIES):
        noisy = _rician(rng, signal[m] * biases[m], profile.noise * _WM_LEVEL)
        scaled = noisy * np.float32(profile.gain[m]) + np.float32(profile.offset[m])
        images[name] = np.clip(np.rint(scaled), 0, np.iinfo(np.int16).max).astype(np.int16)
    labels = np.zeros(len(_CONTRAST), dtype=np.uint8)
    labels[[NETC, SNFH, ET]] = (1, 2, profile.et_label)
    return _Case(images, labels[tissue], tissue, brain, affine, _tumour_info(anatomy))


def _tissue_signal(
    anatomy: _Anatomy,
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
        cls, inside = _classify(anatomy, *(np.broadcast_to(c, shape) for c in coords))
        if not shift.any():  # labels come from the voxel centre, as a rater would draw them
            tissue, brain = cls, inside
        for m in range(len(MODALITIES)):
            signal[m] += _CONTRAST[cls, m]
    signal /= np.float32(len(shifts))
    return signal, tissue, brain


def _tumour_info(anatomy: _Anatomy) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- writing


def _nifti(data: NDArray[Any], affine: NDArray[np.float64]) -> nib.Nifti1Image:
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
    case = _render_case(profile, rng)
    images = {name: _nifti(arr, case.affine) for name, arr in case.images.items()}
    return images, _nifti(case.seg, case.affine)


def case_name(layout: str, number: int) -> str:
    """Folder name of case ``number`` in a layout (``BraTS-GLI-00012-000``, ``BraTS2021_00012``)."""
    if layout == "brats2021":
        return f"BraTS2021_{number:05d}"
    if layout == "brats2023":
        return f"BraTS-GLI-{number:05d}-000"
    raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")


def case_files(site_dir: Path, layout: str, number: int) -> dict[str, Path]:
    """Paths of a case's files, keyed by canonical modality name and ``"seg"``."""
    name = case_name(layout, number)
    sep = "_" if layout == "brats2021" else "-"
    return {
        key: Path(site_dir) / name / f"{name}{sep}{suffix}.nii.gz"
        for key, suffix in LAYOUTS[layout].items()
    }


def generate_federation(
    out: Path,
    *,
    n_sites: int = 3,
    cases_per_site: int | Sequence[int] = (12, 8, 6),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a raw multi-site federation under ``out``.

    Parameters
    ----------
    out
        Output folder; gets one folder per site and ``federation.json`` (ground
        truth of the generation, for tests and reports; the pipeline ignores it).
    n_sites, cases_per_site
        See :func:`default_profiles`.  A sequence needs one count per site.
    seed
        Root seed: sites draw from independent children of ``SeedSequence(seed)``,
        and each case from a child of its site's, so a case does not depend on
        how many cases come before it.
    progress
        Called with a short message after each case is written.
    overwrite
        Replace site folders that already exist; otherwise they are refused.

    Returns
    -------
    list of Path
        The site folders ``out/<site-name>``, in site order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    profiles = default_profiles(n_sites, cases_per_site=cases_per_site)
    out = Path(out)
    site_dirs = [out / p.name for p in profiles]
    busy = [d for d in site_dirs if d.exists() and any(d.iterdir())]
    if busy and not overwrite:
        raise FileExistsError(
            f"{busy[0]}: already exists and is not empty (overwrite it or pick another folder)"
        )
    for d in busy:
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    site_seeds = np.random.SeedSequence(seed).spawn(len(profiles))
    sites = []
    for index, (profile, site_dir, site_seed) in enumerate(
        zip(profiles, site_dirs, site_seeds, strict=True)
    ):
        cases = []
        for k, case_seed in enumerate(site_seed.spawn(profile.n_cases)):
            number = index * 1000 + k + 1  # unique across the federation
            case = _render_case(profile, np.random.default_rng(case_seed))
            _write_case(case, case_files(site_dir, profile.layout, number))
            cases.append({"id": case_name(profile.layout, number), **case.info})
            if progress is not None:
                progress(f"{profile.name}: case {k + 1}/{profile.n_cases}")
        sites.append({"name": profile.name, "profile": asdict(profile), "cases": cases})
    manifest = {"generator": "fedseg.synth", "seed": seed, "n_sites": len(profiles), "sites": sites}
    (out / "federation.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return site_dirs


def _write_case(case: _Case, paths: dict[str, Path]) -> None:
    """Write the four images and the label map of a case to ``paths``."""
    paths["seg"].parent.mkdir(parents=True, exist_ok=True)
    for name, arr in case.images.items():
        nib.save(_nifti(arr, case.affine), paths[name])
    nib.save(_nifti(case.seg, case.affine), paths["seg"])
