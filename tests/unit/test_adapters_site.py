"""Site-level tests of the data adapters: layouts, harmonise_site, manifest, check_site."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_adapters.errors import DataError
from data_adapters.geometry import ijk_array, ras_affine
from data_adapters.harmonise import harmonise_case
from data_adapters.layouts import MODALITIES, detect_layout, list_cases, scan_cases
from data_adapters.manifest import Split, load_manifest
from data_adapters.site import harmonise_site, make_split
from data_adapters.validate import check_site

SHAPE = (22, 24, 18)
# Stored LPS at 2 x 2 x 2.5 mm, origin off-centre: the output must still be RAS.
AFFINE = np.array(
    [[-2.0, 0, 0, 20.0], [0, -2.0, 0, 25.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]], dtype=float
)
NAMING = {
    "brats2023": ("-", {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f"}, (1, 2, 3)),
    "brats2021": ("_", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}, (1, 2, 4)),
}
SPACING = (3.0, 3.0, 3.0)


def _ball(centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))) < radius


def write_case(
    root: Path,
    case_id: str,
    *,
    layout: str = "brats2023",
    seed: int = 0,
    ext: str = ".nii.gz",
    labelled: bool = True,
    omit: str | None = None,
    extra_label: int | None = None,
) -> Path:
    """Write one tiny raw case: an ellipsoidal head with a three-label tumour."""
    separator, tokens, (core, oedema, enhancing) = NAMING[layout]
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    head = _ball((11, 12, 9), 8)
    seg = np.zeros(SHAPE, np.uint8)
    seg[_ball((12, 11, 9), 4)] = oedema
    seg[_ball((12, 11, 9), 2.5)] = enhancing
    seg[_ball((12, 11, 9), 1.5)] = core
    if extra_label is not None:
        seg[5, 12, 9] = extra_label
    for index, name in enumerate(MODALITIES):
        if name == omit:
            continue
        noise = rng.normal(1.0, 0.05, SHAPE)
        data = (head * (100.0 + 50 * index) * noise + 20.0 * (seg > 0)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, AFFINE), folder / f"{case_id}{separator}{tokens[name]}{ext}")
    if labelled:
        nib.save(nib.Nifti1Image(seg, AFFINE), folder / f"{case_id}{separator}seg{ext}")
    return folder


def raw_site(root: Path, n: int = 3, *, layout: str = "brats2023") -> Path:
    for i in range(n):
        write_case(root, f"case{i:02d}", layout=layout, seed=i)
    return root


@pytest.fixture(scope="module")
def harmonised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clean 4-case raw site and its harmonised folder (treat as read-only)."""
    base = tmp_path_factory.mktemp("clean")
    raw = raw_site(base / "hospital-a", 4)
    out = base / "out"
    harmonise_site(raw, out, target_spacing=SPACING, seed=3)
    return raw, out


def _corrupt(path: Path) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


# --- layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["brats2023", "brats2021"])
def test_detect_layout_for_both_namings(tmp_path: Path, layout: str) -> None:
    raw = raw_site(tmp_path / "raw", 2, layout=layout)
    write_case(raw, "plain", layout=layout, ext=".nii", labelled=False)
    assert detect_layout(raw) == layout
    cases = {c.case_id: c for c in list_cases(raw, layout)}
    assert sorted(cases) == ["case00", "case01", "plain"]
    assert set(cases["case00"].modalities) == set(MODALITIES)
    assert cases["plain"].seg is None and cases["plain"].modalities["t1n"].path.suffix == ".nii"
    assert cases["case00"].label_scheme == layout


def test_detect_layout_refuses_unknown_and_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "empty" / "case").mkdir(parents=True)
    with pytest.raises(DataError, match="no case folders"):
        detect_layout(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_case(mixed, "a", layout="brats2023")
    write_case(mixed, "b", layout="brats2021")
    with pytest.raises(DataError, match="ambiguous"):
        detect_layout(mixed)


def test_missing_modality_is_skipped_and_the_rest_written(tmp_path: Path) -> None:
    raw = raw_site(tmp_path / "raw", 3)
    write_case(raw, "case99", omit="t2f")
    scan = scan_cases(raw, "brats2023")
    assert [b.case_id for b in scan.bad] == ["case99"]

    result = harmonise_site(raw, tmp_path / "out", target_spacing=SPACING)
    assert [(s.case_id, Path(s.file).name) for s in result.skipped] == [
        ("case99", "case99-t2f.nii.gz")
    ]
    assert "missing t2f" in result.skipped[0].reason
    assert sorted(c.case_id for c in result.manifest.cases) == ["case00", "case01", "case02"]
    assert not (tmp_path / "out" / "cases" / "case99").exists()
    assert load_manifest(tmp_path / "out").skipped == result.skipped
    with pytest.raises(DataError, match="case99-t2f"):
        harmonise_site(raw, tmp_path / "strict", target_spacing=SPACING, strict=True)


def test_corrupt_file_is_skipped_naming_it_and_strict_raises(tmp_path: Path) -> None:
    raw = raw_site(tmp_path / "raw", 3)
    bad = raw / "case01" / "case01-t1c.nii.gz"
    _corrupt(bad)
    result = harmonise_site(raw, tmp_path / "out", target_spacing=SPACING)
    assert [s.case_id for s in result.skipped] == ["case01"]
    assert result.skipped[0].file == str(bad)
    with pytest.raises(DataError) as caught:
        harmonise_site(raw, tmp_path / "strict", target_spacing=SPACING, strict=True)
    assert str(caught.value).startswith(f"{bad}: ")
    assert not (tmp_path / "strict").exists()


def test_brats2021_site_maps_4_to_3_and_unknown_label_is_named(tmp_path: Path) -> None:
    raw = raw_site(tmp_path / "raw", 2, layout="brats2021")
    write_case(raw, "case09", layout="brats2021", extra_label=5)
    result = harmonise_site(raw, tmp_path / "out", target_spacing=SPACING)
    seg = np.asarray(nib.load(tmp_path / "out" / "cases" / "case00" / "seg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    (skipped,) = result.skipped
    assert skipped.file.endswith("case09_seg.nii.gz") and "[5]" in skipped.reason


def test_labels_outside_the_head_are_not_cropped(tmp_path: Path) -> None:
    folder = write_case(tmp_path / "raw", "case00")
    seg_path = folder / "case00-seg.nii.gz"
    seg = np.asarray(nib.load(seg_path).dataobj).copy()
    seg[:2, :2, :2] = 2  # in the air, outside the head's bounding box
    nib.save(nib.Nifti1Image(seg, AFFINE), seg_path)
    (raw_case,) = list_cases(tmp_path / "raw", "brats2023")
    case = harmonise_case(raw_case, target_spacing=SPACING, margin_mm=0.0)
    assert case.seg is not None
    labels = ijk_array(case.seg)
    affine = ras_affine(case.seg)
    world = affine[:3, :3] @ np.argwhere(labels == 2).T + affine[:3, 3:]
    corner = AFFINE[:3, :3] @ [0.5, 0.5, 0.5] + AFFINE[:3, 3]
    assert np.min(np.linalg.norm(world - corner[:, None], axis=0)) < 3.0


# --- outputs and manifest ----------------------------------------------------------------


def test_outputs_are_canonical(harmonised: tuple[Path, Path]) -> None:
    _, out = harmonised
    case = out / "cases" / "case00"
    images = [nib.load(case / f"{name}.nii.gz") for name in (*MODALITIES, "seg")]
    for image in images:
        assert "".join(nib.aff2axcodes(image.affine)) == "RAS"
        np.testing.assert_allclose(image.header.get_zooms(), SPACING)
        np.testing.assert_array_equal(image.affine, images[0].affine)
        assert image.shape == images[0].shape
    assert images[0].get_data_dtype() == np.float32
    assert images[-1].get_data_dtype() == np.uint8
    rows = (out / "qc" / "geometry.csv").read_text().splitlines()
    assert sum(row.startswith("case00,") for row in rows) == 5

    # End to end, the tumour stays where it was in the world.
    def centroid(image: nib.Nifti1Image) -> np.ndarray:
        ijk = np.argwhere(np.asarray(image.dataobj) > 0).mean(axis=0)
        return image.affine[:3, :3] @ ijk + image.affine[:3, 3]

    raw_seg = nib.load(harmonised[0] / "case00" / "case00-seg.nii.gz")
    assert np.linalg.norm(centroid(images[-1]) - centroid(raw_seg)) < 1.5


def test_manifest_records_sources_geometry_and_split(harmonised: tuple[Path, Path]) -> None:
    raw, out = harmonised
    manifest = load_manifest(out)
    assert manifest.site == "hospital-a" and manifest.target_spacing == SPACING
    for record in manifest.cases:
        for source in record.sources.values():
            digest = hashlib.sha256((raw / source.path).read_bytes()).hexdigest()
            assert source.sha256 == digest
        geometry = record.original_geometry
        assert geometry.shape == SHAPE and geometry.axcodes == "LPS"
        np.testing.assert_allclose(geometry.affine_ras, AFFINE, atol=1e-6)
        assert [s.name for s in record.steps][-1] == "zscore"
    assert set(manifest.train_cases).isdisjoint(manifest.validation_cases)
    assert sorted(manifest.train_cases + manifest.validation_cases) == manifest.case_ids
    assert len(manifest.validation_cases) == 1  # round(0.25 * 4)
    assert manifest.case_dir("case00") == out / "cases" / "case00"


def test_split_is_seeded_and_disjoint() -> None:
    ids = [f"c{i}" for i in range(10)]
    first = make_split(ids[::-1], validation_fraction=0.3, seed=7)
    assert first == make_split(ids, validation_fraction=0.3, seed=7)
    assert len(first.validation) == 3 and set(first.train).isdisjoint(first.validation)
    assert sorted(first.train + first.validation) == ids
    assert len(make_split(ids[:2], validation_fraction=0.1, seed=0).validation) == 1
    assert make_split(ids[:1], validation_fraction=0.5, seed=0).validation == ()
    # Fraction 1: an evaluation-only site holds every case out, even a single one.
    assert make_split(ids, validation_fraction=1.0, seed=0) == Split(0, 1.0, (), tuple(ids))
    assert make_split(ids[:1], validation_fraction=1.0, seed=0).validation == ("c0",)
    assert any(
        make_split(ids, validation_fraction=0.3, seed=s).validation != first.validation
        for s in range(5)
    )


def test_fingerprint_is_stable_and_tracks_source_bytes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for i in range(2):
        write_case(raw, f"case{i}", seed=i, ext=".nii")
    first = harmonise_site(raw, tmp_path / "a", target_spacing=SPACING).manifest
    again = harmonise_site(raw, tmp_path / "b", target_spacing=SPACING).manifest
    assert first.fingerprint == again.fingerprint
    other_params = harmonise_site(raw, tmp_path / "c", target_spacing=(4.0, 4.0, 4.0)).manifest
    assert other_params.fingerprint != first.fingerprint

    target = raw / "case1" / "case1-t2w.nii"
    payload = bytearray(target.read_bytes())
    payload[-1] ^= 0x01  # one byte of the last voxel
    target.write_bytes(bytes(payload))
    changed = harmonise_site(raw, tmp_path / "d", target_spacing=SPACING).manifest
    assert changed.fingerprint != first.fingerprint


# --- check_site and atomic replacement ------------------------------------------------------


def test_check_site_passes_on_fresh_site(harmonised: tuple[Path, Path]) -> None:
    manifest = check_site(harmonised[1])
    assert len(manifest.cases) == 4


def test_check_site_names_missing_file(harmonised: tuple[Path, Path], tmp_path: Path) -> None:
    site = shutil.copytree(harmonised[1], tmp_path / "site")
    (site / "cases" / "case02" / "t2w.nii.gz").unlink()
    with pytest.raises(DataError) as caught:
        check_site(site)
    assert str(caught.value).startswith(str(site / "cases" / "case02" / "t2w.nii.gz"))


def _edit_manifest(site: Path, edit: dict[str, list[str]]) -> None:
    path = site / "manifest.json"
    data = json.loads(path.read_text())
    data["split"].update(edit)
    path.write_text(json.dumps(data))


def test_check_site_names_broken_split(harmonised: tuple[Path, Path], tmp_path: Path) -> None:
    site = shutil.copytree(harmonised[1], tmp_path / "site")
    manifest = load_manifest(site)
    overlap = manifest.validation_cases + manifest.train_cases[:1]
    _edit_manifest(site, {"validation": overlap})
    with pytest.raises(DataError, match="both training and validation"):
        check_site(site)
    # Every case held out is an evaluation-only site; nothing in either split is an error.
    _edit_manifest(site, {"train": [], "validation": manifest.case_ids})
    assert check_site(site).train_cases == []
    _edit_manifest(site, {"train": [], "validation": []})
    with pytest.raises(DataError, match="both the training and the validation split are empty"):
        check_site(site)


def test_check_site_names_bad_labels_and_grid(
    harmonised: tuple[Path, Path], tmp_path: Path
) -> None:
    site = shutil.copytree(harmonised[1], tmp_path / "site")
    seg_path = site / "cases" / "case01" / "seg.nii.gz"
    seg = nib.load(seg_path)
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), seg_path)
    with pytest.raises(DataError, match=r"label values \[4\]"):
        check_site(site)

    t1c_path = site / "cases" / "case01" / "t1c.nii.gz"
    t1c = nib.load(t1c_path)
    flipped = t1c.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(t1c.dataobj), flipped), t1c_path)
    with pytest.raises(DataError, match=r"t1c\.nii\.gz: not on the grid"):
        check_site(site)

    (site / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        check_site(site)


def test_failure_halfway_leaves_existing_site_untouched(tmp_path: Path) -> None:
    raw = raw_site(tmp_path / "raw", 3)
    out = tmp_path / "out"
    harmonise_site(raw, out, target_spacing=SPACING)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    _corrupt(raw / "case02" / "case02-t2f.nii.gz")  # the last case: two were written first
    with pytest.raises(DataError, match="case02-t2f"):
        harmonise_site(raw, out, target_spacing=(4.0, 4.0, 4.0), strict=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no leftovers

    # A non-strict rerun replaces the site in one go.
    result = harmonise_site(raw, out, target_spacing=(4.0, 4.0, 4.0))
    assert result.manifest.target_spacing == (4.0, 4.0, 4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_refuses_to_replace_unrelated_folder_or_raw_data(tmp_path: Path) -> None:
    raw = raw_site(tmp_path / "raw", 2)
    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not a harmonised site"):
        harmonise_site(raw, unrelated, target_spacing=SPACING)
    assert (unrelated / "thesis.txt").read_text() == "precious"
    with pytest.raises(DataError, match="raw data"):
        harmonise_site(raw, tmp_path, target_spacing=SPACING)


def test_brats2024_gli_drops_resection_cavity_and_is_never_guessed(tmp_path: Path) -> None:
    # Prepare: 2023 naming with a resection cavity (4) next to the tumour.
    raw = tmp_path / "site"
    for i in range(2):
        write_case(raw, f"case{i:02d}", seed=i, extra_label=4)
    # Execute / Assert: the names alone say brats2023, whose scheme refuses 4 ...
    assert detect_layout(raw) == "brats2023"
    with pytest.raises(DataError, match=r"label values \[4\] not in scheme brats2023"):
        harmonise_site(raw, tmp_path / "auto", target_spacing=SPACING)
    # ... and naming brats2024-gli maps the cavity to background, recorded in the manifest.
    result = harmonise_site(raw, tmp_path / "out", layout="brats2024-gli", target_spacing=SPACING)
    assert not result.skipped
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    remap = next(s for s in manifest["cases"][0]["steps"] if s["name"] == "remap_labels")
    record = remap["params"]["images"]["seg"]
    assert record["scheme"] == "brats2024-gli"
    assert (
        record["dropped"]["4"]["voxels"] == 1
        and "resection cavity" in record["dropped"]["4"]["reason"]
    )
    seg = nib.load(tmp_path / "out" / "cases" / "case00" / "seg.nii.gz")
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 1, 2, 3}
