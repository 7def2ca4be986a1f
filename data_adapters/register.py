"""Rigid co-registration of one modality onto another (SimpleITK, Mattes mutual information).

Mutual information is used because the modalities differ in contrast (CSF is dark
on T1 and bright on T2), so no intensity-difference metric applies.  The
registration runs coarse to fine (shrink factors 4, 2, 1) from the better of two
starts: the identity, and SimpleITK's centred transform initialiser (centres of
intensity mass), which rescues modalities whose header puts them far away.
Metric samples are drawn with a fixed seed, so the same images give the same
transform.

Transforms follow ITK's convention: they map a point of the *fixed* image's world
(LPS, mm) to the matching point of the *moving* image's world, which is exactly
what resampling the moving image onto a grid in the fixed image's world needs.

Every result is judged against the identity on the same metric samples:

- better than the identity: kept;
- worse: a second run from the identity, at full resolution with small steps;
  the better of the two results is judged again;
- still worse, but within :data:`NEAR_IDENTITY_MM` of it: the identity is kept.
  This happens on already aligned data, mostly thick slices: where two grids
  coincide the metric has a sharp peak (no interpolation blur) that the optimiser
  steps off and does not find again;
- worse and farther away, not finite, or sharing almost no information with the
  fixed image: :class:`DataError`, as a silently misregistered modality is worse
  than a skipped case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.errors import DataError

#: Coarse-to-fine pyramid and its Gaussian smoothing (in voxels of each level).
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS = (2.0, 1.0, 0.0)
HISTOGRAM_BINS = 32
#: Metric samples per level; small images use every voxel.
SAMPLES_PER_LEVEL = 40_000
MAX_ITERATIONS = 100
#: A final mutual information (nats) below this shares no structure with the fixed image.
MIN_MUTUAL_INFORMATION = 0.05
#: A result worse than the identity but moving no point of the fixed image's box by
#: more than this (mm) means "already aligned": the identity is kept.
NEAR_IDENTITY_MM = 3.0


@dataclass(frozen=True)
class RegistrationMetrics:
    """What a registration found and how well it went.

    ``parameters`` are the Euler angles (radians, about x, y, z) and the translation
    (mm) of the rigid transform in the LPS world, about ``center``; metric values are
    Mattes mutual information as ITK reports it (negative, lower is better), all
    evaluated on the same full-resolution samples.  ``displacement_mm`` is how far
    the optimiser's result moves the corners of the fixed image's box;
    ``kept_identity`` says the identity scored better and was kept instead.
    """

    parameters: tuple[float, ...]
    center: tuple[float, ...]
    rotation_deg: float
    translation_mm: float
    metric_identity: float
    metric_initial: float
    metric_final: float
    initialiser: str
    iterations: int
    stop_condition: str
    displacement_mm: float = 0.0
    kept_identity: bool = False

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (an undefined identity metric is ``None``)."""
        return {
            "parameters": list(self.parameters),
            "center": list(self.center),
            "rotation_deg": self.rotation_deg,
            "translation_mm": self.translation_mm,
            "metric_identity": _finite_or_none(self.metric_identity),
            "metric_initial": self.metric_initial,
            "metric_final": self.metric_final,
            "initialiser": self.initialiser,
            "iterations": self.iterations,
            "stop_condition": self.stop_condition,
            "displacement_mm": self.displacement_mm,
            "kept_identity": self.kept_identity,
        }


def rigid_register(
    fixed: sitk.Image, moving: sitk.Image, *, seed: int, path: str | Path = "<image>"
) -> tuple[sitk.Euler3DTransform, RegistrationMetrics]:
    """Rigidly register ``moving`` onto ``fixed``.

    Parameters
    ----------
    fixed, moving
        3D scalar images on any grids; only their world geometry relates them.
    seed
        Seed of the metric's random sampling (same seed, same result).
    path
        The moving image's source, named in errors.

    Returns
    -------
    transform, metrics
        Rigid transform mapping fixed-world points to moving-world points, and what
        the registration reported (see :class:`RegistrationMetrics`).

    Raises
    ------
    DataError
        If ITK fails, the result is not finite, ends worse than the identity and
        far from it, or shares no information with ``fixed``.
    """
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    identity = sitk.Euler3DTransform()
    identity.SetCenter(_world_centre(fixed_f))
    metric_identity = _evaluate(fixed_f, moving_f, identity, seed=seed)
    initial, metric_initial, initialiser = _best_start(
        fixed_f, moving_f, identity, metric_identity, seed=seed
    )
    if not math.isfinite(metric_initial):
        raise DataError(path, "rigid registration impossible: images share no world region")
    transform, method = _optimise(fixed_f, moving_f, initial, seed=seed, path=path)
    metric_final = _evaluate(fixed_f, moving_f, transform, seed=seed)
    if metric_final > metric_identity:
        # Thick slices blur the coarse levels: retry from the identity at full
        # resolution with small steps, and keep whichever result scores better.
        retry, retry_method = _optimise(
            fixed_f, moving_f, identity, seed=seed, path=path, pyramid=False
        )
        metric_retry = _evaluate(fixed_f, moving_f, retry, seed=seed)
        if metric_retry < metric_final:
            transform, method, metric_final = retry, retry_method, metric_retry
            initialiser = "identity (full-resolution retry)"
    metrics = _metrics(transform, method, (metric_identity, metric_initial, metric_final))
    metrics = replace(
        metrics, initialiser=initialiser, displacement_mm=_displacement(transform, fixed_f)
    )
    _check_finite(metrics, path)
    if metric_final > metric_identity:
        if metrics.displacement_mm > NEAR_IDENTITY_MM:
            raise DataError(
                path,
                f"rigid registration ended {metrics.displacement_mm:.1f} mm from the identity "
                f"with a worse metric ({metric_final:.4f} > {metric_identity:.4f})",
            )
        transform = identity
        metrics = replace(metrics, metric_final=metric_identity, kept_identity=True)
    _check_information(metrics, path)
    return transform, metrics


def world_bounds(image: sitk.Image) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Axis-aligned world (LPS) box around the image's voxel extent: (low, high) corners."""
    size = np.array(image.GetSize(), dtype=float)
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(
                [float(v) for v in -0.5 + size * np.array(c)]
            )
            for c in np.ndindex(2, 2, 2)
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def overlap_fraction(a: sitk.Image, b: sitk.Image) -> float:
    """Volume shared by the two images' world boxes, over the smaller box's volume (0..1)."""
    (low_a, high_a), (low_b, high_b) = world_bounds(a), world_bounds(b)
    shared = np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None)
    smaller = min(float(np.prod(high_a - low_a)), float(np.prod(high_b - low_b)))
    return float(np.prod(shared)) / smaller if smaller > 0 else 0.0


def _method(
    fixed: sitk.Image, *, seed: int, multi_resolution: bool
) -> sitk.ImageRegistrationMethod:
    """A Mattes-MI registration method with seeded random sampling."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetInterpolator(sitk.sitkLinear)
    voxels = float(np.prod(fixed.GetSize()))
    shrinks = SHRINK_FACTORS if multi_resolution else (1,)
    fractions = [min(1.0, SAMPLES_PER_LEVEL * s**3 / voxels) for s in shrinks]
    # ITK reads seed 0 as "seed from the wall clock": shift by one to stay reproducible.
    method.SetMetricSamplingPercentagePerLevel(fractions, seed + 1)
    method.SetShrinkFactorsPerLevel(list(shrinks))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS if multi_resolution else (0.0,)))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    # Step lengths in mm of voxel motion; scales make 1 radian comparable to 1 mm.
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0 if multi_resolution else 0.25,
        minStep=1e-3,
        numberOfIterations=MAX_ITERATIONS,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _best_start(
    fixed: sitk.Image,
    moving: sitk.Image,
    identity: sitk.Euler3DTransform,
    metric_identity: float,
    *,
    seed: int,
) -> tuple[sitk.Euler3DTransform, float, str]:
    """The identity or the centred initialiser (centres of mass), whichever scores better."""
    centred = sitk.Euler3DTransform(
        sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    )
    metric_centred = _evaluate(fixed, moving, centred, seed=seed)
    if metric_identity <= metric_centred:
        return identity, metric_identity, "identity"
    return centred, metric_centred, "centred_moments"


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Euler3DTransform,
    *,
    seed: int,
    path: str | Path,
    pyramid: bool = True,
) -> tuple[sitk.Euler3DTransform, sitk.ImageRegistrationMethod]:
    """Run the optimiser from ``initial``; return the rigid result and the finished method.

    Without the pyramid only the full resolution runs, with 8x smaller steps.
    """
    method = _method(fixed, seed=seed, multi_resolution=pyramid)
    method.SetInitialTransform(sitk.Euler3DTransform(initial), inPlace=False)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as err:
        raise DataError(path, f"rigid registration failed: {err}") from err
    return sitk.Euler3DTransform(sitk.CompositeTransform(result).GetBackTransform()), method


def _evaluate(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, *, seed: int
) -> float:
    """Full-resolution metric at ``transform`` (inf where the images do not overlap)."""
    method = _method(fixed, seed=seed, multi_resolution=False)
    method.SetInitialTransform(transform, inPlace=False)
    try:
        value = float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:  # ITK: too many samples map outside the moving image
        return math.inf
    return value if math.isfinite(value) else math.inf


def _metrics(
    transform: sitk.Euler3DTransform,
    method: sitk.ImageRegistrationMethod,
    values: tuple[float, float, float],
) -> RegistrationMetrics:
    """Summarise a result; ``values`` are the identity, initial and final metrics."""
    metric_identity, metric_initial, metric_final = values
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    angle = math.degrees(math.acos(float(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0))))
    return RegistrationMetrics(
        parameters=tuple(float(p) for p in transform.GetParameters()),
        center=tuple(float(c) for c in transform.GetCenter()),
        rotation_deg=angle,
        translation_mm=float(np.linalg.norm(transform.GetTranslation())),
        metric_identity=metric_identity,
        metric_initial=metric_initial,
        metric_final=metric_final,
        initialiser="",
        iterations=int(method.GetOptimizerIteration()),
        stop_condition=" ".join(method.GetOptimizerStopConditionDescription().split()),
    )


def _check_finite(metrics: RegistrationMetrics, path: str | Path) -> None:
    if not (
        math.isfinite(metrics.metric_final) and all(math.isfinite(p) for p in metrics.parameters)
    ):
        raise DataError(path, "rigid registration diverged (non-finite result)")


def _check_information(metrics: RegistrationMetrics, path: str | Path) -> None:
    """Refuse a result that shares (almost) no information with the fixed image."""
    if -metrics.metric_final < MIN_MUTUAL_INFORMATION:
        raise DataError(
            path,
            f"rigid registration failed: final mutual information {-metrics.metric_final:.4f} "
            f"< {MIN_MUTUAL_INFORMATION} (no shared structure with the reference)",
        )


def _displacement(transform: sitk.Transform, fixed: sitk.Image) -> float:
    """Largest distance (mm) the transform moves a corner of the fixed image's world box."""
    low, high = world_bounds(fixed)
    corners = [np.where(np.array(c, bool), high, low) for c in np.ndindex(2, 2, 2)]
    moved = [np.array(transform.TransformPoint([float(v) for v in c])) for c in corners]
    return float(max(np.linalg.norm(m - c) for m, c in zip(moved, corners, strict=True)))


def _world_centre(image: sitk.Image) -> tuple[float, float, float]:
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    return (float(centre[0]), float(centre[1]), float(centre[2]))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def align_to_reference(
    images: Mapping[str, sitk.Image],
    *,
    reference: str,
    register: bool,
    min_overlap: float,
    seed: int,
    sources: Mapping[str, str],
) -> tuple[dict[str, sitk.Transform], dict[str, Any]]:
    """Decide, per modality, whether to register it onto ``reference``, and do so.

    A modality is registered when ``register`` is asked, or automatically when its
    world box overlaps the reference's by less than ``min_overlap`` (resampling it
    through world coordinates would then miss the head).

    Returns
    -------
    transforms, params
        Rigid transforms of the registered modalities (reference world -> modality
        world; the others are absent, meaning identity) and the record of what was
        decided: per modality the 6 rigid parameters, the metric, whether automatic.
    """
    fixed = images[reference]
    transforms: dict[str, sitk.Transform] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, moving in images.items():
        if name == reference:
            continue
        overlap = overlap_fraction(fixed, moving)
        automatic = not register and overlap < min_overlap
        record: dict[str, Any] = {
            "registered": register or automatic,
            "automatic": automatic,
            "overlap": round(overlap, 4),
        }
        if register or automatic:
            transform, metrics = rigid_register(fixed, moving, seed=seed, path=sources[name])
            transforms[name] = transform
            record.update(metrics.to_json())
        else:
            record.update({"parameters": [0.0] * 6, "metric_final": None})
        records[name] = record
    params = {
        "reference": reference,
        "requested": register,
        "min_overlap": min_overlap,
        "method": (
            f"rigid Euler3D, Mattes MI ({HISTOGRAM_BINS} bins), shrink "
            f"{'/'.join(map(str, SHRINK_FACTORS))}, seed {seed}"
        ),
        "images": records,
    }
    return transforms, params
