"""`fedseg predict`: the model artefact, and predictions written back on the scan's own grid.

The model is the tiny preset at its seeded initialisation (what it predicts does not matter
for geometry); the cases are generated raw cases rewritten in other orientations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from data_adapters.dicom import read_series
from data_adapters.errors import DataError
from data_adapters.harmonise import harmonisation_parameters
from data_adapters.inverse import to_original_grid
from data_adapters.layouts import RawCase
from fedseg.cli import app
from fedseg.config import RunConfig
from fedseg.server_app import save_model
from fedseg.synth import generate_federation
from fedseg.task.artifact import ArtifactError, load_artifact
from fedseg.task.model import build_model
from fedseg.task.predict import (
    PredictOptions,
    find_case,
    harmonise_for,
    output_values,
    predict_case,
)

SPACING = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def raw_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """hospital-a (BraTS 2023 NIfTI) and hospital-b (a DICOM study), two cases each."""
    root = tmp_path_factory.mktemp("raw")
    return generate_federation(root, n_sites=2, cases_per_site=(2, 2), seed=3)


def _artifact(folder: Path, *, spacing: tuple[float, float, float] = SPACING) -> Path:
    path = folder / "model.pt"
    save_model(path, build_model("tiny", seed=0).state_dict(), run=RunConfig(),
               trained_on="federation", provenance={"run_id": 7, "final_round": 3},
               harmonisation=harmonisation_parameters(target_spacing=spacing))  # fmt: skip
    return path.with_suffix(".json")


def _nifti_case(raw_sites: list[Path]) -> Path:
    return sorted(p for p in raw_sites[0].iterdir() if p.is_dir())[0]


def _rewrite(case_dir: Path, out: Path, transform: str) -> Path:
    """The case's files with another orientation or slice thickness, the same labels."""
    out.mkdir(parents=True)
    for src in case_dir.glob("*.nii.gz"):
        image = nib.load(src)
        data, affine = np.asarray(image.dataobj), image.affine.copy()
        if transform == "lps":  # same world, voxels stored right-to-left, front-to-back
            data = data[::-1, ::-1]
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = np.array(data.shape[:2]) - 1
            affine = affine @ flip
        elif transform == "oblique":  # 20 degrees about the scanner's z and 10 about x
            a, b = np.radians(20), np.radians(10)
            rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
            affine[:3] = np.hstack([rz @ rx @ affine[:3, :3], affine[:3, 3:]])
        elif transform == "thick":  # every third slice, three times as thick
            data = data[:, :, ::3]
            affine[:3, 2] *= 3
        nib.save(nib.Nifti1Image(data, affine), out / src.name)
    return out


@pytest.mark.parametrize("transform", ["ras", "lps", "oblique", "thick"])
def test_the_written_seg_has_the_input_scans_shape_and_affine(
    raw_sites: list[Path], tmp_path: Path, transform: str
) -> None:
    artifact = load_artifact(_artifact(tmp_path))
    site = tmp_path / "site"
    case_dir = _rewrite(_nifti_case(raw_sites), site / _nifti_case(raw_sites).name, transform)
    case = find_case(case_dir)
    result = predict_case(artifact, artifact.network(), case, tmp_path / "out",
                          options=PredictOptions())  # fmt: skip
    t1n = nib.load(case.modalities["t1n"].path)
    seg = nib.load(result.seg)
    assert seg.shape == t1n.shape
    np.testing.assert_allclose(seg.affine, t1n.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
    volumes = json.loads(result.volumes.read_text())
    voxel_ml = float(np.prod(seg.header.get_zooms())) / 1000
    wt = np.count_nonzero(np.asarray(seg.dataobj)) * voxel_ml
    assert volumes["regions"]["WT"] == pytest.approx(wt, abs=1e-3)
    assert volumes["model"]["run_id"] == 7 and result.dicom_seg is None


@pytest.mark.parametrize("transform", ["ras", "lps", "oblique", "thick"])
def test_a_label_map_survives_predicts_geometry_path_at_1_mm(
    raw_sites: list[Path], tmp_path: Path, transform: str
) -> None:
    # The generated case is at 2 mm; at the model's 1 mm grid, harmonise -> back to the
    # scan's grid must give the labels back (what predict does to its own output).
    artifact = load_artifact(_artifact(tmp_path, spacing=(1.0, 1.0, 1.0)))
    source = _nifti_case(raw_sites)
    case_dir = _rewrite(source, tmp_path / "site" / source.name, transform)
    case = find_case(case_dir)
    harmonised = harmonise_for(artifact, case)
    assert harmonised.seg is not None and case.seg is not None
    back = sitk.GetArrayFromImage(to_original_grid(harmonised.seg, harmonised.original_geometry))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(case.seg.path)))
    for label in (1, 2, 3):
        a, b = back == label, original == label
        assert a.any() and 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) >= 0.99, label


def test_labels_can_be_written_in_brats_2021_values(raw_sites: list[Path], tmp_path: Path) -> None:
    artifact = load_artifact(_artifact(tmp_path))
    case = find_case(_nifti_case(raw_sites))
    canonical = predict_case(artifact, artifact.network(), case, tmp_path / "a",
                             options=PredictOptions())  # fmt: skip
    old = predict_case(artifact, artifact.network(), case, tmp_path / "b",
                       options=PredictOptions(label_scheme="brats2021"))  # fmt: skip
    a, b = (np.asarray(nib.load(r.seg).dataobj) for r in (canonical, old))
    assert (a == 3).any()  # the untrained network still marks some voxels ET
    np.testing.assert_array_equal(b, np.where(a == 3, 4, a))
    assert output_values("brats2021") == {0: 0, 1: 1, 2: 2, 3: 4}
    with pytest.raises(DataError, match="unknown label scheme"):
        output_values("brats1999")


def test_a_dicom_study_gets_a_dicom_seg_on_its_t1n_series(
    raw_sites: list[Path], tmp_path: Path
) -> None:
    artifact = load_artifact(_artifact(tmp_path))
    patient = sorted(p for p in raw_sites[1].iterdir() if p.is_dir())[0]
    case = find_case(patient)
    result = predict_case(artifact, artifact.network(), case, tmp_path / "out",
                          options=PredictOptions())  # fmt: skip
    assert result.dicom_seg is not None
    seg = pydicom.dcmread(result.dicom_seg)
    t1n = case.modalities["t1n"]
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1n.series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["NETC", "SNFH", "ET"]
    # The NIfTI beside it is on the same series grid the DICOM-SEG references.
    series = read_series(t1n.path, series_uid=t1n.series_uid)
    assert nib.load(result.seg).shape == series.GetSize()


def test_a_corrupt_or_foreign_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    description = _artifact(tmp_path)
    weights = description.with_suffix(".pt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.pt: sha256 .* is corrupt or was replaced"):
        load_artifact(description)
    meta = json.loads(description.read_text())
    for change, message in (
        ({"schema": None}, "no schema"),
        ({"harmonisation": None, "harmonisation_conflict": ["a: [1, 1, 1]", "b: [3, 3, 3]"]},
         r"sites harmonised differently \(\['a: \[1, 1, 1\]'"),
        ({"site_local_layers": "normalisation"}, "stayed at each site"),
        ({"inference": {"roi_size": 48}}, "inference 'overlap'"),
    ):  # fmt: skip
        description.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ArtifactError, match=message):
            load_artifact(description)
    description.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"model\.json: not valid JSON"):
        load_artifact(tmp_path)  # the folder finds model.json


def test_predict_batch_goes_on_past_a_corrupt_case(raw_sites: list[Path], tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(raw_sites[0], site)
    broken = sorted(p for p in site.iterdir() if p.is_dir())[1]
    next(broken.glob("*t1c.nii.gz")).write_bytes(b"not a nifti file")
    model = _artifact(tmp_path / "model")
    result = CliRunner().invoke(app, ["predict", "--model", str(model), "--input", str(site),
                                      "--out", str(tmp_path / "out"), "--batch"])  # fmt: skip
    assert result.exit_code == 0, result.output
    good = sorted(p for p in site.iterdir() if p.is_dir())[0].name
    assert (tmp_path / "out" / good / "seg.nii.gz").is_file()
    assert not (tmp_path / "out" / broken.name / "seg.nii.gz").exists()
    assert f"failed {broken.name}" in result.output and "t1c.nii.gz" in result.output
    assert "1 cases predicted" in result.output


def test_find_case_names_what_it_could_not_find(raw_sites: list[Path], tmp_path: Path) -> None:
    assert isinstance(find_case(_nifti_case(raw_sites)), RawCase)
    with pytest.raises(DataError, match="holds 2 cases: pick one with --case ID"):
        find_case(raw_sites[0])
    with pytest.raises(DataError, match="has no case 'nobody' \\(cases: "):
        find_case(raw_sites[0], case_id="nobody")
    empty = tmp_path / "site" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no complete case of a known layout"):
        find_case(empty)


def test_the_model_records_the_harmonisation_only_when_every_site_shared_it() -> None:
    from fedseg.strategies import MetricsBook, training_harmonisation

    fine = harmonisation_parameters(target_spacing=(1.0, 1.0, 1.0))
    coarse = harmonisation_parameters(target_spacing=(3.0, 3.0, 3.0))
    book = MetricsBook()
    book.round_record(1).train = {"a": {"harmonisation": fine}, "b": {"harmonisation": fine}}
    assert training_harmonisation(book) == (fine, [])
    book.round_record(2).train = {"b": {"harmonisation": coarse}}
    assert training_harmonisation(book) == (None, ["a: [1.0, 1.0, 1.0]", "b: [3.0, 3.0, 3.0]"])


def test_a_dicom_patient_folder_lacking_a_series_is_named(
    raw_sites: list[Path], tmp_path: Path
) -> None:
    patient = tmp_path / "site" / "SYNTH-07"
    shutil.copytree(sorted(p for p in raw_sites[1].iterdir() if p.is_dir())[0], patient)
    assert find_case(patient).case_id == "SYNTH-07"
    flair = next(p for p in patient.iterdir() if "flair" in p.name)
    shutil.rmtree(flair)
    with pytest.raises(DataError, match=r"SYNTH-07: no t2f series"):
        find_case(patient)
