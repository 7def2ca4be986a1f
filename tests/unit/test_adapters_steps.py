"""Unit tests of the data adapters' single steps on tiny synthetic volumes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import ijk_array, image_from_ijk, ras_affine
from data_adapters.grid import resample_to_grid, target_grid
from data_adapters.harmonise import foreground_mask, reorient_to_ras, zscore
from data_adapters.labels import remap_labels
from data_adapters.readers import read_image
from data_adapters.writers import write_nifti


def _affine(columns: list[list[float]], origin: list[float]) -> np.ndarray:
    """Voxel-to-RAS affine whose column c is where voxel axis c points (mm per voxel)."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=float).T
    affine[:3, 3] = origin
    return affine


# nibabel (RAS) affines of images stored in other orientations.
ORIENTED = {
    "LPS": _affine([[-1.0, 0, 0], [0, -1.2, 0], [0, 0, 2.0]], [30.0, 40.0, -10.0]),
    "LAS": _affine([[-2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.5]], [12.0, -20.0, 5.0]),
    # i runs Inferior, j Right, k Posterior: a permutation plus flips.
    "IRP": _affine([[0, 0, -1.5], [1.0, 0, 0], [0, -2.0, 0]], [-7.0, 15.0, 22.0]),
}


# --- labels ---------------------------------------------------------------------------


def test_brats2021_label_4_becomes_3() -> None:
    source = np.array([[[0, 1], [2, 4]], [[4, 4], [0, 2]]], dtype=np.int16)
    out = remap_labels(source, "brats2021")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.where(source == 4, 3, source))


def test_unknown_label_value_names_file_and_value() -> None:
    source = np.array([0, 1, 5, 2], dtype=np.uint8)
    with pytest.raises(DataError) as caught:
        remap_labels(source, "brats2021", path="site/case_seg.nii.gz")
    message = str(caught.value)
    assert message.startswith("site/case_seg.nii.gz: ")
    assert "[5]" in message and "\n" not in message


def test_brats2023_rejects_4_and_fractional_labels() -> None:
    with pytest.raises(DataError, match=r"\[4\]"):
        remap_labels(np.array([0, 4]), "brats2023")
    with pytest.raises(DataError, match="whole numbers"):
        remap_labels(np.array([0.0, 1.5]), "brats2023")


# --- reading and reorienting ------------------------------------------------------------


@pytest.mark.parametrize("codes", sorted(ORIENTED))
def test_reorient_to_ras_moves_no_voxel_in_world(tmp_path: Path, codes: str) -> None:
    affine = ORIENTED[codes]
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # every value unique
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    image = read_image(path)
    np.testing.assert_allclose(ras_affine(image), affine, atol=1e-5)  # LPS <-> RAS exact
    out, step = reorient_to_ras(image)
    assert step.params == {"from": codes, "to": "RAS"}
    assert "".join(nib.aff2axcodes(ras_affine(out))) == "RAS"

    after = ijk_array(out)
    for value in (0.0, 17.0, 101.0, 209.0):
        before_world = affine @ [*np.argwhere(data == value)[0], 1]
        after_world = ras_affine(out) @ [*np.argwhere(after == value)[0], 1]
        np.testing.assert_allclose(after_world, before_world, atol=1e-4)

    # What the writer puts on disk says the same thing to nibabel.
    written = tmp_path / "ras.nii.gz"
    write_nifti(out, written, dtype=np.float32)
    reloaded = nib.load(written)
    assert "".join(nib.aff2axcodes(reloaded.affine)) == "RAS"
    np.testing.assert_allclose(reloaded.affine, ras_affine(out), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(reloaded.dataobj), after)


def test_truncated_gzip_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "case-t1n.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_truncated_and_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    raw = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), raw)
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_image(raw)
    # A whole gzip stream around a short NIfTI is caught by the length check too.
    short_gz = tmp_path / "short.nii.gz"
    short_gz.write_bytes(gzip.compress(raw.read_bytes()))
    with pytest.raises(DataError, match="truncated"):
        read_image(short_gz)
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    with pytest.raises(DataError, match="empty"):
        read_image(empty)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.nii.gz")
    not_nifti = tmp_path / "text.nii"
    not_nifti.write_text("hello" * 100)
    with pytest.raises(DataError, match="NIfTI"):
        read_image(not_nifti)


# --- mask, grid, resampling, normalisation ------------------------------------------------


def _ball(shape: tuple[int, int, int], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return distance < radius


def test_foreground_mask_keeps_largest_component_and_fills_holes() -> None:
    shape = (30, 30, 30)
    head = _ball(shape, (15, 15, 15), 10) & ~_ball(shape, (15, 15, 15), 3)  # hollow core
    speck = _ball(shape, (2, 2, 2), 1.5)  # a separate bright blob outside
    data = np.where(head | speck, 100.0, 0.0).astype(np.float32)
    images = [image_from_ijk(data * scale, ORIENTED["LAS"]) for scale in (1.0, 7.0)]
    mask, step = foreground_mask(images)
    out = ijk_array(mask).astype(bool)
    np.testing.assert_array_equal(out, _ball(shape, (15, 15, 15), 10))
    assert step.params["voxels"] == int(out.sum())


def test_resample_keeps_blob_centroid_and_integer_labels() -> None:
    shape = (40, 34, 22)
    affine = ORIENTED["LPS"]  # 1 x 1.2 x 2 mm, stored LPS
    labels = np.zeros(shape, np.uint8)
    labels[_ball(shape, (20, 15, 11), 6)] = 2
    labels[_ball(shape, (20, 15, 11), 3)] = 3
    image = image_from_ijk(labels, affine)
    everything = image_from_ijk(np.ones(shape, np.uint8), affine)
    grid, _ = target_grid(everything, spacing=(3.0, 3.0, 3.0), margin_mm=2.0)
    out, step = resample_to_grid(image, grid, interpolator="nearest")
    assert step.params["interpolator"] == "nearest"

    result = ijk_array(out)
    assert np.issubdtype(result.dtype, np.integer)
    assert set(np.unique(result).tolist()) == {0, 2, 3}

    def world_centroid(array: np.ndarray, aff: np.ndarray) -> np.ndarray:
        ijk = np.argwhere(array > 0)
        return (aff[:3, :3] @ ijk.mean(axis=0)) + aff[:3, 3]

    before = world_centroid(labels, affine)
    after = world_centroid(result, ras_affine(out))
    assert np.linalg.norm(after - before) < 1.5  # half a 3 mm voxel
    assert "".join(nib.aff2axcodes(ras_affine(out))) == "RAS"
    np.testing.assert_allclose(out.GetSpacing(), (3.0, 3.0, 3.0))


def test_target_grid_covers_mask_in_world_with_margin() -> None:
    shape = (20, 20, 20)
    mask = image_from_ijk(_ball(shape, (8, 12, 10), 5).astype(np.uint8), ORIENTED["IRP"])
    grid, _ = target_grid(mask, spacing=(2.0, 2.0, 2.0), margin_mm=4.0)
    reference = sitk.Image(list(grid.size), sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    aff = ras_affine(reference)
    low = aff[:3, 3] - 1.0  # outer face of the first voxel
    high = aff[:3, 3] + (np.array(grid.size) - 1) * 2.0 + 1.0
    points = ORIENTED["IRP"][:3, :3] @ np.argwhere(ijk_array(mask)).T + ORIENTED["IRP"][:3, 3:]
    assert np.all(points.min(axis=1) - 4.0 >= low - 1e-6)
    assert np.all(points.max(axis=1) + 4.0 <= high + 1e-6)


def test_zscore_inside_mask_and_zero_outside() -> None:
    rng = np.random.default_rng(1)
    shape = (16, 18, 14)
    data = (rng.normal(300.0, 40.0, shape) + 1000.0 * ~_ball(shape, (8, 9, 7), 6)).astype(
        np.float32
    )
    inside = _ball(shape, (8, 9, 7), 6)
    image = image_from_ijk(data, ORIENTED["LAS"])
    mask = image_from_ijk(inside.astype(np.uint8), ORIENTED["LAS"])
    out, step = zscore(image, mask)
    result = ijk_array(out)
    assert result.dtype == np.float32
    assert abs(float(result[inside].mean())) < 1e-5
    assert abs(float(result[inside].std()) - 1.0) < 1e-5
    assert np.all(result[~inside] == 0.0)
    assert step.params["mean"] == pytest.approx(float(data[inside].mean()), rel=1e-6)

    flat = image_from_ijk(np.full(shape, 5.0, np.float32), ORIENTED["LAS"])
    with pytest.raises(DataError, match="constant"):
        zscore(flat, mask)
