"""Tests of the synthetic multi-site federation generator (``fedseg.synth``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from data_adapters.layouts import detect_layout, scan_cases
from fedseg import synth
from fedseg.synth import dicom_study, phantom, render

SEED = 7
COUNTS = (3, 2, 2, 2, 2)
LAYOUT_ORDER = ["brats2023", "dicom-study", "brats2021", "msd", "nnunet-raw"]
PATTERNS = {
    "brats2023": re.compile(r"(BraTS-GLI-\d{5}-000)-(t1n|t1c|t2w|t2f|seg)\.nii\.gz"),
    "brats2021": re.compile(r"(BraTS2021_\d{5})_(t1|t1ce|t2|flair|seg)\.nii\.gz"),
}
SUFFIXES = {
    "brats2023": {"t1n", "t1c", "t2w", "t2f", "seg"},
    "brats2021": {"t1", "t1ce", "t2", "flair", "seg"},
}
SERIES_FOLDERS = {"1_3_plane_loc", "2_ax_t1_se", "3_ax_t2_fse", "4_ax_t2_flair", "5_ax_t1_post_gad"}
MSD_NAMES = {"FLAIR": "t2f", "T1w": "t1n", "t1gd": "t1c", "T2w": "t2w"}
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A small five-site federation (one site per layout) written once for the module."""
    out = tmp_path_factory.mktemp("fed")
    dirs = synth.generate_federation(out, n_sites=5, cases_per_site=COUNTS, seed=SEED)
    assert dirs == [out / f"hospital-{s}" for s in "abcde"]
    return out, json.loads((out / "federation.json").read_text())


def _number(layout: str, case_id: str) -> int:
    """The federation-wide case number behind a case id (ids differ per layout)."""
    return next(n for n in range(1, 10_000) if synth.case_name(layout, n) == case_id)


def _site_cases(out: Path, site: dict[str, Any]) -> list[dict[str, Path]]:
    """File paths of every case of a site, as listed in federation.json."""
    layout = site["profile"]["layout"]
    return [
        synth.case_files(out / site["name"], layout, _number(layout, c["id"]))
        for c in site["cases"]
    ]


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    return np.asanyarray(img.dataobj), img


def _dicom_series(folder: Path, *, pixels: bool = True) -> list[pydicom.Dataset]:
    """A series' files, ordered by position along the slice normal."""
    slices = [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in folder.glob("*.dcm")]
    row, col = np.array(slices[0].ImageOrientationPatient, dtype=float).reshape(2, 3)
    normal = np.cross(row, col)
    return sorted(slices, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))


def _load_case(files: dict[str, Path], layout: str) -> dict[str, np.ndarray]:
    """Every modality of a case as an array in the label map's voxel order, whatever the layout."""
    if layout == "msd":
        volumes, _ = _load(files["t1n"])
        info = json.loads((files["t1n"].parents[1] / "dataset.json").read_text())
        return {MSD_NAMES[name]: volumes[..., int(i)] for i, name in info["modality"].items()}
    if layout == "dicom-study":
        arrays = {}
        for modality in synth.MODALITIES:
            series = _dicom_series(files[modality])
            stack = [
                d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in series
            ]
            arrays[modality] = np.stack(stack, axis=-1)
        return arrays
    return {m: _load(files[m])[0] for m in synth.MODALITIES}


def test_layout_naming_and_manifest(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    assert manifest["seed"] == SEED
    assert [len(s["cases"]) for s in manifest["sites"]] == list(COUNTS)
    layouts = [s["profile"]["layout"] for s in manifest["sites"]]
    assert layouts == LAYOUT_ORDER
    ids = [c["id"] for s in manifest["sites"] for c in s["cases"]]
    assert len(set(ids)) == len(ids), "case ids must be unique across the federation"
    for site, layout in zip(manifest["sites"], layouts, strict=True):
        site_dir, case_ids = out / site["name"], sorted(c["id"] for c in site["cases"])
        entries = sorted(p.name for p in site_dir.iterdir())
        if layout in ("msd", "nnunet-raw"):
            assert entries == ["dataset.json", "imagesTr", "labelsTr"]
            channels = [""] if layout == "msd" else [f"_{c:04d}" for c in range(4)]
            images = {f"{c}{ch}.nii.gz" for c in case_ids for ch in channels}
            assert {p.name for p in (site_dir / "imagesTr").iterdir()} == images
            labels = sorted(p.name for p in (site_dir / "labelsTr").iterdir())
            assert labels == [f"{c}.nii.gz" for c in case_ids]
            continue
        assert entries == case_ids
        for case_dir in case_ids:
            files = sorted(p.name for p in (site_dir / case_dir).iterdir())
            if layout == "dicom-study":
                assert set(files) == SERIES_FOLDERS | {"seg.nii.gz"}
                slices = [p.name for p in (site_dir / case_dir / "2_ax_t1_se").iterdir()]
                assert all(re.fullmatch(r"IM_\d{4}\.dcm", f) for f in slices)
                continue
            matches = [PATTERNS[layout].fullmatch(f) for f in files]
            assert all(matches), files
            assert {m.group(2) for m in matches if m} == SUFFIXES[layout]
            assert {m.group(1) for m in matches if m} == {case_dir}


def test_same_seed_gives_identical_arrays(
    federation: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, manifest = federation
    # Sites 0 and 1 draw from the same child seeds whatever the number of sites.
    again = synth.generate_federation(tmp_path / "a", n_sites=2, cases_per_site=[2, 2], seed=SEED)
    other = synth.generate_federation(tmp_path / "b", n_sites=1, cases_per_site=[2], seed=SEED + 1)
    first = _site_cases(out, manifest["sites"][0])[0]
    for key, path in first.items():
        ref, ref_img = _load(path)
        rerun, rerun_img = _load(again[0] / path.parent.name / path.name)
        assert ref.dtype == rerun.dtype and ref.tobytes() == rerun.tobytes(), key
        assert np.array_equal(ref_img.affine, rerun_img.affine)
        if key != "seg":
            assert not np.array_equal(ref, _load(other[0] / path.parent.name / path.name)[0])
    # The DICOM site: the same bytes, UIDs included.
    patient = _site_cases(out, manifest["sites"][1])[0]["seg"].parent
    for name in ("seg.nii.gz", "5_ax_t1_post_gad/IM_0001.dcm", "1_3_plane_loc/IM_0002.dcm"):
        assert (patient / name).read_bytes() == (again[1] / patient.name / name).read_bytes()


def test_sites_differ_as_real_hospitals(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    codes, zooms, labels = [], [], []
    for site in manifest["sites"]:
        layout = site["profile"]["layout"]
        values: set[int] = set()
        for files in _site_cases(out, site):
            seg, seg_img = _load(files["seg"])
            values |= set(np.unique(seg).tolist())
            # DICOM series are checked in their own test; every NIfTI file here.
            nifti = {k: p for k, p in files.items() if layout != "dicom-study" or k == "seg"}
            for key, path in nifti.items():
                data, img = _load(path)
                assert data.dtype == (np.uint8 if key == "seg" else np.int16)
                assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
                assert np.allclose(img.get_sform(), img.get_qform(), atol=1e-4)
                assert np.allclose(img.affine, seg_img.affine) and data.shape[:3] == seg.shape
                assert data.shape[3:] == ((4,) if layout == "msd" and key != "seg" else ())
        codes.append("".join(nib.aff2axcodes(seg_img.affine)))
        zooms.append(seg_img.header.get_zooms())
        labels.append(values)
    assert codes == ["RAS", "LPS", "RAS", "LAS", "LIA"]
    assert max(zooms[2]) >= 5.0 and all(max(z) <= 2.5 for i, z in enumerate(zooms) if i != 2)
    assert labels[0] == labels[1] == labels[3] == labels[4] == {0, 1, 2, 3}
    assert labels[2] == {0, 1, 2, 4}
    assert manifest["sites"][2]["profile"]["et_label"] == 4
    # MSD writes 1 for oedema and 2 for the non-enhancing core.
    assert manifest["sites"][3]["labels"] == {"NETC": 2, "SNFH": 1, "ET": 3}
    assert len({tuple(s["profile"]["gain"]) for s in manifest["sites"]}) == 5


def test_tumour_contrasts_in_written_files(federation: tuple[Path, dict[str, Any]]) -> None:
    # Read back through each layout (4D volume order, DICOM slices and rescale), so a wrong
    # channel order, label convention or pixel layout shows as wrong tissue contrast.
    out, manifest = federation
    for site in manifest["sites"]:
        label = site["labels"]
        for files in _site_cases(out, site):
            seg, seg_img = _load(files["seg"])
            img = {
                k: v.astype(np.float64)
                for k, v in _load_case(files, site["profile"]["layout"]).items()
            }
            assert all(v.shape == seg.shape for v in img.values())
            normal = _mirror_mask(seg > 0, seg_img.affine)
            oedema, enh, nec = seg == label["SNFH"], seg == label["ET"], seg == label["NETC"]
            assert img["t2f"][oedema].mean() > 1.5 * img["t2f"][normal].mean()
            assert img["t2w"][oedema].mean() > 1.3 * img["t2w"][normal].mean()
            assert img["t1c"][enh].mean() > 1.3 * img["t1c"][normal].mean()
            if nec.sum() >= 5:
                assert img["t1c"][enh].mean() > 2.0 * img["t1c"][nec].mean()
                assert img["t2w"][nec].mean() > img["t2w"][normal].mean()


def test_dicom_study_series_are_consistent(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    site = manifest["sites"][1]
    expected = {s.folder: s.description for s in dicom_study.SERIES}
    studies = set()
    for files in _site_cases(out, site):
        seg, seg_img = _load(files["seg"])
        patient = files["seg"].parent
        series = {d.name: _dicom_series(d, pixels=False) for d in patient.iterdir() if d.is_dir()}
        headers = [h for slices in series.values() for h in slices]
        # One study and frame of reference per patient; unique series and instance UIDs.
        assert len({(h.StudyInstanceUID, h.FrameOfReferenceUID) for h in headers}) == 1
        assert len({h.SeriesInstanceUID for h in headers}) == len(series) == 5
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)
        studies.add(headers[0].StudyInstanceUID)
        for h in headers:
            assert h.SOPClassUID == pydicom.uid.MRImageStorage and h.Modality == "MR"
            assert h.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert str(h.PatientName) == f"SYNTHETIC^{patient.name}" and h.PatientID == patient.name
        localiser = series.pop("1_3_plane_loc")
        assert len(localiser) == 3 and all("LOCALIZER" in h.ImageType for h in localiser)
        assert len({tuple(h.ImageOrientationPatient) for h in localiser}) == 3
        assert {name: s[0].SeriesDescription for name, s in series.items()} == expected
        for name, slices in series.items():
            _check_series_geometry(slices, seg.shape, seg_img.affine)
            first = slices[0]
            assert first.EchoTime > 0 and first.RepetitionTime > first.EchoTime
            assert ("InversionTime" in first) == (name == "4_ax_t2_flair")
            assert first.get("ContrastBolusAgent") == (
                "GADOLINIUM" if "GAD" in name.upper() else None
            )
            assert (first.RescaleSlope, first.RescaleIntercept) == (1, -dicom_study.STORED_OFFSET)
    assert len(studies) == len(site["cases"])


def _check_series_geometry(
    slices: list[pydicom.Dataset], shape: tuple[int, ...], affine: np.ndarray
) -> None:
    """Slices on the label map's grid: positions, steps, orientation, spacing [row, col]."""
    linear, origin = LPS @ affine[:3, :3], LPS @ affine[:3, 3]
    zooms = np.linalg.norm(linear, axis=0)
    directions = linear / zooms
    positions = np.array([h.ImagePositionPatient for h in slices], dtype=float)
    assert len(slices) == shape[2]
    # The label map's (float32) affine and the slice positions agree to far below ITK's
    # 1e-6 * spacing tolerance, so the two grids count as one.
    np.testing.assert_allclose(positions[0], origin, atol=1e-7)
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps, np.tile(linear[:, 2], (len(steps), 1)), atol=1e-7)
    thickness = float(slices[0].SliceThickness)
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1), thickness, rtol=1e-6)
    assert float(slices[0].SpacingBetweenSlices) == thickness
    for h in slices:
        iop = np.array(h.ImageOrientationPatient, dtype=float)
        np.testing.assert_allclose(iop, np.r_[directions[:, 0], directions[:, 1]], atol=1e-6)
        np.testing.assert_allclose(
            np.array(h.PixelSpacing, dtype=float), [zooms[1], zooms[0]], rtol=1e-6
        )
        assert (h.Rows, h.Columns) == (shape[1], shape[0])
    # Instances run from the top slice down: a reader must sort by position.
    assert [h.InstanceNumber for h in slices] == list(range(len(slices), 0, -1))


def test_msd_and_nnunet_dataset_json_are_valid(federation: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = federation
    msd_site, nn_site = manifest["sites"][3], manifest["sites"][4]
    msd_dir, nn_dir = out / msd_site["name"], out / nn_site["name"]
    msd = json.loads((msd_dir / "dataset.json").read_text())
    assert msd["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert msd["labels"] == {
        "0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"
    }  # fmt: skip
    assert msd["tensorImageSize"] == "4D" and msd["numTest"] == 0 and msd["test"] == []
    assert msd["numTraining"] == len(msd["training"]) == len(msd_site["cases"])
    for entry in msd["training"]:
        image, label = nib.load(msd_dir / entry["image"]), nib.load(msd_dir / entry["label"])
        assert isinstance(image, nib.Nifti1Image) and isinstance(label, nib.Nifti1Image)
        assert image.shape == (*label.shape, 4)
    nn = json.loads((nn_dir / "dataset.json").read_text())
    assert nn["channel_names"] == dict(zip("0123", ("T1", "T1ce", "T2", "FLAIR"), strict=True))
    assert nn["file_ending"] == ".nii.gz" and nn["numTraining"] == len(nn_site["cases"])
    assert nn["labels"] == {
        "background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]
    }  # fmt: skip
    assert nn["regions_class_order"] == [2, 1, 3]
    # The adapters read both as the layouts they claim to be, with the right label schemes.
    for site_dir, layout, scheme in ((msd_dir, "msd", "msd"), (nn_dir, "nnunet-raw", "brats2023")):
        assert detect_layout(site_dir) == layout
        scan = scan_cases(site_dir, layout)
        assert not scan.bad and len(scan.cases) == 2
        assert {c.label_scheme for c in scan.cases} == {scheme}


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


@pytest.mark.parametrize("site", range(5))
def test_tissue_contrasts_match_mri(site: int) -> None:
    profile = synth.default_profiles(5, cases_per_site=4)[site]
    case = render.render_case(profile, np.random.default_rng(11))

    def mean(mod: str, cls: int) -> float:
        return float(case.images[mod][case.tissue == cls].mean())

    wm, gm, csf = phantom.WM, phantom.GM, phantom.CSF
    assert mean("t1n", wm) > mean("t1n", gm) > mean("t1n", csf)
    assert mean("t2w", csf) > mean("t2w", gm) > mean("t2w", wm)
    assert mean("t2f", csf) < 0.5 * mean("t2f", wm)
    assert mean("t2f", phantom.SNFH) > 1.5 * mean("t2f", wm)
    assert mean("t2w", phantom.SNFH) > 1.5 * mean("t2w", wm)
    assert mean("t1c", phantom.ET) > 1.3 * mean("t1c", wm)


@pytest.mark.parametrize("seed", range(3))
def test_tumour_lies_inside_the_brain(seed: int) -> None:
    profile = synth.default_profiles(3, cases_per_site=4)[seed % 3]
    case = render.render_case(profile, np.random.default_rng(seed))
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
    anatomy = phantom.sample_anatomy(np.random.default_rng(seed), (0.5, 0.5))
    t = anatomy.tumour
    axis = np.arange(-48.0, 48.0, 1.0, dtype=np.float32)
    x, y, z = np.meshgrid(*(axis + np.float32(c) for c in t.centre), indexing="ij")
    tissue, _ = phantom.classify(anatomy, x, y, z)
    core = (tissue == phantom.ET) | (tissue == phantom.NETC)
    radius = (core.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    assert 10.0 <= radius <= 25.0
    # Every necrotic point is >= 5 mm (less 1 mm sampling) inside the core's surface.
    necrosis = tissue == phantom.NETC
    assert necrosis.any() == t.necrosis
    if t.necrosis:
        assert ndimage.distance_transform_edt(core)[necrosis].min() >= 4.0
        assert ndimage.distance_transform_edt(necrosis).max() >= 4.0
    # Oedema reaches 5..20 mm beyond the core (where the brain lets it).
    beyond = ndimage.distance_transform_edt(~core)[tissue == phantom.SNFH]
    assert 4.0 <= beyond.max() <= 21.0


def test_thick_slices_average_tissue_within_the_slab() -> None:
    thick = synth.default_profiles(3, cases_per_site=4)[2]
    thin = dataclasses.replace(thick, spacing=(1.8, 1.8, 2.0))
    anatomy = phantom.sample_anatomy(np.random.default_rng(0), thick.size_mix)
    pure = {float(v) for v in phantom.CONTRAST[:, 2]}
    mixed = []
    for profile in (thick, thin):
        shape, affine = render.site_grid(profile)
        signal, _, _ = render.tissue_signal(anatomy, profile, shape, affine)
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
    assert [p.layout for p in profiles] == [*LAYOUT_ORDER, "brats2023", "dicom-study"]
    assert profiles[5].gain != profiles[0].gain and profiles[5].spacing == profiles[0].spacing
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
    with pytest.raises(ValueError, match=r"3 for msd"):
        synth.SiteProfile(name="x", layout="msd", et_label=4)
    with pytest.raises(ValueError, match="layout 'bids'"):
        synth.SiteProfile(name="x", layout="bids")
    (tmp_path / "hospital-a").mkdir()
    (tmp_path / "hospital-a" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth.generate_federation(tmp_path, n_sites=1, cases_per_site=[2])
    assert not list(tmp_path.glob("*.json"))
