"""The brain phantom in template space: anatomy, glioma and tissue contrasts.

A head is drawn once per case (:func:`sample_anatomy`) and classified at any set of
template-space points (:func:`classify`): scalp, skull, CSF (subarachnoid space, sulci,
fissure, ventricles), cortical and deep grey matter, white matter, and a glioma made of a
necrotic core (NETC), an enhancing rim (ET) and surrounding oedema (SNFH).
:data:`CONTRAST` gives each tissue's relative signal per modality, as on real MRI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]

# Tissue classes of the phantom (internal; the label map is derived from them).
BG, SCALP, SKULL, CSF, GM, WM, NETC, ET, SNFH = range(9)

# Relative signal per class and modality (t1n, t1c, t2w, t2f), on a 0..1 scale.
# WM > GM on T1 and < GM on T2; CSF bright on T2 only (FLAIR nulls it); oedema
# bright on T2 and FLAIR; the rim enhances on T1c; necrosis is dark on T1c and
# bright on T2; scalp fat is bright on T1; cortical bone is dark everywhere.
CONTRAST = np.array(
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
TEXTURE = np.array([0.0, 0.06, 0.15, 0.02, 0.05, 0.04, 0.12, 0.12, 0.08], dtype=np.float32)
WM_LEVEL = 0.66  # noise is specified relative to the white-matter signal

# Tumour geometry (mm).  The core surface wobbles by +-_CORE_WOBBLE (relative),
# the rim is >= _RIM_MIN (+ up to _RIM_EXTRA) thick, the necrotic radius >= _NECROSIS_MIN.
_CORE_RADIUS = {"small": (10.0, 16.0), "large": (16.0, 24.0)}
_OEDEMA_MARGIN = {"small": (5.0, 12.0), "large": (8.0, 20.0)}
_CORE_WOBBLE = 0.12
_RIM_MIN, _RIM_EXTRA = 5.0, 2.0
_NECROSIS_MIN = 5.0
_NO_NECROSIS_RATE = 0.15


@dataclass(frozen=True)
class Tumour:
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
class Anatomy:
    """One head: template-space shape and its placement in the world."""

    world_to_template: NDArray[np.float64]  # 4x4
    radii_pos: NDArray[np.float64]  # brain half-axes toward +x, +y, +z
    radii_neg: NDArray[np.float64]  # brain half-axes toward -x, -y, -z
    csf: float
    skull: float
    scalp: float
    cortex: float
    sulci: NDArray[np.float64]  # (3 waves, 4): wave vector (rad/mm), phase
    tumour: Tumour


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


def sample_anatomy(rng: np.random.Generator, size_mix: tuple[float, float]) -> Anatomy:
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
    return Anatomy(
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
) -> Tumour:
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
    return Tumour(size, side, centre, core, rim, oedema, necrosis, waves)


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


def _brain_depth(an: Anatomy, x: F32, y: F32, z: F32) -> F32:
    """Depth (mm) below the brain surface along the ray from the centre; < 0 outside."""
    a = np.where(x >= 0, np.float32(an.radii_pos[0]), np.float32(an.radii_neg[0]))
    b = np.where(y >= 0, np.float32(an.radii_pos[1]), np.float32(an.radii_neg[1]))
    c = np.where(z >= 0, np.float32(an.radii_pos[2]), np.float32(an.radii_neg[2]))
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    dist = np.sqrt(x * x + y * y + z * z)
    # Distance to the surface along the ray: dist / rho is the surface radius there.
    depth: F32 = dist * (1 - rho) / np.maximum(rho, np.float32(1e-3))
    return depth


def classify(an: Anatomy, x: F32, y: F32, z: F32) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
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


def _fold_cortex(an: Anatomy, cls: NDArray[np.uint8], depth: F32, x: F32, y: F32, z: F32) -> None:
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


def _place_tumour(t: Tumour, cls: NDArray[np.uint8], x: F32, y: F32, z: F32) -> None:
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
