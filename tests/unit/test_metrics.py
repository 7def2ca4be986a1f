"""Regions and per-case metrics: the numbers evaluators rely on."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.metrics import HD95_EMPTY_MM, region_scores
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


def test_metrics_command_prints_json(tmp_path: pytest.TempPathFactory) -> None:
    reference = np.zeros((10, 10, 10), dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ref_path, pred_path = tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz"  # type: ignore[operator]
    nib.save(nib.Nifti1Image(reference, affine), ref_path)
    nib.save(nib.Nifti1Image(reference, affine), pred_path)
    result = CliRunner().invoke(
        app, ["metrics", "--reference", str(ref_path), "--prediction", str(pred_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"TC": {"dice": 1.0, "hd95": 0.0}' in result.output


def test_metrics_command_refuses_non_canonical_labels(tmp_path: pytest.TempPathFactory) -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1, 1, 1] = 4
    path = tmp_path / "brats2021.nii.gz"  # type: ignore[operator]
    nib.save(nib.Nifti1Image(labels, np.eye(4)), path)
    result = CliRunner().invoke(
        app, ["metrics", "--reference", str(path), "--prediction", str(path)]
    )
    assert result.exit_code == 1
    assert "brats2021.nii.gz" in result.output and "[4]" in result.output
    assert "Traceback" not in result.output
