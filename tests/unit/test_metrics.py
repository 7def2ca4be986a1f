"""Regions and per-case metrics: the numbers evaluators rely on."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.typing import NDArray
from typer.testing import CliRunner

import evaluation.lesions
from evaluation.metrics import HD95_EMPTY_MM, case_scores, region_scores
from evaluation.regions import region_masks, regions_to_labels
from fedseg.cli import app


def test_regions_follow_brats_definitions() -> None:
    labels = np.array([0, 1, 2, 3])
    wt, tc, et = region_masks(labels)
    assert wt.tolist() == [False, True, True, True]
    assert tc.tolist() == [False, True, False, True]
    assert et.tolist() == [False, False, False, True]


def test_regions_to_labels_enforces_nesting_and_round_trips() -> None:
    labels = np.array([0, 1, 2, 3, 2, 1])
    assert regions_to_labels(region_masks(labels)).tolist() == labels.tolist()
    # ET predicted outside WT is not tumour; TC outside WT neither.
    masks = np.array([[0, 1], [1, 1], [1, 0]], dtype=bool)
    assert regions_to_labels(masks).tolist() == [0, 1]


def test_empty_mask_policy() -> None:
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    lesion = empty.copy()
    lesion[2:4, 2:4, 2:4] = 3
    both_empty = region_scores(empty, empty, spacing=(1, 1, 1))
    assert both_empty["ET"].dice == 1.0 and both_empty["ET"].hd95 == 0.0
    missed = region_scores(empty, lesion, spacing=(1, 1, 1))
    assert missed["ET"].dice == 0.0 and missed["ET"].hd95 == HD95_EMPTY_MM
    false_alarm = region_scores(lesion, empty, spacing=(1, 1, 1))
    assert false_alarm["WT"].dice == 0.0 and false_alarm["WT"].hd95 == HD95_EMPTY_MM


def test_dice_value_and_hd95_in_millimetres_with_anisotropic_spacing() -> None:
    reference = np.zeros((20, 20, 20), dtype=np.uint8)
    prediction = reference.copy()
    reference[5:10, 5:15, 5:15] = 2
    prediction[7:12, 5:15, 5:15] = 2  # shifted by 2 voxels along the 3 mm axis
    scores = region_scores(prediction, reference, spacing=(3.0, 1.0, 1.0))
    assert scores["WT"].dice == pytest.approx(2 * 3 / (5 + 5))
    assert scores["WT"].hd95 == pytest.approx(6.0)
    assert scores["ET"].dice == 1.0  # no ET anywhere


def test_sensitivity_specificity_and_volumes_by_hand() -> None:
    reference = np.zeros((10, 10, 10), dtype=np.uint8)
    prediction = reference.copy()
    reference[0:4, 0:5, 0:5] = 3  # 100 voxels
    prediction[2:6, 0:5, 0:5] = 3  # 100 voxels, 50 of them right
    scores = case_scores(prediction, reference, spacing=(2.0, 1.0, 0.5))
    et = scores["ET"]
    assert et.dice == pytest.approx(0.5)
    assert et.sensitivity == pytest.approx(50 / 100)
    assert et.specificity == pytest.approx((900 - 50) / 900)  # negatives: the whole grid
    assert et.reference_ml == pytest.approx(100 * 1.0 / 1000)  # voxel = 1 mm^3
    assert et.hd95 == pytest.approx(4.0)  # two voxels along the 2 mm axis
    assert scores["WT"].as_dict() == et.as_dict()  # ET only: WT and TC are the same mask
    assert scores["ET"].lesions is None and "lesion_dice" not in et.as_dict()


def test_sensitivity_conventions_with_an_empty_reference() -> None:
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = 2
    both_empty = case_scores(empty, empty, spacing=(1, 1, 1))["WT"]
    assert (both_empty.sensitivity, both_empty.specificity) == (1.0, 1.0)
    false_alarm = case_scores(blob, empty, spacing=(1, 1, 1))["WT"]
    assert false_alarm.sensitivity == 0.0  # BraTS: TP / (TP + FN + eps) = 0
    assert false_alarm.specificity == pytest.approx((216 - 8) / 216)
    missed = case_scores(empty, blob, spacing=(1, 1, 1))["WT"]
    assert (missed.sensitivity, missed.specificity) == (0.0, 1.0)


def test_region_scores_and_case_scores_agree_and_only_case_scores_does_lesions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_lesions(*args: object, **kwargs: object) -> None:
        raise AssertionError("lesion-wise scoring must be opt-in")

    monkeypatch.setattr(evaluation.lesions, "lesion_scores", no_lesions)
    reference = np.zeros((16, 16, 16), dtype=np.uint8)
    reference[3:9, 3:9, 3:9] = 2
    reference[5:7, 5:7, 5:7] = 3
    prediction = np.roll(reference, 1, axis=1)
    fast = region_scores(prediction, reference, spacing=(1.0, 1.2, 2.0))
    full = case_scores(prediction, reference, spacing=(1.0, 1.2, 2.0))
    for region, score in fast.items():
        assert (score.dice, score.hd95) == (full[region].dice, full[region].hd95)
    with pytest.raises(AssertionError, match="opt-in"):
        case_scores(prediction, reference, spacing=(1.0, 1.2, 2.0), lesion_wise=True)


def test_hd95_weighs_surface_by_area_as_brats() -> None:
    """The 95th percentile is of surface area: a 1-voxel blob 20 mm from a 10^3 cube holds
    6 of 606 mm^2 (1 %) and moves nothing; a false layer on one face puts 100 of the
    predicted 640 mm^2 (16 %) 1 mm off, so HD95 is 1 mm. (The BraTS regression anchor in
    test_lesions.py is what tells this apart from counting boundary voxels.)"""
    reference = np.zeros((40, 14, 14), dtype=np.uint8)
    reference[2:12, 2:12, 2:12] = 2
    prediction = reference.copy()
    assert region_scores(prediction, reference, spacing=(1, 1, 1))["WT"].hd95 == 0.0
    prediction[32, 6, 6] = 2
    assert region_scores(prediction, reference, spacing=(1, 1, 1))["WT"].hd95 == 0.0
    prediction[12, 2:12, 2:12] = 2
    assert region_scores(prediction, reference, spacing=(1, 1, 1))["WT"].hd95 == 1.0


# --------------------------------------------------------------------------- fedseg metrics


def _save(path: Path, labels: NDArray[np.uint8], spacing: float = 2.0) -> Path:
    nib.save(nib.Nifti1Image(labels, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["metrics", *args])
    return result.exit_code, result.output


def test_metrics_command_prints_json(tmp_path: Path) -> None:
    reference = np.zeros((10, 10, 10), dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    ref = _save(tmp_path / "ref.nii.gz", reference)
    pred = _save(tmp_path / "pred.nii.gz", reference)
    code, output = _run("--reference", str(ref), "--prediction", str(pred), "--json")
    assert code == 0, output
    scores = json.loads(output)
    assert list(scores) == ["WT", "TC", "ET"]
    assert scores["TC"] == {
        "dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
        "reference_ml": pytest.approx(64 * 8 / 1000), "prediction_ml": pytest.approx(0.512),
    }  # fmt: skip


def test_metrics_command_prints_a_table_with_lesion_wise_scores(tmp_path: Path) -> None:
    reference = np.zeros((20, 20, 20), dtype=np.uint8)
    reference[2:8, 2:8, 2:8] = 2
    prediction = reference.copy()
    prediction[14:18, 14:18, 14:18] = 2  # 64 voxels x 8 mm^3: a false lesion
    ref = _save(tmp_path / "ref.nii.gz", reference)
    pred = _save(tmp_path / "pred.nii.gz", prediction)
    code, output = _run("--reference", str(ref), "--prediction", str(pred), "--lesion-wise")
    assert code == 0, output
    header, *rows = output.strip().splitlines()
    assert "HD95 mm" in header and "Sens" in header and "LW Dice" in header
    wt = rows[0].split()
    assert wt[0] == "WT" and len(rows) == 3
    assert wt[wt.index("|") + 1 :] == ["0.5000", "187.00", "1", "0", "1"]
    code, output = _run("--reference", str(ref), "--prediction", str(pred), "--json")
    assert "lesion_dice" not in output  # opt-in only


def test_metrics_command_maps_brats2021_labels(tmp_path: Path) -> None:
    reference = np.zeros((12, 12, 12), dtype=np.uint8)
    reference[2:10, 2:10, 2:10] = 2
    reference[4:8, 4:8, 4:8] = 4  # BraTS 2021 ET: 64 voxels
    prediction = reference.copy()
    prediction[4:6, 4:8, 4:8] = 1  # half of ET called necrosis
    ref = _save(tmp_path / "ref.nii.gz", reference)
    pred = _save(tmp_path / "pred.nii.gz", prediction)
    args = ("--reference", str(ref), "--prediction", str(pred), "--json")
    code, output = _run(*args, "--labels", "brats2021")
    assert code == 0, output
    scores = json.loads(output)
    assert scores["ET"]["dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert scores["ET"]["sensitivity"] == pytest.approx(0.5)
    assert scores["TC"]["dice"] == 1.0 and scores["WT"]["dice"] == 1.0
    code, output = _run(*args)  # default brats2023: 4 is not a label
    assert code == 1
    assert len(output.strip().splitlines()) == 1
    assert "ref.nii.gz" in output and "[4]" in output and "Traceback" not in output


def test_metrics_command_maps_msd_labels(tmp_path: Path) -> None:
    reference = np.zeros((12, 12, 12), dtype=np.uint8)
    reference[2:10, 2:10, 2:10] = 1  # MSD 1: oedema
    reference[4:8, 4:8, 4:8] = 2  # MSD 2: non-enhancing tumour, in TC
    prediction = reference.copy()
    prediction[4:8, 4:8, 4:8] = 1  # core called oedema: TC missed, WT right
    ref = _save(tmp_path / "ref.nii.gz", reference)
    pred = _save(tmp_path / "pred.nii.gz", prediction)
    code, output = _run(
        "--reference", str(ref), "--prediction", str(pred), "--json", "--labels", "msd"
    )
    assert code == 0, output
    scores = json.loads(output)
    assert (scores["WT"]["dice"], scores["TC"]["dice"]) == (1.0, 0.0)
    assert scores["TC"]["hd95"] == HD95_EMPTY_MM and scores["ET"]["dice"] == 1.0


def test_metrics_command_refuses_other_grids_and_unknown_schemes(tmp_path: Path) -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    ref = _save(tmp_path / "ref.nii.gz", labels)
    pred = _save(tmp_path / "moved.nii.gz", labels, spacing=1.0)
    code, output = _run("--reference", str(ref), "--prediction", str(pred))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "moved.nii.gz" in output and "grid" in output
    code, output = _run("--reference", str(ref), "--prediction", str(ref), "--labels", "nope")
    assert code == 1 and "nope" in output and "brats2021" in output


def test_metrics_command_refuses_non_canonical_labels(tmp_path: Path) -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1, 1, 1] = 4
    path = _save(tmp_path / "brats2021.nii.gz", labels)
    code, output = _run("--reference", str(path), "--prediction", str(path))
    assert code == 1
    assert "brats2021.nii.gz" in output and "[4]" in output
    assert "Traceback" not in output
