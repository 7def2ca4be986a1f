"""How long fedseg's per-case metrics take, against MONAI's (and DeepMind's) on the same masks.

Run as ``python -m evaluation.benchmark_metrics [--repeats N] [--out DIR]``. One synthetic
case on the BraTS grid (240 x 240 x 155 at 1 mm, a whole tumour of about 65 ml with a
satellite lesion; the prediction moved by a voxel, with boundary noise, the satellite
missed and a false blob added) is scored once by each method untimed (lazy imports and
first-call set-up), then ``--repeats`` times by each, alternating:

- ``fedseg``: :func:`evaluation.metrics.region_scores`, Dice and HD95 of WT, TC and ET:
  what validation runs every round; the goal is under ``GOAL_SECONDS`` per case;
- ``fedseg_lesion_wise``: :func:`evaluation.metrics.case_scores` with ``lesion_wise=True``
  (everything the evaluation report shows);
- ``monai``: the baseline, MONAI's ``compute_dice`` + ``compute_hausdorff_distance(
  percentile=95)`` on the same three region masks (one-hot, one call each), which is what a
  hand-written MONAI script would do. It counts boundary voxels rather than weighing surface
  area, so its HD95 differs slightly: it is a cost baseline, not a reference;
- ``deepmind`` (only when ``surface-distance`` is installed): DeepMind's
  ``compute_surface_distances`` + ``compute_robust_hausdorff(95)`` and a voxel-count Dice
  per region: the reference implementation of the definition fedseg uses.

Every timed call starts from the two label maps, so region masks are part of each cost.
Medians go to ``DIR/results.json`` with the scores each method gave (a check that they
measured the same masks); the headline ``ratio`` is median(fedseg) / median(monai).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from numpy.typing import NDArray
from scipy import ndimage

from evaluation.metrics import case_scores, region_scores
from evaluation.regions import REGION_NAMES, region_masks

#: The goal for validation's per-case scoring (Dice + HD95 of three regions), seconds.
GOAL_SECONDS = 2.0
BRATS_SHAPE = (240, 240, 155)
BRATS_SPACING = (1.0, 1.0, 1.0)

Labels = NDArray[np.uint8]
Mask = NDArray[np.bool_]
Scores = dict[str, dict[str, float]]
Floats = Sequence[float] | NDArray[np.floating]


def _ellipsoid(shape: Sequence[int], centre: Floats, radii: Floats) -> Mask:
    """An axis-aligned ellipsoid, computed in its bounding box only (the grid is large)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    lo = [max(math.floor(c - r), 0) for c, r in zip(centre, radii, strict=True)]
    hi = [min(math.ceil(c + r) + 1, n) for c, r, n in zip(centre, radii, shape, strict=True)]
    axes = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    inside = sum(((x - c) / r) ** 2 for x, c, r in zip(axes, centre, radii, strict=True)) <= 1.0
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = inside
    return mask


def _noisy_boundary(mask: Mask, rng: np.random.Generator, fraction: float) -> Mask:
    """Flip ``fraction`` of the voxels just inside and just outside the boundary."""
    boundary = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    return np.asarray(mask ^ (boundary & (rng.random(mask.shape) < fraction)), dtype=bool)


def _labels(wt: Mask, tc: Mask, et: Mask) -> Labels:
    labels = np.zeros(wt.shape, dtype=np.uint8)
    labels[wt] = 2
    labels[wt & tc] = 1
    labels[wt & tc & et] = 3
    return labels


def synthetic_case(shape: Sequence[int] = BRATS_SHAPE, *, seed: int = 0) -> tuple[Labels, Labels]:
    """``(reference, prediction)`` canonical label maps of one glioma-like case.

    Sizes scale with ``shape``; on the BraTS grid the whole tumour is about 65 ml, the
    core about 25 ml and ET its 2-voxel rim (about 6 ml). The prediction is the reference
    moved by one voxel with noise on 30 % of its boundary, the satellite lesion missed and
    a false blob added: the imperfections that make HD95 and the lesion-wise scores work.
    """
    rng = np.random.default_rng(seed)
    s = np.asarray(shape, dtype=float)
    centre = s * (0.55, 0.45, 0.5)
    lobes = [(centre, s * (0.12, 0.10, 0.14))]
    lobes += [(centre + s * rng.uniform(-0.06, 0.06, 3), s * rng.uniform(0.05, 0.08, 3))
              for _ in range(3)]  # fmt: skip
    wt = np.zeros(tuple(shape), dtype=bool)
    for c, r in lobes:
        wt |= _ellipsoid(shape, c, r)
    tc = wt & _ellipsoid(shape, centre, s * (0.08, 0.075, 0.11))
    et = tc & ~ndimage.binary_erosion(tc, iterations=2)
    satellite = _ellipsoid(shape, s * (0.3, 0.7, 0.5), s * (0.022, 0.02, 0.03))
    reference = _labels(wt | satellite, tc, et)

    moved = [np.roll(m, 1, axis=0) for m in (wt, tc)]
    pred_wt, pred_tc = (_noisy_boundary(m, rng, 0.3) for m in moved)
    pred_et = pred_tc & ~ndimage.binary_erosion(pred_tc, iterations=2)
    false_blob = _ellipsoid(shape, s * (0.75, 0.25, 0.6), s * (0.015, 0.015, 0.02))
    prediction = _labels(pred_wt | false_blob, pred_tc, pred_et)
    return reference, prediction


def fedseg_scores(pred: Labels, ref: Labels, spacing: Sequence[float]) -> Scores:
    """fedseg's validation scores (Dice, HD95 mm) per region."""
    scores = region_scores(pred, ref, spacing=spacing)
    return {name: {"dice": s.dice, "hd95": s.hd95} for name, s in scores.items()}


def fedseg_lesion_wise_scores(pred: Labels, ref: Labels, spacing: Sequence[float]) -> Scores:
    """fedseg's full case scores with the BraTS 2023 lesion-wise ones, flattened."""
    scores = case_scores(pred, ref, spacing=spacing, lesion_wise=True)
    return {k: {n: float(x) for n, x in v.as_dict().items()} for k, v in scores.items()}


def monai_scores(pred: Labels, ref: Labels, spacing: Sequence[float]) -> Scores:
    """The baseline: MONAI's Dice and boundary-voxel HD95 on the three region masks at once."""
    y_pred = torch.from_numpy(region_masks(pred)[None])
    y = torch.from_numpy(region_masks(ref)[None])
    dice = compute_dice(y_pred.float(), y.float(), include_background=True)
    with warnings.catch_warnings():
        # MONAI warns about its own internal use of a deprecated argument (MONAI 1.5-1.6).
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(spacing)
        )
    return {
        name: {"dice": float(dice[0, i]), "hd95": float(hd95[0, i])}
        for i, name in enumerate(REGION_NAMES)
    }


def deepmind_scores(pred: Labels, ref: Labels, spacing: Sequence[float]) -> Scores:
    """DeepMind's surface_distance HD95 and a voxel-count Dice per region (non-empty masks)."""
    import surface_distance

    out: Scores = {}
    for name, p, r in zip(REGION_NAMES, region_masks(pred), region_masks(ref), strict=True):
        with warnings.catch_warnings():
            # surface-distance 0.1 uses scipy.ndimage namespaces deprecated since SciPy 1.8.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            distances = surface_distance.compute_surface_distances(r, p, list(spacing))
        dice = 2.0 * int(np.count_nonzero(p & r)) / (int(p.sum()) + int(r.sum()))
        hd95 = float(surface_distance.compute_robust_hausdorff(distances, 95))
        out[name] = {"dice": dice, "hd95": hd95}
    return out


def _deepmind_available() -> bool:
    try:
        import surface_distance  # noqa: F401
    except ImportError:
        return False
    return True


def run_benchmark(
    *,
    shape: Sequence[int] = BRATS_SHAPE,
    spacing: Sequence[float] = BRATS_SPACING,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time every method ``repeats`` times, alternating, on one synthetic case."""
    reference, prediction = synthetic_case(shape, seed=seed)
    methods: dict[str, Callable[[Labels, Labels, Sequence[float]], Scores]] = {
        "fedseg": fedseg_scores,
        "fedseg_lesion_wise": fedseg_lesion_wise_scores,
        "monai": monai_scores,
    }
    if _deepmind_available():
        methods["deepmind"] = deepmind_scores
    times: dict[str, list[float]] = {name: [] for name in methods}
    # One untimed call each first: lazy imports and first-call set-up are not per-case costs.
    scores = {name: method(prediction, reference, spacing) for name, method in methods.items()}
    for repeat in range(repeats):
        # Alternate the order so drift in machine load hits every method alike.
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for name in order:
            start = time.perf_counter()
            scores[name] = methods[name](prediction, reference, spacing)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    volumes = {
        name: {
            "reference": int(np.count_nonzero(r)) * voxel_ml,
            "prediction": int(np.count_nonzero(p)) * voxel_ml,
        }
        for name, p, r in zip(
            REGION_NAMES, region_masks(prediction), region_masks(reference), strict=True
        )
    }
    result: dict[str, Any] = {
        "shape": list(shape),
        "spacing_mm": [float(s) for s in spacing],
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "volumes_ml": volumes,
        "seconds": times,
        "median_seconds": medians,
        "ratio": medians["fedseg"] / medians["monai"],
        "ratio_lesion_wise": medians["fedseg_lesion_wise"] / medians["monai"],
        "goal_seconds": GOAL_SECONDS,
        "meets_goal": medians["fedseg"] < GOAL_SECONDS,
        "scores": scores,
    }
    if "deepmind" in medians:
        result["ratio_deepmind"] = medians["fedseg"] / medians["deepmind"]
        result["max_hd95_difference_vs_deepmind_mm"] = max(
            abs(scores["fedseg"][r]["hd95"] - scores["deepmind"][r]["hd95"]) for r in REGION_NAMES
        )
    return result


def format_table(result: dict[str, Any]) -> str:
    """A small text table: median seconds, ratio to MONAI and each region's Dice / HD95."""
    monai = result["median_seconds"]["monai"]
    header = f"{'method':<20}{'median s':>10}{'x monai':>9}" + "".join(
        f"{r + ' Dice':>10}{r + ' HD95':>10}" for r in REGION_NAMES
    )
    lines = [header, "-" * len(header)]
    for name, seconds in result["median_seconds"].items():
        scores = result["scores"][name]
        lines.append(
            f"{name:<20}{seconds:>10.3f}{seconds / monai:>9.2f}"
            + "".join(f"{scores[r]['dice']:>10.4f}{scores[r]['hd95']:>10.3f}" for r in REGION_NAMES)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json (none: print only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=list(BRATS_SHAPE), metavar=("X", "Y", "Z"),
        help="grid in voxels at 1 mm (default: the BraTS grid; smaller for a quick look)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.shape) < 24:
        parser.error("need --repeats >= 1 and a --shape of at least 24 voxels per axis")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run_benchmark(shape=tuple(args.shape), repeats=args.repeats, seed=args.seed)
    volumes = ", ".join(f"{k} {v['reference']:.1f}" for k, v in result["volumes_ml"].items())
    print(
        f"one case {' x '.join(map(str, result['shape']))} at "
        f"{' x '.join(f'{s:g}' for s in result['spacing_mm'])} mm (reference ml: {volumes}); "
        f"median of {args.repeats}, torch threads {result['torch_threads']}"
    )
    print(format_table(result))
    verdict = "meets" if result["meets_goal"] else "misses"
    fedseg = result["median_seconds"]["fedseg"]
    print(
        f"fedseg / monai = {result['ratio']:.2f}; fedseg {fedseg:.2f} s per case "
        f"{verdict} the goal of < {GOAL_SECONDS:g} s"
    )
    if "ratio_deepmind" in result:
        print(
            f"fedseg / deepmind = {result['ratio_deepmind']:.2f}; HD95 differs from DeepMind's "
            f"by at most {result['max_hd95_difference_vs_deepmind_mm']:.1e} mm"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "results.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
