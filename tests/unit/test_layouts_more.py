"""MSD, nnU-Net raw and mapping-file layouts, and the label schemes they bring, on tiny files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.labels import SCHEMES, remap_labels, remap_record
from data_adapters.layouts import LAYOUTS, detect_layout, get_layout, scan_cases
from data_adapters.layouts_more import MSD, NNUNET_RAW, NnUNetRawLayout
from data_adapters.readers import read_source
from data_adapters.sources import Source

SHAPE = (4, 5, 3)
TASK01_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
TASK01_LABELS = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}
DATASET137_LABELS: dict[str, Any] = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


def _volume(value: int) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.int16)


def _msd(root: Path, *, modality: dict[str, str] = TASK01_MODALITY) -> Path:
    """A tiny Task01 folder: one training case, one test case, macOS junk beside them."""
    # Volume v holds the value 10 + v, so a read tells which volume it was.
    four_d = np.stack([_volume(10 + v) for v in range(4)], axis=-1)
    _nifti(root / "imagesTr" / "BRATS_001.nii.gz", four_d)
    _nifti(
        root / "labelsTr" / "BRATS_001.nii.gz",
        np.arange(4, dtype=np.uint8).repeat(15).reshape(SHAPE),
    )
    _nifti(root / "imagesTs" / "BRATS_900.nii.gz", four_d)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0\5\26\7")  # AppleDouble file
    info = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": modality,
        "labels": TASK01_LABELS,
        "numTraining": 1,
        "training": [
            {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
        ],
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _nnunet(root: Path, *, labels: dict[str, Any] | None = None, **extra: Any) -> Path:
    """A tiny nnU-Net v2 raw dataset: two training cases (one lacks a channel), one test case."""
    names = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    cases = {
        "BraTS2021_00000": "imagesTr",
        "BraTS2021_00001": "imagesTr",
        "BraTS2021_00900": "imagesTs",
    }
    for case, folder in cases.items():
        for channel in range(4):
            if case != "BraTS2021_00001" or channel != 2:
                _nifti(root / folder / f"{case}_{channel:04d}.nii.gz", _volume(channel))
        if folder == "imagesTr":
            _nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros(SHAPE, np.uint8))
    info = {
        "channel_names": extra.pop("channel_names", names),
        "labels": DATASET137_LABELS if labels is None else labels,
        "numTraining": 2,
        "file_ending": ".nii.gz",
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_msd_cases_take_their_volume_order_from_dataset_json(tmp_path: Path) -> None:
    # Prepare
    raw = _msd(tmp_path / "msd")
    # Execute
    scan = scan_cases(raw, detect_layout(raw))
    # Assert: the training case is labelled, the test case not, the AppleDouble file ignored.
    assert detect_layout(raw) == "msd"
    assert [c.case_id for c in scan.cases] == ["BRATS_001", "BRATS_900"] and not scan.bad
    train, test = scan.cases
    image = raw / "imagesTr" / "BRATS_001.nii.gz"
    assert train.modalities == {
        "t1n": Source(image, channel=1),
        "t1c": Source(image, channel=2),
        "t2w": Source(image, channel=3),
        "t2f": Source(image, channel=0),
    }
    assert train.seg == Source(raw / "labelsTr" / "BRATS_001.nii.gz")
    assert train.label_scheme == "msd" and train.layout == "msd"
    assert test.seg is None
    # Permuting dataset.json's declaration changes which volume is t1c.
    _msd(tmp_path / "permuted", modality={"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"})
    permuted = MSD.scan(tmp_path / "permuted").cases[0]
    assert permuted.modalities["t1c"].channel == 1 and permuted.modalities["t2f"].channel == 3
    t1c = sitk.GetArrayFromImage(read_source(permuted.modalities["t1c"]))
    assert np.all(t1c == 11)


def test_msd_refuses_unknown_modalities_and_bad_cases(tmp_path: Path) -> None:
    # Prepare: an unknown channel name; then a 3D image and a missing label.
    raw = _msd(tmp_path / "adc", modality={"0": "FLAIR", "1": "T1w", "2": "ADC", "3": "T2w"})
    broken = _msd(tmp_path / "broken")
    _nifti(broken / "imagesTr" / "BRATS_002.nii.gz", _volume(1))
    (broken / "labelsTr" / "BRATS_001.nii.gz").unlink()
    # Execute / Assert
    with pytest.raises(DataError, match=r"modality\['2'\] = 'ADC': unknown modality") as err:
        MSD.scan(raw)
    assert err.value.path == raw / "dataset.json"
    scan = MSD.scan(broken)
    reasons = {b.case_id: b.reason for b in scan.bad}
    assert "expected a 4D image with 4 volumes" in reasons["BRATS_002"]
    assert "missing label" in reasons["BRATS_001"]
    assert [c.case_id for c in scan.cases] == ["BRATS_900"]


def test_label_schemes_msd_and_brats2024_gli(tmp_path: Path) -> None:
    # MSD: 1 oedema -> 2 SNFH, 2 non-enhancing -> 1 NETC, 3 stays ET.
    assert remap_labels(np.array([0, 1, 2, 3]), "msd").tolist() == [0, 2, 1, 3]
    # BraTS 2024 GLI: the resection cavity (4) is not tumour.
    source = np.array([0, 1, 2, 3, 4, 4])
    assert remap_labels(source, "brats2024-gli").tolist() == [0, 1, 2, 3, 0, 0]
    assert "not tumour" in SCHEMES["brats2024-gli"].description
    record = remap_record(source, "brats2024-gli")
    assert record["map"]["4"] == 0
    assert record["dropped"] == {"4": {"reason": SCHEMES["brats2024-gli"].dropped[4], "voxels": 2}}
    assert "dropped" not in remap_record(source[:4], "msd")
    # Unknown values are errors naming the file and the values.
    with pytest.raises(DataError, match=r"label values \[4, 5\] not in scheme msd") as err:
        remap_labels(np.array([0, 4, 5]), "msd", path=tmp_path / "seg.nii.gz")
    assert err.value.path == tmp_path / "seg.nii.gz"


def test_nnunet_cases_channels_and_region_labels(tmp_path: Path) -> None:
    # Prepare: Dataset137's declaration (regions over raw 1 oedema, 2 necrosis, 3 ET).
    raw = _nnunet(tmp_path / "Dataset137_BraTS2021")
    # Execute
    scan = scan_cases(raw, detect_layout(raw))
    # Assert
    assert detect_layout(raw) == "nnunet-raw"
    assert [c.case_id for c in scan.cases] == ["BraTS2021_00000", "BraTS2021_00900"]
    case = scan.cases[0]
    assert case.modalities["t2f"] == Source(raw / "imagesTr" / "BraTS2021_00000_0003.nii.gz")
    assert case.seg == Source(raw / "labelsTr" / "BraTS2021_00000.nii.gz")
    assert scan.cases[1].seg is None
    assert case.label_scheme == "msd"  # the same value map as MSD Task01
    [bad] = scan.bad
    assert bad.case_id == "BraTS2021_00001" and "missing channel 0002 (t2w)" in bad.reason
    assert bad.file.endswith("BraTS2021_00001_0002.nii.gz")


@pytest.mark.parametrize(
    ("labels", "scheme"),
    [
        ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, "brats2023"),
        (
            {
                "background": 0,
                "necrotic tumor core (NCR)": 1,
                "peritumoral edema": 2,
                "GD-enhancing tumour": 4,
            },
            "brats2021",
        ),
        (
            {
                "background": 0,
                "whole tumor": [1, 2, 3],
                "tumor core": [1, 3],
                "enhancing tumor": [3],
            },
            "brats2023",
        ),
        ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}, "brats2024-gli"),
    ],
)
def test_nnunet_label_names_map_onto_registered_schemes(
    tmp_path: Path, labels: dict[str, Any], scheme: str
) -> None:
    raw = _nnunet(tmp_path, labels=labels)
    assert {c.label_scheme for c in NNUNET_RAW.scan(raw).cases} == {scheme}


def test_nnunet_refusals_and_override(tmp_path: Path) -> None:
    # Unrecognised label name: refused naming dataset.json and the label.
    raw = _nnunet(tmp_path / "a", labels={"background": 0, "tumour": 1})
    with pytest.raises(DataError, match=r"label 'tumour' \(value 1\) is not recognised") as err:
        NNUNET_RAW.scan(raw)
    assert err.value.path == raw / "dataset.json"
    # ... unless the site names the scheme.
    override = NnUNetRawLayout(label_scheme="brats2021").scan(raw).cases[0]
    assert override.label_scheme == "brats2021"
    # Channel names map by name; unmappable ones and unreadable endings are refused.
    flair_first = {"0": "FLAIR", "1": "T1-contrast", "2": "native", "3": "T2w"}
    case = NNUNET_RAW.scan(_nnunet(tmp_path / "b", channel_names=flair_first)).cases[0]
    assert case.modalities["t2f"].path.name.endswith("_0000.nii.gz")
    assert case.modalities["t1c"].path.name.endswith("_0001.nii.gz")
    with pytest.raises(DataError, match=r"channel_names\['3'\] = 'DWI': unknown modality"):
        NNUNET_RAW.scan(_nnunet(tmp_path / "c", channel_names={**flair_first, "3": "DWI"}))
    with pytest.raises(DataError, match=r"file_ending '\.png' is not readable"):
        NNUNET_RAW.scan(_nnunet(tmp_path / "d", file_ending=".png"))


def test_detection_tells_msd_from_nnunet(tmp_path: Path) -> None:
    msd, nnunet = _msd(tmp_path / "msd"), _nnunet(tmp_path / "nnunet")
    assert (MSD.count_cases(msd), NNUNET_RAW.count_cases(msd)) == (2, 0)
    assert (MSD.count_cases(nnunet), NNUNET_RAW.count_cases(nnunet)) == (0, 3)
    # nnU-Net v1 kept MSD's "modality" key: the _0000 files still say nnU-Net.
    info = json.loads((nnunet / "dataset.json").read_text())
    info["modality"] = info.pop("channel_names")
    (nnunet / "dataset.json").write_text(json.dumps(info))
    assert detect_layout(nnunet) == "nnunet-raw"
    assert len(NNUNET_RAW.scan(nnunet).cases) == 2
    # An unreadable dataset.json is still detected by its files, then refused loudly.
    (msd / "dataset.json").write_text("{not json")
    assert detect_layout(msd) == "msd"
    with pytest.raises(DataError, match="cannot be read as JSON"):
        MSD.scan(msd)


BIDS_TOML = """
label_scheme = "brats2021"
[cases]
pattern = "{case}/anat"
[modalities]
t1n = "{case}/anat/*T1w.nii.gz"
t1c = "{case}/anat/*ce-gd*_T1w.nii.gz"
t2w = "{case}/anat/*T2w.nii.gz"
t2f = "{case}/anat/*FLAIR.nii.gz"
seg = "{case}/derivatives/*dseg.nii.gz"
"""


def _bids(root: Path) -> Path:
    for sub in ("sub-01", "sub-02"):
        for name in ("T1w", "ce-gd_T1w", "T2w", "FLAIR"):
            _nifti(root / sub / "anat" / f"{sub}_{name}.nii.gz", _volume(1))
    _nifti(root / "sub-01" / "derivatives" / "sub-01_dseg.nii.gz", np.zeros(SHAPE, np.uint8))
    (root / ".git" / "anat").mkdir(parents=True)  # hidden folders are not cases
    return root


def test_mapping_file_finds_cases_and_refuses_ambiguous_globs(tmp_path: Path) -> None:
    # Prepare: the brief's BIDS-like mapping, whose t1n glob also matches the ce-gd file.
    raw = _bids(tmp_path / "raw")
    loose = tmp_path / "loose.toml"
    loose.write_text(BIDS_TOML)
    strict = tmp_path / "site.toml"
    strict.write_text(BIDS_TOML.replace("*T1w.nii.gz", "{case}_T1w.nii.gz"))
    # Execute
    refused = scan_cases(raw, str(loose))
    found = scan_cases(raw, str(strict))
    # Assert: ambiguity makes each case bad, naming the TOML and listing both matches.
    assert not refused.cases and [b.case_id for b in refused.bad] == ["sub-01", "sub-02"]
    reason = refused.bad[0].reason
    assert "t1n pattern of loose.toml must match one file, matched 2" in reason
    assert "sub-01/anat/sub-01_T1w.nii.gz" in reason and "sub-01_ce-gd_T1w.nii.gz" in reason
    one, two = found.cases
    assert one.modalities["t1c"] == Source(raw / "sub-01" / "anat" / "sub-01_ce-gd_T1w.nii.gz")
    assert one.seg == Source(raw / "sub-01" / "derivatives" / "sub-01_dseg.nii.gz")
    assert two.seg is None and one.label_scheme == "brats2021" and one.layout == "mapping"
    # A mapping layout is never auto-detected.
    assert "mapping" not in LAYOUTS
    with pytest.raises(DataError, match="no case folders of a known layout"):
        detect_layout(raw)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[cases]", "site = 'x'\n[cases]"), r"site: unknown key"),
        (lambda t: t.replace("t2f =", "flair ="), r"\[modalities\] flair: unknown key"),
        (lambda t: t.replace('"brats2021"', '"brats2019"'), r"label_scheme = 'brats2019': unknown"),
        (lambda t: t.replace("t2f =", "# t2f ="), r"\[modalities\] t2f: missing"),
        (lambda t: t.replace('"{case}/anat"', '"../anat"'), r"\[cases\] pattern: expected a glob"),
        (lambda t: t.replace("pattern =", "pattern"), r"cannot be read as TOML"),
    ],
)
def test_mapping_file_is_validated_loudly(tmp_path: Path, edit: Any, message: str) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text(edit(BIDS_TOML))
    with pytest.raises(DataError, match=message) as err:
        get_layout(str(toml))
    assert err.value.path == toml
