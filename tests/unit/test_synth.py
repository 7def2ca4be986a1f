"""Tests of the synthetic multi-site federation generator (``fedseg.synth``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedseg import synth

SEED = 7
COUNTS = (3, 2, 2)
PATTERNS = {
    "brats2023": re.compile(r"(BraTS-GLI-\d{5}-000)-(t1n|t1c|t2w|t2f|seg)\.nii\.gz"),
    "brats2021": re.compile(r"(BraTS2021_\d{5})_(t1|t1ce|t2|flair|seg)\.nii\.gz"),
}
SUFFIXES = {
    "brats2023": {"t1n", "t1c", "t2w", "t2f", "seg"},
    "brats2021": {"t1", "t1ce", "t2", "flair", "seg"},
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A small three-site federation written once for the whole module."""
    out = tmp_path_factory.mktemp("fed")
    dirs = synth.generate_federation(out, n_sites=3, cases_per_site=COUNTS, seed=SEED)
    assert dirs == [out / "hospital-a", out / "hospital-b", out / "hospital-c"]
    return out, json.loads((out / "federation.json").read_text())


def _site_cases(out: Path, site: dict[str, Any]) -> list[dict[str, Path]]:
    """File paths of every case of a site, as listed in federation.json."""
    layout = site["profile"]["layout"]
    numbers = [int(re.findall(r"\d{5}", c["id"])[-1]) for c in site["cases"]]
    return [synth.case_files(out / site["name"], layout, n) for n in numbers]


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    return np.asanyarray(img.dataobj), img


def test_layout_naming_and_manifest(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    assert manifest["seed"] == SEED
    assert [len(s["cases"]) for s in manifest["sites"]] == list(COUNTS)
    layouts = [s["profile"]["layout"] for s in manifest["sites"]]
    assert layouts == ["brats2023", "brats2023", "brats2021"]
    ids = [c["id"] for s in manifest["sites"] for c in s["cases"]]
    assert len(set(ids)) == len(ids), "case ids must be unique across the federation"
    for site, layout in zip(manifest["sites"], layouts, strict=True):
        case_dirs = sorted(p.name for p in (out / site["name"]).iterdir())
        assert case_dirs == sorted(c["id"] for c in site["cases"])
        for case_dir in case_dirs:
            files = sorted(p.name for p in (out / site["name"] / case_dir).iterdir())
            matches = [PATTERNS[layout].fullmatch(f) for f in files]
            assert all(matches), files
            assert {m.group(2) for m in matches if m} == SUFFIXES[layout]
            assert {m.group(1) for m in matches if m} == {case_dir}


def test_same_seed_gives_identical_arrays(
    federation: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, manifest = federation
    # Site 0 draws from the same child seed whatever the number of sites.
    again = synth.generate_federation(tmp_path / "a", n_sites=1, cases_per_site=[2], seed=SEED)
    other = synth.generate_federation(tmp_path / "b", n_sites=1, cases_per_site=[2], seed=SEED + 1)
    first = _site_cases(out, manifest["sites"][0])[0]
    for key, path in first.items():
        ref, ref_img = _load(path)
        rerun, rerun_img = _load(again[0] / path.parent.name / path.name)
        assert ref.dtype == rerun.dtype and ref.tobytes() == rerun.tobytes(), key
        assert np.array_equal(ref_img.affine, rerun_img.affine)
        if key != "seg":
            assert not np.array_equal(ref, _load(other[0] / path.parent.name / path.name)[0])


def test_sites_differ_as_real_hospitals(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    codes, zooms, labels = [], [], []
    for site in manifest["sites"]:
        values: set[int] = set()
        for files in _site_cases(out, site):
            seg, seg_img = _load(files["seg"])
            values |= set(np.unique(seg).tolist())
            for key, path in files.items():
                data, img = _load(path)
                assert data.dtype == (np.uint8 if key == "seg" else np.int16)
                assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
                assert np.allclose(img.get_sform(), img.get_qform(), atol=1e-4)
                assert np.allclose(img.affine, seg_img.affine) and data.shape == seg.shape
        codes.append("".join(nib.aff2axcodes(seg_img.affine)))
        zooms.append(seg_img.header.get_zooms())
        labels.append(values)
    assert codes[0] == codes[2] == "RAS" and codes[1] != "RAS"
    assert max(zooms[2]) >= 5.0 and max(zooms[0]) <= 2.5 and max(zooms[1]) <= 2.5
    assert labels[0] == labels[1] == {0, 1, 2, 3}
    assert labels[2] == {0, 1, 2, 4}
    assert manifest["sites"][2]["profile"]["et_label"] == 4


def test_tumour_contrasts_in_written_files(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    for site in manifest["sites"]:
        et = site["profile"]["et_label"]
        for files in _site_cases(out, site):
            seg, seg_img = _load(files["seg"])
            img = {k: _load(p)[0].astype(np.float64) for k, p in files.items() if k != "seg"}
            normal = _mirror_mask(seg > 0, seg_img.affine)
            oedema, enh, nec = seg == 2, seg == et, seg == 1
            assert img["t2f"][oedema].mean() > 1.5 * img["t2f"][normal].mean()
            assert img["t2w"][oedema].mean() > 1.3 * img["t2w"][normal].mean()
            assert img["t1c"][enh].mean() > 1.3 * img["t1c"][normal].mean()
            if nec.sum() >= 5:
                assert img["t1c"][enh].mean() > 2.0 * img["t1c"][nec].mean()
                assert img["t2w"][nec].mean() > img["t2w"][normal].mean()


def _mirror_mask(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxels at the tumour's mirror image across the midline (x -> -x): normal brain."""
    ijk = np.argwhere(mask)
    world = nib.affines.apply_affine(affine, ijk)
    world[:, 0] *= -1
    back = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), world)).astype(int)
    out = np.zeros_like(mask)
    out[tuple(back.T)] = True
    normal: np.ndarray = out & ~mask
    return normal


@pytest.mark.parametrize("site", [0, 1, 2])
def test_tissue_contrasts_match_mri(site: int) -> None:
    profile = synth.default_profiles(3, cases_per_site=4)[site]
    case = synth._render_case(profile, np.random.default_rng(11))

    def mean(mod: str, cls: int) -> float:
        return float(case.images[mod][case.tissue == cls].mean())

    wm, gm, csf = synth.WM, synth.GM, synth.CSF
    assert mean("t1n", wm) > mean("t1n", gm) > mean("t1n", csf)
    assert mean("t2w", csf) > mean("t2w", gm) > mean("t2w", wm)
    assert mean("t2f", csf) < 0.5 * mean("t2f", wm)
    assert mean("t2f", synth.SNFH) > 1.5 * mean("t2f", wm)
    assert mean("t2w", synth.SNFH) > 1.5 * mean("t2w", wm)
    assert mean("t1c", synth.ET) > 1.3 * mean("t1c", wm)


@pytest.mark.parametrize("seed", range(3))
def test_tumour_lies_inside_the_brain(seed: int) -> None:
    profile = synth.default_profiles(3, cases_per_site=4)[seed % 3]
    case = synth._render_case(profile, np.random.default_rng(seed))
    tumour = case.seg > 0
    assert tumour.sum() > 100
    assert not (tumour & ~case.brain).any()
    # From the image alone: the tumour lies under scalp, skull and CSF (>= 11 mm of
    # them; less a voxel's worth of sampling error on the thick-slice site).
    zooms = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    bright = case.images["t1n"] > 0.25 * profile.gain[0] + profile.offset[0]
    head = ndimage.binary_fill_holes(bright)
    depth = ndimage.distance_transform_edt(head, sampling=zooms)
    assert depth[tumour].min() >= 7.0


@pytest.mark.parametrize("seed", range(5))
def test_tumour_parts_are_thick_enough_for_a_3mm_grid(seed: int) -> None:
    # Look at the phantom itself on a fine (1 mm) grid around the tumour centre.
    anatomy = synth._sample_anatomy(np.random.default_rng(seed), (0.5, 0.5))
    t = anatomy.tumour
    axis = np.arange(-48.0, 48.0, 1.0, dtype=np.float32)
    x, y, z = np.meshgrid(*(axis + np.float32(c) for c in t.centre), indexing="ij")
    tissue, _ = synth._classify(anatomy, x, y, z)
    core = (tissue == synth.ET) | (tissue == synth.NETC)
    radius = (core.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    assert 10.0 <= radius <= 25.0
    # Every necrotic point is >= 5 mm (less 1 mm sampling) inside the core's surface.
    necrosis = tissue == synth.NETC
    assert necrosis.any() == t.necrosis
    if t.necrosis:
        assert ndimage.distance_transform_edt(core)[necrosis].min() >= 4.0
        assert ndimage.distance_transform_edt(necrosis).max() >= 4.0
    # Oedema reaches 5..20 mm beyond the core (where the brain lets it).
    beyond = ndimage.distance_transform_edt(~core)[tissue == synth.SNFH]
    assert 4.0 <= beyond.max() <= 21.0


def test_thick_slices_average_tissue_within_the_slab() -> None:
    thick = synth.default_profiles(3, cases_per_site=4)[2]
    thin = dataclasses.replace(thick, spacing=(1.8, 1.8, 2.0))
    anatomy = synth._sample_anatomy(np.random.default_rng(0), thick.size_mix)
    pure = {float(v) for v in synth._CONTRAST[:, 2]}
    mixed = []
    for profile in (thick, thin):
        shape, affine = synth._grid(profile)
        signal, _, _ = synth._tissue_signal(anatomy, profile, shape, affine)
        mixed.append(np.mean([float(v) not in pure for v in np.unique(signal[2])]))
    # Partial volume: thick slabs blend tissues into values no single tissue has.
    assert mixed[0] > 0.5 and mixed[1] == 0.0


def test_world_position_does_not_depend_on_stored_orientation() -> None:
    lps = synth.default_profiles(3, cases_per_site=4)[1]
    assert lps.orientation != "RAS"
    ras = dataclasses.replace(lps, orientation="RAS")
    centroids, voxel = [], max(lps.spacing)
    for profile in (lps, ras):
        _, seg = synth.make_case(profile, rng=np.random.default_rng(3))
        assert "".join(nib.aff2axcodes(seg.affine)) == profile.orientation
        ijk = np.argwhere(np.asanyarray(seg.dataobj) > 0).mean(axis=0)
        centroids.append(nib.affines.apply_affine(seg.affine, ijk))
    assert np.linalg.norm(centroids[0] - centroids[1]) < voxel
    assert abs(centroids[0][0]) > 10.0  # off the midline, so a mirrored affine would show


def test_default_profiles_are_unequal_and_distinct() -> None:
    profiles = synth.default_profiles(7, cases_per_site=12)
    names = [p.name for p in profiles]
    assert len(set(names)) == 7 and names[:3] == ["hospital-a", "hospital-b", "hospital-c"]
    assert [p.n_cases for p in profiles[:3]] == [12, 9, 6]
    assert profiles[3].gain != profiles[0].gain
    assert all(p.n_cases >= 2 for p in synth.default_profiles(3, cases_per_site=2))


def test_nonsense_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_sites"):
        synth.default_profiles(0, cases_per_site=4)
    with pytest.raises(ValueError, match="cases_per_site"):
        synth.generate_federation(tmp_path, n_sites=2, cases_per_site=1)
    with pytest.raises(ValueError, match=r"2\.\.999"):
        synth.generate_federation(tmp_path, n_sites=2, cases_per_site=[4, 1])
    with pytest.raises(ValueError, match="counts for"):
        synth.generate_federation(tmp_path, n_sites=2, cases_per_site=(12, 8, 6))
    with pytest.raises(ValueError, match="orientation"):
        synth.SiteProfile(name="x", orientation="RAR")
    with pytest.raises(ValueError, match="et_label"):
        synth.SiteProfile(name="x", et_label=5)
    (tmp_path / "hospital-a").mkdir()
    (tmp_path / "hospital-a" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth.generate_federation(tmp_path, n_sites=1, cases_per_site=[2])
    assert not list(tmp_path.glob("*.json"))
