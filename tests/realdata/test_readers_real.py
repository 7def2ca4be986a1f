"""Readers on nibabel's own test images: LAS, oblique, big-endian, edited sform/qform, shear."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from data_adapters.convert import convert_image
from data_adapters.geometry import axcodes, ijk_array, ras_affine
from data_adapters.readers import GEOMETRY_NOTE_KEY, GeometryWarning, read_image, read_volume

DATA = Path(data_path)


def nibabel_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"nibabel's test file {name} is not installed")
    return path


@pytest.mark.parametrize(
    ("name", "codes", "endian"),
    [
        ("anatomical.nii", "LAS", ">"),  # big-endian, x flipped
        ("reoriented_anat_moved.nii", "RAS", ">"),  # big-endian float
        ("standard.nii.gz", "RAS", "<"),  # sform only (code 2)
    ],
)
def test_readers_real_nibabel_images_keep_affine_and_voxels(
    name: str, codes: str, endian: str
) -> None:
    path = nibabel_file(name)
    source = nib.load(path)
    assert source.header.endianness == endian
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)  # consistent headers: no warning
        image = read_image(path)
    assert axcodes(image) == codes == "".join(nib.aff2axcodes(source.affine))
    assert np.allclose(ras_affine(image), source.affine, atol=1e-4)
    assert np.array_equal(ijk_array(image), np.asanyarray(source.dataobj))


def test_readers_real_oblique_4d_volume(tmp_path: Path) -> None:
    path = nibabel_file("example4d.nii.gz")  # oblique, LAS, 2 volumes
    source = nib.load(path)
    assert not np.allclose(source.affine[:3, :3], np.diag(np.diag(source.affine[:3, :3])))
    volume = read_volume(path, 1)
    assert np.allclose(ras_affine(volume), source.affine, atol=1e-4)
    assert np.array_equal(ijk_array(volume), np.asanyarray(source.dataobj)[..., 1])
    assert axcodes(volume) == "LAS"


def test_readers_real_sform_qform_disagreement_warns_and_uses_sform(tmp_path: Path) -> None:
    source = nib.load(nibabel_file("anatomical.nii"))
    edited = nib.Nifti1Image(np.asanyarray(source.dataobj), None, source.header.copy())
    qform = source.affine.copy()
    qform[:3, 3] += [0.0, 0.3, 0.0]  # 0.3 mm apart: over the 0.1 mm threshold
    edited.set_qform(qform, code=1)
    edited.set_sform(source.affine, code=2)
    nib.save(edited, tmp_path / "disagree.nii")
    with pytest.warns(GeometryWarning, match=r"disagree by up to 0\.30 mm / 0\.00 degrees"):
        image = read_image(tmp_path / "disagree.nii")
    assert np.allclose(ras_affine(image), source.affine, atol=1e-4)


def test_readers_real_sheared_affine_does_not_crash(tmp_path: Path) -> None:
    source = nib.load(nibabel_file("anatomical.nii"))
    sheared = source.affine.copy()
    sheared[0, 2] = 0.3  # slices lean along x: not representable without shear
    edited = nib.Nifti1Image(np.asanyarray(source.dataobj), None, source.header.copy())
    edited.set_sform(sheared, code=1)
    edited.set_qform(None, code=0)
    nib.save(edited, tmp_path / "sheared.nii.gz")
    with pytest.warns(GeometryWarning, match="orthonormalised by polar decomposition"):
        image = read_image(tmp_path / "sheared.nii.gz")
    assert "orthonormalised" in image.GetMetaData(GEOMETRY_NOTE_KEY)
    assert np.allclose(ras_affine(image)[:3, 3], sheared[:3, 3])
    with pytest.warns(GeometryWarning):
        result = convert_image(tmp_path / "sheared.nii.gz", tmp_path / "fixed.nii.gz")
    written = nib.load(result.output).affine[:3, :3]
    unit = written / np.linalg.norm(written, axis=0)
    assert np.allclose(unit.T @ unit, np.eye(3), atol=1e-5)
