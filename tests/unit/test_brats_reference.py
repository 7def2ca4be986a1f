"""fedseg's case metrics against the BraTS challenge's own package (brats-evaluation).

Optional: needs the separate environment made by ``tests/reference/make-brats-env.sh``
(found through ``FEDSEG_BRATS_PYTHON`` or at ``.venv-brats/bin/python``); skips without it.
Eleven synthetic 64^3 cases at 1 mm (the BraTS grid spacing) are written as NIfTI, scored by
``tests/reference/brats_runner.py`` in that environment, and compared with
:func:`evaluation.metrics.case_scores` (``lesion_wise=True``).

brats-evaluation 0.0.10 (panoptica 2.1.7, config ``gli``) is the BraTS 2025 pipeline;
fedseg implements the BraTS 2023 definitions. What agrees, and what differs by definition:

- Global Dice: one formula, agrees to 1e-6 (exactly, in practice). Both masks empty:
  BraTS 2025 leaves NaN, fedseg gives 1 (BraTS 2023).
- Global HD95: a different definition. panoptica pools both directions' distances between
  6-connected *border voxels* (voxel centres) and takes ``np.percentile(..., 95)``
  (medpy's hd95); fedseg weighs surface elements by area and takes the larger directional
  95th percentile (BraTS 2023, DeepMind). The package's number is asserted to be exactly
  that pooled border-voxel value; fedseg's is within ``HD95_STEP_MM`` (0.5 mm; measured
  0.414) of it where every lesion is matched, and above it (pooling lowers the percentile)
  where far missed or false lesions dominate.
  Also: the package's global HD95 ignores the voxel spacing (voxels, not mm; it equals mm
  only at 1 mm), is infinite -> 373 whenever the masks do not overlap at all (fedseg
  measures the distance), and one empty mask gives 373 where fedseg gives 374.
- Lesion-wise: panoptica's lesions are plain 26-connected components (no dilation grouping,
  no 50 mm^3 floor), matched one-to-one by Dice > 1e-6 (fedseg: every component touching
  the lesion's 3-voxel dilation); its lesion-wise Dice/HD95 are means over *matched*
  lesions only, with no penalty entries for misses and false positives. On cases built so
  both decompositions coincide (lesions far apart, all > 50 voxels, one overlapping
  component each) TP/FP/FN agree exactly and ``fedseg_dice * (tp + fn + fp) == brats_dice *
  tp``; the HD95 means over matched lesions agree within ``HD95_STEP_MM``. Where they
  differ (fragments 2 voxels apart, a lesion <= 50 voxels) the counts differ exactly as
  these rules say (:func:`test_lesion_decompositions_differ_where_the_definitions_do`).
- Not used here: panoptica builds its arrays with SimpleITK (z, y, x) but takes the spacing
  in SimpleITK's (x, y, z) order, so its lesion-wise HD95 on anisotropic NIfTI files
  weighs the wrong axes; irrelevant at 1 mm.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from evaluation.metrics import HD95_EMPTY_MM, CaseRegionScores, case_scores
from evaluation.regions import REGION_NAMES, region_masks

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "reference" / "brats_runner.py"
SETUP_SCRIPT = "tests/reference/make-brats-env.sh"
PYTHON_ENV_VAR = "FEDSEG_BRATS_PYTHON"
RUNNER_TIMEOUT_S = 600

SHAPE = (64, 64, 64)
SPACING = (1.0, 1.0, 1.0)
#: BraTS 2025's penalty for an infinite HD95 (brats_evaluation.metrics_parser).
BRATS_HD95_INF = 373.0
#: How far the two HD95 definitions may land apart (mm) where they measure the same thing.
#: At 1 mm, distances between voxel centres (the package) are sqrt(k) and distances to
#: corner surfaces (fedseg) fall in between, so the two 95th percentiles land one step apart
#: at most; measured: up to sqrt(2) - 1 = 0.414 mm. Where a far missed or false lesion holds
#: the 95th percentile, pooling both directions puts the package's value lower instead
#: (measured: up to 2.4 mm below), never higher than fedseg's by more than this step.
HD95_STEP_MM = 0.5
#: Lattice corners (voxels) lesions sit on, 31 voxels apart: reference lesions (radius <= 9)
#: stay 13 voxels apart and predicted ones (radius <= 10.4, moved <= 1.5) 10 voxels from
#: any other reference lesion, beyond BraTS 2023's 3-voxel dilations (grouping, matching).
CORNERS = [(a, b, c) for a in (16, 47) for b in (16, 47) for c in (16, 47)]
#: The case built so that the two lesion decompositions differ.
DIVERGENCE_CASE = "BraTS-GLI-00010-000"


@dataclass(frozen=True)
class Lesion:
    """An ellipsoid of SNFH with an optional core: NETC inside an ET rim one voxel thick."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    core: float = 0.6  # core radii / lesion radii; 0: no core
    et: bool = True  # the core's rim is ET (else the whole core is NETC)


def _ellipsoid(centre: tuple[float, ...], radii: tuple[float, ...]) -> NDArray[np.bool_]:
    grid = np.indices(SHAPE, dtype=float)
    terms = (((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return np.asarray(sum(terms) <= 1.0)


def _draw(lesions: list[Lesion]) -> NDArray[np.uint8]:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for lesion in lesions:
        labels[_ellipsoid(lesion.centre, lesion.radii)] = 2
        if lesion.core:
            core = _ellipsoid(lesion.centre, tuple(r * lesion.core for r in lesion.radii))
            labels[core] = 1
            if lesion.et:
                labels[core & ~ndimage.binary_erosion(core)] = 3
    return labels


def _triple(values: NDArray[np.floating] | tuple[float, ...]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def _random_lesion(rng: np.random.Generator, corner: tuple[int, int, int]) -> Lesion:
    return Lesion(centre=_triple(tuple(map(float, corner))), radii=_triple(rng.uniform(6, 9, 3)))


def _imperfect(lesion: Lesion, rng: np.random.Generator) -> Lesion:
    """The same lesion as a model might predict it: moved <= 1.5 voxels, radii +-15 %."""
    centre = np.asarray(lesion.centre) + rng.uniform(-1.5, 1.5, 3)
    radii = np.asarray(lesion.radii) * rng.uniform(0.85, 1.15, 3)
    return replace(lesion, centre=_triple(centre), radii=_triple(radii))


def _agreement_cases() -> dict[str, tuple[NDArray[np.uint8], NDArray[np.uint8]]]:
    """``{case: (reference, prediction)}`` where both lesion decompositions coincide."""
    cases: dict[str, tuple[NDArray[np.uint8], NDArray[np.uint8]]] = {}
    for index in range(6):  # 2-4 lesions, some missed, some false positives
        rng = np.random.default_rng(100 + index)
        corners = [CORNERS[i] for i in rng.permutation(len(CORNERS))]
        n = 2 + index % 3
        ref = [_random_lesion(rng, c) for c in corners[:n]]
        found = ref[1:] if index % 2 else ref  # odd cases miss their first lesion
        pred = [_imperfect(lesion, rng) for lesion in found]
        if index % 3 != 1:  # a false positive: SNFH only, or a whole lesion
            pred.append(replace(_random_lesion(rng, corners[n]), core=0.6 * (index % 2)))
        cases[f"BraTS-GLI-{index:05d}-000"] = (_draw(ref), _draw(pred))
    rng = np.random.default_rng(7)
    lesions = [_random_lesion(rng, c) for c in CORNERS[:3]]
    imperfect = [_imperfect(lesion, rng) for lesion in lesions]
    no_core = [replace(lesion, core=0.0) for lesion in lesions]
    no_et = [replace(lesion, et=False) for lesion in imperfect]
    cases["BraTS-GLI-00006-000"] = (  # no TC, no ET on either side
        _draw(no_core), _draw([replace(lesion, core=0.0) for lesion in imperfect])
    )  # fmt: skip
    cases["BraTS-GLI-00007-000"] = (_draw(lesions), _draw(no_et))  # ET missed entirely
    no_ref_et = [replace(lesion, et=False) for lesion in lesions]
    cases["BraTS-GLI-00008-000"] = (_draw(no_ref_et), _draw(imperfect))  # ET false only
    # ET on both sides but in different lesions: no overlap at all (BraTS: HD95 infinite).
    ref_et = [lesions[0], *(replace(x, et=False) for x in lesions[1:])]
    pred_et = [replace(imperfect[0], et=False), imperfect[1], replace(imperfect[2], et=False)]
    cases["BraTS-GLI-00009-000"] = (_draw(ref_et), _draw(pred_et))
    return cases


def _divergence_case() -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """WT only: two fragments 2 voxels apart under one predicted blob, plus a missed
    27-voxel lesion. BraTS 2023 (fedseg): one lesion (grouped), the small one ignored ->
    TP 1, FN 0. BraTS 2025: three instances, the blob matched to one fragment -> TP 1, FN 2."""
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[10:20, 10:20, 10:20] = 2
    ref[10:20, 10:20, 22:32] = 2  # 2 empty voxels between the fragments
    ref[45:48, 45:48, 45:48] = 2  # 27 voxels <= 50 mm^3
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[10:20, 10:20, 11:31] = 2
    return ref, pred


def _brats_python() -> Path:
    """The interpreter of the brats-evaluation environment (which may not exist)."""
    configured = os.environ.get(PYTHON_ENV_VAR)
    return Path(configured) if configured else REPO / ".venv-brats" / "bin" / "python"


def _save(labels: NDArray[np.uint8], path: Path) -> None:
    nib.save(nib.Nifti1Image(labels, np.diag([*SPACING, 1.0])), path)


@dataclass(frozen=True)
class Scored:
    """Each case's arrays, fedseg's scores and the package's (per region)."""

    arrays: dict[str, tuple[NDArray[np.uint8], NDArray[np.uint8]]]
    fedseg: dict[str, dict[str, CaseRegionScores]]
    brats: dict[str, dict[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Scored:
    python = _brats_python()
    if not python.is_file():
        pytest.skip(
            f"brats-evaluation environment absent (no {python}): run `bash {SETUP_SCRIPT}` "
            f"(or set {PYTHON_ENV_VAR} to its python)"
        )
    root = tmp_path_factory.mktemp("brats")
    (root / "ref").mkdir()
    (root / "pred").mkdir()
    arrays = _agreement_cases() | {DIVERGENCE_CASE: _divergence_case()}
    for case, (ref, pred) in arrays.items():
        _save(ref, root / "ref" / f"{case}-seg.nii.gz")
        _save(pred, root / "pred" / f"{case}.nii.gz")
    out = root / "brats.json"
    command = [str(python), str(RUNNER), "--ref-dir", str(root / "ref"),
               "--pred-dir", str(root / "pred"), "--out", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    brats = json.loads(out.read_text())["cases"]
    fedseg = {
        case: case_scores(pred, ref, spacing=SPACING, lesion_wise=True)
        for case, (ref, pred) in arrays.items()
    }
    return Scored(arrays=arrays, fedseg=fedseg, brats=brats)


def _pairs(scored: Scored, *, agreement_only: bool = True) -> list[tuple[str, str]]:
    """(case, region) to compare; by default without the case built to diverge."""
    return [
        (case, region)
        for case in scored.arrays
        if not (agreement_only and case == DIVERGENCE_CASE)
        for region in REGION_NAMES
    ]


def _masks(scored: Scored, case: str, region: str) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    ref, pred = scored.arrays[case]
    i = REGION_NAMES.index(region)
    return region_masks(ref)[i], region_masks(pred)[i]


def _pooled_border_voxel_hd95(ref: NDArray[np.bool_], pred: NDArray[np.bool_]) -> float:
    """panoptica's (medpy's) HD95, in voxels: 95th percentile of both directions' distances
    between 6-connected border voxels, pooled; written here to pin what the package does."""
    cross = ndimage.generate_binary_structure(3, 1)
    ref_border = ref ^ ndimage.binary_erosion(ref, structure=cross)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=cross)
    to_pred = ndimage.distance_transform_edt(~pred_border)[ref_border]
    to_ref = ndimage.distance_transform_edt(~ref_border)[pred_border]
    return float(np.percentile(np.hstack((to_pred, to_ref)), 95))


def test_every_case_was_scored_by_the_package(scored: Scored) -> None:
    # Prepare
    expected = set(scored.arrays)
    # Execute
    got = set(scored.brats)
    # Assert
    assert got == expected
    kinds = {
        (bool(ref.any()), bool(pred.any()))
        for case, region in _pairs(scored)
        for ref, pred in [_masks(scored, case, region)]
    }
    assert kinds == {(True, True), (False, False), (True, False), (False, True)}


def test_global_dice_agrees(scored: Scored) -> None:
    # Prepare
    worst = 0.0
    for case, region in _pairs(scored, agreement_only=False):
        ref, pred = _masks(scored, case, region)
        # Execute
        ours, theirs = scored.fedseg[case][region].dice, scored.brats[case][region]["global_dice"]
        # Assert
        if not ref.any() and not pred.any():
            assert ours == 1.0 and math.isnan(theirs), (case, region)  # 2023: 1; 2025: NaN
            continue
        assert ours == pytest.approx(theirs, abs=1e-6), (case, region)
        worst = max(worst, abs(ours - theirs))
    assert worst <= 1e-6


def test_global_hd95_is_the_package_definition_and_a_step_from_fedseg(
    scored: Scored,
) -> None:
    # Prepare
    compared = 0
    for case, region in _pairs(scored, agreement_only=False):
        ref, pred = _masks(scored, case, region)
        # Execute
        ours, theirs = scored.fedseg[case][region].hd95, scored.brats[case][region]["global_hd95"]
        # Assert
        if not ref.any() and not pred.any():
            assert ours == 0.0 and math.isnan(theirs), (case, region)
        elif not ref.any() or not pred.any():
            assert (ours, theirs) == (HD95_EMPTY_MM, BRATS_HD95_INF), (case, region)
        elif not (ref & pred).any():
            assert theirs == BRATS_HD95_INF and 0.0 < ours < HD95_EMPTY_MM, (case, region)
        else:
            assert theirs == pytest.approx(_pooled_border_voxel_hd95(ref, pred), abs=1e-9)
            assert theirs <= ours + HD95_STEP_MM, (case, region, ours, theirs)
            brats = scored.brats[case][region]
            lesions = scored.fedseg[case][region].lesions
            assert lesions is not None
            if lesions.fn + lesions.fp + brats["fn"] + brats["fp"] == 0:  # distances all local
                assert abs(ours - theirs) <= HD95_STEP_MM, (case, region, ours, theirs)
                compared += 1
    assert compared >= 10


def test_lesion_counts_agree_where_the_decompositions_coincide(scored: Scored) -> None:
    # Prepare
    counted = {"tp": 0, "fn": 0, "fp": 0}
    for case, region in _pairs(scored):
        lesions = scored.fedseg[case][region].lesions
        assert lesions is not None
        theirs = scored.brats[case][region]
        # Execute
        ours = {"tp": lesions.tp, "fn": lesions.fn, "fp": lesions.fp}
        # Assert
        assert ours == {k: theirs[k] for k in ours}, (case, region)
        counted = {k: counted[k] + v for k, v in ours.items()}
    assert all(n > 0 for n in counted.values()), counted  # every kind of count is exercised


def test_lesion_dice_agrees_once_brats_2023_penalties_are_added(scored: Scored) -> None:
    # Prepare
    for case, region in _pairs(scored):
        lesions = scored.fedseg[case][region].lesions
        assert lesions is not None
        theirs = scored.brats[case][region]
        n = lesions.tp + lesions.fn + lesions.fp
        # Execute
        if lesions.tp == 0:
            # Assert: nothing matched; 2025 gives 0 (NaN with no lesion on either side).
            assert lesions.dice == (1.0 if n == 0 else 0.0), (case, region)
            assert theirs["lesion_dice"] == 0.0 or (n == 0 and math.isnan(theirs["lesion_dice"]))
            continue
        # Assert: sum of matched lesions' Dice, 2023's mean over n, 2025's mean over tp.
        assert lesions.dice * n == pytest.approx(theirs["lesion_dice"] * lesions.tp, abs=1e-6)
        matched = [d for d in theirs["ref_instance_dice"] if d is not None]
        assert lesions.dice * n == pytest.approx(sum(matched), abs=1e-6), (case, region)


def test_lesion_hd95_over_matched_lesions_agrees_to_a_step(scored: Scored) -> None:
    # Prepare
    compared = 0
    for case, region in _pairs(scored):
        lesions = scored.fedseg[case][region].lesions
        assert lesions is not None
        theirs = scored.brats[case][region]["lesion_hd95"]
        if lesions.tp == 0:
            assert math.isinf(theirs) or math.isnan(theirs), (case, region)
            continue
        # Execute: undo fedseg's HD95_EMPTY_MM entries to get its mean over matched lesions.
        n = lesions.tp + lesions.fn + lesions.fp
        ours = (lesions.hd95 * n - HD95_EMPTY_MM * (lesions.fn + lesions.fp)) / lesions.tp
        # Assert
        assert abs(ours - theirs) <= HD95_STEP_MM, (case, region, ours, theirs)
        compared += 1
    assert compared >= 15


def test_lesion_decompositions_differ_where_the_definitions_do(scored: Scored) -> None:
    # Prepare
    case = DIVERGENCE_CASE
    # Execute
    ours = scored.fedseg[case]["WT"].lesions
    theirs = scored.brats[case]["WT"]
    # Assert
    assert ours is not None
    assert (ours.tp, ours.fn, ours.fp) == (1, 0, 0)
    assert (theirs["tp"], theirs["fn"], theirs["fp"]) == (1, 2, 0)
    assert (theirs["n_ref_instances"], theirs["n_pred_instances"]) == (3, 1)
    # The global scores do not depend on lesions: they still agree.
    assert scored.fedseg[case]["WT"].dice == pytest.approx(theirs["global_dice"], abs=1e-6)
