# nibabel ships py.typed but leaves most methods unannotated.
# mypy: disable-error-code="no-untyped-call"
"""One writer per raw layout: where a site puts a case's files and what it names them.

- ``brats2023``: ``BraTS-GLI-00012-000/BraTS-GLI-00012-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
- ``brats2021``: ``BraTS2021_00012/BraTS2021_00012_{t1,t1ce,t2,flair,seg}.nii.gz``
- ``dicom-study``: ``SYNTH-01012/<n>_<series>/IM_0001.dcm ...`` and ``seg.nii.gz``
  (see :mod:`fedseg.synth.dicom_study`)
- ``msd``: ``imagesTr/BRATS_3012.nii.gz`` (4D, volumes FLAIR, T1w, t1gd, T2w),
  ``labelsTr/BRATS_3012.nii.gz`` and a ``dataset.json`` like MSD Task01's
- ``nnunet-raw``: ``imagesTr/<case>_0000.nii.gz`` .. ``_0003``, ``labelsTr/<case>.nii.gz``
  and an nnU-Net v2 ``dataset.json`` declaring BraTS regions over BraTS 2023 values
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedseg.synth.dicom_study import SERIES_OF_MODALITY, write_study
from fedseg.synth.profiles import LAYOUTS, MODALITIES, SiteProfile
from fedseg.synth.render import RenderedCase, nifti_image

# File suffix per canonical modality name in the two BraTS folder layouts.
_BRATS_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2023": {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "seg"},
    "brats2021": {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"},
}
#: MSD Task01 volume order and names, as its dataset.json declares them.
MSD_CHANNELS: tuple[tuple[str, str], ...] = (
    ("t2f", "FLAIR"),
    ("t1n", "T1w"),
    ("t1c", "t1gd"),
    ("t2w", "T2w"),
)
#: nnU-Net channel order and names (as Dataset137_BraTS2021 declares them).
NNUNET_CHANNELS: tuple[tuple[str, str], ...] = (
    ("t1n", "T1"),
    ("t1c", "T1ce"),
    ("t2w", "T2"),
    ("t2f", "FLAIR"),
)
DATASET_JSON = "dataset.json"


def case_name(layout: str, number: int) -> str:
    """Case id of case ``number`` in a layout (its folder, patient or file stem)."""
    names = {
        "brats2021": f"BraTS2021_{number:05d}",
        "brats2023": f"BraTS-GLI-{number:05d}-000",
        "dicom-study": f"SYNTH-{number:05d}",
        "msd": f"BRATS_{number:03d}",
        "nnunet-raw": f"BraTS-GLI-{number:05d}-000",
    }
    if layout not in names:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    return names[layout]


def case_files(site_dir: Path, layout: str, number: int) -> dict[str, Path]:
    """Paths of a case's images by canonical modality, and ``"seg"``.

    A DICOM modality is its series folder; the four MSD modalities share one 4D file.
    """
    name, site_dir = case_name(layout, number), Path(site_dir)
    if layout in _BRATS_SUFFIXES:
        sep = "_" if layout == "brats2021" else "-"
        suffixes = _BRATS_SUFFIXES[layout]
        return {k: site_dir / name / f"{name}{sep}{s}.nii.gz" for k, s in suffixes.items()}
    if layout == "dicom-study":
        files = {m: site_dir / name / SERIES_OF_MODALITY[m].folder for m in MODALITIES}
        return {**files, "seg": site_dir / name / "seg.nii.gz"}
    labels = site_dir / "labelsTr" / f"{name}.nii.gz"
    if layout == "msd":
        return {
            **dict.fromkeys(MODALITIES, site_dir / "imagesTr" / f"{name}.nii.gz"),
            "seg": labels,
        }
    channel = {m: i for i, (m, _) in enumerate(NNUNET_CHANNELS)}
    files = {m: site_dir / "imagesTr" / f"{name}_{channel[m]:04d}.nii.gz" for m in MODALITIES}
    return {**files, "seg": labels}


def write_case(
    profile: SiteProfile, case: RenderedCase, site_dir: Path, *, number: int, uid_root: str
) -> str:
    """Write case ``number`` of a site in the site's layout; return its case id."""
    name = case_name(profile.layout, number)
    paths = case_files(site_dir, profile.layout, number)
    if profile.layout == "dicom-study":
        institution = f"{profile.name.replace('-', ' ').title()} (synthetic)"
        write_study(
            case, site_dir / name, patient_id=name, uid_root=uid_root, institution=institution
        )
        return name
    for path in {p.parent for p in paths.values()}:
        path.mkdir(parents=True, exist_ok=True)
    if profile.layout == "msd":
        volumes = np.stack([case.images[m] for m, _ in MSD_CHANNELS], axis=-1)
        nib.save(nifti_image(volumes, case.affine), paths["t2f"])
    else:
        for modality, array in case.images.items():
            nib.save(nifti_image(array, case.affine), paths[modality])
    nib.save(nifti_image(case.seg, case.affine), paths["seg"])
    return name


def finish_site(profile: SiteProfile, site_dir: Path, case_ids: list[str]) -> None:
    """Write what a layout keeps beside its cases (dataset.json for MSD and nnU-Net)."""
    if profile.layout == "msd":
        info = msd_dataset_json(case_ids)
    elif profile.layout == "nnunet-raw":
        info = nnunet_dataset_json(profile, len(case_ids))
    else:
        return
    (site_dir / DATASET_JSON).write_text(json.dumps(info, indent=4) + "\n")


def msd_dataset_json(case_ids: list[str]) -> dict[str, Any]:
    """A dataset.json shaped like MSD Task01_BrainTumour's (every case labelled)."""
    return {
        "name": "BRATS",
        "description": "Synthetic gliomas (fedseg.synth) in MSD Task01_BrainTumour form",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "relase": "2.0 04/05/2018",  # sic: the real Task01 file spells it so
        "tensorImageSize": "4D",
        "modality": {str(i): name for i, (_, name) in enumerate(MSD_CHANNELS)},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids
        ],
        "test": [],
    }


def nnunet_dataset_json(profile: SiteProfile, n_training: int) -> dict[str, Any]:
    """An nnU-Net v2 dataset.json with BraTS regions over the site's label values."""
    netc, snfh, et = profile.label_values
    return {
        "channel_names": {str(i): name for i, (_, name) in enumerate(NNUNET_CHANNELS)},
        # Region-based, as nnU-Net trains BraTS: WT = all tumour, TC = NETC + ET, ET.
        "labels": {
            "background": 0,
            "whole tumor": sorted((netc, snfh, et)),
            "tumor core": sorted((netc, et)),
            "enhancing tumor": [et],
        },
        # The value painted for each region, in the order of `labels` (nnU-Net's rule).
        "regions_class_order": [snfh, netc, et],
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "name": "Dataset500_SynthBraTS",
        "description": "Synthetic gliomas (fedseg.synth), BraTS 2023 label values",
        "reference": "fedseg.synth",
        "licence": "CC0",
        "release": "1.0",
    }
