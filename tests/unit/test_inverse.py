"""Canonical label maps go back onto each case's original grid (data_adapters.inverse).

Every round trip uses the real path: a raw BraTS 2023 case written in tmp_path,
``harmonise_case`` to 1 mm RAS, then ``to_original_grid`` with the geometry the
manifest records.  Measured Dice (WT / TC / ET) of original vs round-tripped labels:

===========================================  ======  ======  ======
original grid                                 WT      TC      ET
===========================================  ======  ======  ======
1 mm, LPS                                     1.0     1.0     1.0
1 mm, LPS, oblique (15 deg about R)           0.9969  0.9941  0.9911
1 mm, LPS, oblique (15 deg about (1, 2, 3))   0.9958  0.9933  0.9902
1 x 1 x 5 mm, RAS                             1.0     1.0     1.0
1 x 1 x 5 mm, LPS, oblique (15 deg, (1,2,3))  0.9971  0.9958  0.9930
===========================================  ======  ======  ======

Axis-aligned grids are exact: the canonical grid lies on the original voxel
lattice (whole-voxel crop and pad), so nearest neighbour reproduces every voxel.
On oblique grids each of the two nearest-neighbour resamplings moves boundary
voxels; the loss grows with the surface-to-volume ratio (a thinner 5 mm ET rim of
3.7 ml measured 0.987 at 1 mm oblique).  The tumour here is realistic in size:
oedema radius 25 mm, enhancing rim 8-15 mm (12 ml), necrotic core 8 mm.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk

from data_adapters.geometry import ijk_array, image_from_ijk, ras_affine
from data_adapters.harmonise import HarmonisedCase, harmonise_case
from data_adapters.inverse import reference_image, to_original_grid, write_on_original_grid
from data_adapters.layouts import list_cases
from tests.unit.test_harmonise_phantom import (
    Scan,
    load_nifti,
    rotation,
    world_points,
    write_raw_case,
)

REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
ONE_MM = (1.0, 1.0, 1.0)
THICK = (1.0, 1.0, 5.0)
TILT = rotation(15, (1, 0, 0))  # an oblique axial acquisition, tilted about R
OBLIQUE = rotation(15, (1, 2, 3))

# name -> (how the raw case is stored, lower bound on Dice per region)
ORIGINALS = {
    "lps_1mm": (Scan(shape=(100, 120, 94), spacing=ONE_MM, codes="LPS", noise=0.0), 1.0),
    "oblique_1mm": (
        Scan(shape=(100, 120, 94), spacing=ONE_MM, codes="LPS", rotate=TILT, noise=0.0),
        0.99,
    ),
    "thick_1x1x5": (Scan(shape=(100, 120, 19), spacing=THICK, noise=0.0), 0.999),
    "thick_oblique": (
        Scan(shape=(100, 120, 19), spacing=THICK, codes="LPS", rotate=OBLIQUE, noise=0.0),
        0.99,
    ),
}


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def region_dice(x: npt.NDArray[np.generic], y: npt.NDArray[np.generic]) -> dict[str, float]:
    return {name: dice(np.isin(x, v), np.isin(y, v)) for name, v in REGIONS.items()}


def harmonised(root: Path, scan: Scan) -> tuple[HarmonisedCase, Path]:
    folder = write_raw_case(root, "case", scan)
    (raw_case,) = list_cases(root, "brats2023")
    return harmonise_case(raw_case, target_spacing=ONE_MM), folder / "case-seg.nii.gz"


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_round_trip_recovers_original_labels(tmp_path: Path, name: str) -> None:
    scan, bound = ORIGINALS[name]
    case, seg_path = harmonised(tmp_path, scan)
    assert case.seg is not None
    assert "".join(nib.aff2axcodes(ras_affine(case.seg))) == "RAS"  # canonical really is RAS
    original = load_nifti(seg_path)

    back = to_original_grid(case.seg, case.original_geometry)
    assert back.GetSize() == original.shape and back.GetPixelID() == case.seg.GetPixelID()
    np.testing.assert_allclose(ras_affine(back), original.affine, atol=1e-4)
    scores = region_dice(ijk_array(back), np.asarray(original.dataobj))
    assert min(scores.values()) >= bound, scores

    # The manifest's JSON record gives the same answer, and the file carries the original affine.
    path = write_on_original_grid(
        case.seg, case.original_geometry.to_json(), tmp_path / "pred.nii.gz"
    )
    written = load_nifti(path)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj), ijk_array(back))


def test_linear_option_puts_probabilities_back_smoothly(tmp_path: Path) -> None:
    scan = ORIGINALS["oblique_1mm"][0]
    case, seg_path = harmonised(tmp_path, scan)
    centre = np.array([12.0, -8.0, 6.0])

    def blob(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        values: npt.NDArray[np.float64] = np.exp(
            -np.sum((points - centre) ** 2, axis=-1) / (2 * 12.0**2)
        )
        return values

    canonical_affine = ras_affine(case.mask)
    size = case.mask.GetSize()
    probability = blob(world_points((size[0], size[1], size[2]), canonical_affine))
    prob_image = image_from_ijk(probability.astype(np.float32), canonical_affine)

    back = to_original_grid(prob_image, case.original_geometry, interpolator="linear")
    assert back.GetPixelID() == sitk.sitkFloat32
    original = load_nifti(seg_path)
    nx, ny, nz = original.shape
    expected = blob(world_points((nx, ny, nz), original.affine))
    near = expected > 0.05  # well inside the canonical grid
    error = np.abs(ijk_array(back) - expected)[near]
    assert error.max() < 0.01  # linear interpolation error of a 12 mm Gaussian at 1 mm


def test_refuses_mismatched_or_inconsistent_geometry(tmp_path: Path) -> None:
    label = image_from_ijk(np.ones((8, 8, 8), np.uint8), np.eye(4))
    far = {"shape": [8, 8, 8], "spacing": [1.0] * 3, "origin": [500.0, 0.0, 0.0],
           "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}  # fmt: skip
    with pytest.raises(ValueError, match="share no world region"):
        to_original_grid(label, far)
    # affine_ras says RAS; origin / direction (LPS) say the x axis is flipped.
    flipped = {**far, "origin": [0.0, 0.0, 0.0], "affine_ras": np.eye(4).tolist()}
    with pytest.raises(ValueError, match="inconsistent"):
        reference_image(flipped)
    with pytest.raises(ValueError, match="not an original_geometry"):
        to_original_grid(label, {"shape": [8, 8, 8]})
    with pytest.raises(ValueError, match="interpolator"):
        to_original_grid(label, far, interpolator="cubic")
