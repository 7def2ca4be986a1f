"""The ``dicom-study`` layout: modality recognition, site rules, ambiguity, detection."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_adapters.dicom import SeriesInfo
from data_adapters.errors import DataError
from data_adapters.layouts import LAYOUTS, detect_layout, scan_cases
from data_adapters.layouts_dicom import DICOM_STUDY, RULES_FILE, classify
from data_adapters.readers import read_source
from data_adapters.sources import source_sha256
from tests.unit.test_dicom_volume import write_series

BLANK = SeriesInfo(
    uid="1.2.3", description="", protocol="", modality="MR", series_number=1, n_files=1,
    n_frames=1, echo_time=None, repetition_time=None, inversion_time=None,
    scanning_sequence=(), sequence_variant=(), contrast_agent="", mr_acquisition_type="",
    image_type=(), acquisition_contrast="", files=(),
)  # fmt: skip


@pytest.mark.parametrize(
    ("description", "modality"),
    [
        ("AX T1 SE", "t1n"),
        ("AX T1 POST GAD", "t1c"),
        ("Ax T1 MPRAGE +C", "t1c"),
        ("AX T2 FSE", "t2w"),
        ("AX T2 FLAIR", "t2f"),
        ("Sag T1 FLAIR", "t1n"),  # a T1 sequence despite the word FLAIR
        ("3 PLANE LOC", "ignore"),
        ("t1_mprage_sag_p2_iso", "t1n"),
        ("t1_mprage_sag_p2_iso_post", "t1c"),
        ("Ax T1 3D SPGR W/C", "t1c"),
        ("AX T1 W/O", "t1n"),
        ("t2_tirm_tra_dark-fluid", "t2f"),
        ("Sag CUBE FLAIR", "t2f"),
        ("AX T2 TSE", "t2w"),
        ("AX DWI B1000", "ignore"),
        ("ADC", "ignore"),
        ("AX SWAN", "ignore"),
        ("T2* GRE", "ignore"),
        ("AX PD FSE", "ignore"),
        ("PERFUSION", "ignore"),
        ("FAST LOCALIZER", "ignore"),
        ("MYSTERY", None),
    ],
)
def test_dicom_vendor_descriptions_map_to_modalities(description: str, modality: str) -> None:
    assert classify(replace(BLANK, description=description)) == modality


def test_dicom_header_contrast_agent_makes_a_plain_t1_post_contrast() -> None:
    assert classify(replace(BLANK, description="AX T1 SE", contrast_agent="GADAVIST")) == "t1c"
    # ...but not a T2 or FLAIR acquired after the injection.
    assert classify(replace(BLANK, description="AX T2 FLAIR", contrast_agent="GD")) == "t2f"


@pytest.mark.parametrize(
    ("params", "modality"),
    [
        ({"inversion_time": 2500.0, "echo_time": 120.0, "repetition_time": 9000.0}, "t2f"),
        ({"echo_time": 12.0, "repetition_time": 550.0}, "t1n"),
        ({"echo_time": 12.0, "repetition_time": 550.0, "contrast_agent": "Gd"}, "t1c"),
        ({"echo_time": 100.0, "repetition_time": 4000.0}, "t2w"),
        ({"acquisition_contrast": "FLAIR"}, "t2f"),
        ({"acquisition_contrast": "T1"}, "t1n"),
    ],
)
def test_dicom_sequence_parameters_decide_without_a_description(
    params: dict[str, object], modality: str
) -> None:
    assert classify(replace(BLANK, description="SERIES 5", **params)) == modality  # type: ignore[arg-type]


def test_dicom_protocol_name_is_used_when_the_description_is_empty() -> None:
    assert classify(replace(BLANK, protocol="AX T2 FLAIR")) == "t2f"
    # A protocol naming the whole exam does not override the series' own description.
    assert classify(replace(BLANK, description="AX T1 SE", protocol="BRAIN W CONTRAST")) == "t1n"


def write_study(site: Path, patient: str = "patient01", *, t2f: str = "AX T2 FLAIR") -> Path:
    """A patient folder with the four modalities, a localiser and DWI, nested like a PACS export."""
    folder = site / patient
    for number, description in enumerate(
        ["3 PLANE LOC", "AX T1 SE", "AX T2 FSE", t2f, "AX DWI", "AX T1 POST GAD"], start=1
    ):
        write_series(
            folder / "STUDY1" / f"SE{number:03d}", description=description,
            series_uid=f"1.2.840.99.{number}", n=4,
        )  # fmt: skip
    return folder


def test_dicom_study_layout_finds_one_series_per_modality(tmp_path: Path) -> None:
    folder = write_study(tmp_path)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((16, 12, 4), np.uint8), affine), folder / "seg.nii.gz")
    scan = scan_cases(tmp_path, "dicom-study")
    assert scan.bad == []
    [case] = scan.cases
    uids = {m: s.series_uid for m, s in case.modalities.items()}
    assert uids == {"t1n": "1.2.840.99.2", "t2w": "1.2.840.99.3", "t2f": "1.2.840.99.4",
                    "t1c": "1.2.840.99.6"}  # fmt: skip
    assert all(s.path == folder for s in case.modalities.values())
    assert case.seg is not None and case.seg.path == folder / "seg.nii.gz"
    assert (case.case_id, case.label_scheme, case.layout) == (
        "patient01",
        "brats2023",
        "dicom-study",
    )
    image = read_source(case.modalities["t2f"])
    assert image.GetSize() == (16, 12, 4)
    assert len(source_sha256(case.modalities["t1c"])) == 64


def test_dicom_study_ambiguity_lists_the_candidates(tmp_path: Path) -> None:
    folder = write_study(tmp_path)
    write_series(folder / "extra", description="COR T1 +C", series_uid="1.2.840.99.7", n=4)
    scan = DICOM_STUDY.scan(tmp_path)
    assert scan.cases == []
    [bad] = scan.bad
    assert bad.case_id == "patient01" and bad.file == str(folder)
    assert "2 series look like t1c" in bad.reason
    assert "1.2.840.99.6 'AX T1 POST GAD' (4 files)" in bad.reason
    assert "1.2.840.99.7 'COR T1 +C' (4 files)" in bad.reason
    assert "\n" not in bad.reason


def test_dicom_study_missing_modality_is_named(tmp_path: Path) -> None:
    write_study(tmp_path, t2f="AX BRAIN DF")  # a description the defaults do not know
    [bad] = DICOM_STUDY.scan(tmp_path).bad
    assert bad.reason.startswith("no t2f series")
    assert "1.2.840.99.4 'AX BRAIN DF' (4 files) -> ?" in bad.reason


def test_dicom_site_rules_file_overrides_the_defaults(tmp_path: Path) -> None:
    write_study(tmp_path, t2f="AX BRAIN DF")
    (tmp_path / RULES_FILE).write_text("[[rule]]\nmodality = 't2f'\npattern = '\\bDF$'\n")
    [case] = DICOM_STUDY.scan(tmp_path).cases
    assert case.modalities["t2f"].series_uid == "1.2.840.99.4"
    # Site rules come first: they can also take a series away from a default modality.
    (tmp_path / RULES_FILE).write_text(
        "[[rule]]\nmodality = 't2f'\npattern = 'DF$'\n"
        "[[rule]]\nmodality = 't1c'\npattern = 'T2 FSE'\n"
    )
    [bad] = DICOM_STUDY.scan(tmp_path).bad
    assert "2 series look like t1c" in bad.reason and "no t2w series" in bad.reason


def test_dicom_site_rules_can_replace_the_defaults(tmp_path: Path) -> None:
    write_study(tmp_path)
    (tmp_path / RULES_FILE).write_text(
        "defaults = false\n[[rule]]\nmodality = 't2f'\npattern = 'FLAIR'\n"
    )
    [bad] = DICOM_STUDY.scan(tmp_path).bad
    assert "no t1n series" in bad.reason and "no t2f" not in bad.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[[rule]]\nmodality = 't3'\npattern = 'X'\n", "modality must be one of"),
        ("[[rule]]\nmodality = 't2f'\npatern = 'X'\n", "unknown key 'patern'"),
        ("[[rule]]\nmodality = 't2f'\n", "no condition"),
        ("[[rule]]\nmodality = 't2f'\npattern = '(['\n", "rule 1:"),
        ("[[rule]\n", "invalid rules file"),
    ],
)
def test_dicom_invalid_rules_file_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    write_study(tmp_path)
    (tmp_path / RULES_FILE).write_text(text)
    with pytest.raises(DataError) as info:
        DICOM_STUDY.scan(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / RULES_FILE}: ")
    assert reason in str(info.value)


def test_dicom_study_detection_counts_dicom_patients_only(tmp_path: Path) -> None:
    dicom_site, nifti_site = tmp_path / "dicom", tmp_path / "nifti"
    write_study(dicom_site, "p1")
    write_study(dicom_site, "p2")
    case = nifti_site / "BraTS-GLI-00001-000"
    case.mkdir(parents=True)
    for token in ("t1n", "t1c", "t2w", "t2f"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
                 case / f"{case.name}-{token}.nii.gz")  # fmt: skip
    assert LAYOUTS["dicom-study"].count_cases(dicom_site) == 2
    assert DICOM_STUDY.count_cases(nifti_site) == 0
    assert detect_layout(dicom_site) == "dicom-study"
    assert detect_layout(nifti_site) == "brats2023"


def test_dicom_study_patient_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    write_study(tmp_path, "p1")
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "notes.txt").write_text("scans still on the PACS")
    scan = DICOM_STUDY.scan(tmp_path)
    assert [c.case_id for c in scan.cases] == ["p1"]
    [bad] = scan.bad
    assert (bad.case_id, bad.reason) == ("p2", "no DICOM image series found")
