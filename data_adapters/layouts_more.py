# nibabel ships py.typed but leaves most methods unannotated.
# mypy: disable-error-code="no-untyped-call"
"""Dataset layouts described by a ``dataset.json``: MSD Task01 (4D) and nnU-Net v2 raw.

Both keep ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and ``imagesTs/`` (unlabelled
cases).  They differ in how a case's four modalities are stored:

- **MSD** (Medical Segmentation Decathlon, Task01_BrainTumour): one 4D NIfTI per case,
  ``imagesTr/BRATS_001.nii.gz``; the volume order is declared in ``modality``
  (``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``).
- **nnU-Net raw** (v2): one 3D file per channel, ``imagesTr/<case>_0000<file_ending>``
  ... ``_0003``; the order is declared in ``channel_names`` (nnU-Net v1's legacy
  ``modality`` key is read too) and the file suffix in ``file_ending``.

Modalities are matched by name, never by position: FLAIR/t2f -> t2f, T1/T1w/t1n/native ->
t1n, T1ce/T1Gd/t1c/T1-contrast -> t1c, T2/T2w/t2w -> t2w (case, spaces and dashes
ignored); any other name is refused.  Labels come from the declared ``labels`` by name
(:func:`data_adapters.labels.scheme_from_names`): MSD's ``{"1": "edema", ...}`` form,
nnU-Net's ``{"edema": 1, ...}`` form, and nnU-Net's region-based BraTS form
(``{"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}``, raw values
1 oedema, 2 non-enhancing, 3 enhancing, as Dataset137 writes them).  A layout object
built with ``label_scheme=...`` uses that registered scheme instead.  nnU-Net's optional
``dataset`` key (explicit file lists) and its ``ignore`` label are not supported.

Detection: a ``dataset.json`` with ``channel_names``, or image files with the ``_0000``
channel suffix, is nnU-Net; otherwise a ``dataset.json`` beside ``imagesTr`` is MSD.  So
at most one of the two ever recognises a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib

from data_adapters.errors import DataError, SkippedCase
from data_adapters.labels import get_scheme, scheme_from_names
from data_adapters.layouts import MODALITIES, NIFTI_EXTENSIONS, CaseScan, RawCase
from data_adapters.readers import READERS
from data_adapters.sources import Source

DATASET_JSON = "dataset.json"
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES = "imagesTr", "labelsTr", "imagesTs"

# Modality names as datasets spell them, lower case with anything but letters and digits removed.
_MODALITY_NAMES: dict[str, tuple[str, ...]] = {
    "t1n": ("t1", "t1n", "t1w", "native", "t1native", "t1pre", "t1precontrast"),
    "t1c": (
        "t1ce", "t1c", "t1gd", "t1wce", "t1contrast", "t1post", "t1postcontrast",
        "t1postgd", "t1gad", "t1wgd",
    ),
    "t2w": ("t2", "t2w"),
    "t2f": ("flair", "t2f", "t2flair", "t2wflair"),
}  # fmt: skip
_MODALITY_OF_NAME = {n: m for m, names in _MODALITY_NAMES.items() for n in names}
_KNOWN = "known: T1/T1w/native, T1ce/T1Gd/T1-contrast, T2/T2w, FLAIR/T2-FLAIR, or t1n/t1c/t2w/t2f"
_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")


def modality_of(name: str) -> str | None:
    """The canonical modality a dataset's channel name means, or None if unknown."""
    return _MODALITY_OF_NAME.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def read_dataset_json(raw_dir: Path) -> dict[str, Any]:
    """Parse ``raw_dir/dataset.json``, refusing a missing or malformed one."""
    path = raw_dir / DATASET_JSON
    if not path.is_file():
        raise DataError(path, "dataset.json not found")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot be read as JSON ({err})") from err
    if not isinstance(info, dict):
        raise DataError(path, "expected a JSON object")
    return info


def dataset_kind(raw_dir: Path) -> str | None:
    """``"nnunet-raw"``, ``"msd"`` or None: which dataset.json layout ``raw_dir`` holds."""
    if not (raw_dir / DATASET_JSON).is_file() or not (raw_dir / TRAIN_IMAGES).is_dir():
        return None
    try:
        keys = set(read_dataset_json(raw_dir))
    except DataError:
        keys = set()  # still detected by its files; scanning then names the JSON problem
    if "channel_names" in keys:
        return "nnunet-raw"
    # nnU-Net v1 kept MSD's "modality" key (even "tensorImageSize": "4D"): files decide.
    has_channel_zero = any(
        (split := _split_channel(p)) is not None and split[1] == 0
        for folder in (TRAIN_IMAGES, TEST_IMAGES)
        for p in _image_files(raw_dir / folder)
    )
    return "nnunet-raw" if has_channel_zero else "msd"


def channel_map(declared: Any, *, path: Path, key: str) -> dict[str, int]:
    """Canonical modality -> channel index, from a ``{"0": "FLAIR", ...}`` declaration.

    Raises
    ------
    DataError
        Naming ``path`` and ``key`` if the declaration is not a mapping of channel
        indices to names, a name is unknown, or a modality is missing or declared twice.
    """
    if not isinstance(declared, Mapping) or not declared:
        raise DataError(path, f"{key!r} must map channel indices to modality names")
    channels: dict[str, int] = {}
    for index_text, name in declared.items():
        if not str(index_text).isdigit() or not isinstance(name, str):
            raise DataError(path, f"{key}[{index_text!r}]: expected '<index>': '<name>'")
        modality = modality_of(name)
        if modality is None:
            raise DataError(path, f"{key}[{index_text!r}] = {name!r}: unknown modality ({_KNOWN})")
        if modality in channels:
            raise DataError(path, f"{key}[{index_text!r}] = {name!r}: {modality} declared twice")
        channels[modality] = int(index_text)
    missing = [m for m in MODALITIES if m not in channels]
    if missing:
        raise DataError(path, f"{key!r} lacks {', '.join(missing)}")
    return channels


def _declared_scheme(
    info: Mapping[str, Any], override: str | None, *, path: Path, default: str | None
) -> str:
    """The label scheme: the override, else derived from ``labels``, else ``default``."""
    if override is not None:
        return get_scheme(override).name
    labels = info.get("labels")
    if labels is None:
        if default is None:
            raise DataError(path, "'labels' is missing")
        return default
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(path, "'labels' must be a non-empty object")
    # MSD writes {"<value>": "<name>"}, nnU-Net {"<name>": <value or [values]>}.
    msd_form = all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items())
    pairs = (
        [(str(v), int(k)) for k, v in labels.items()]
        if msd_form
        else [(str(k), _label_value(v, path=path, name=str(k))) for k, v in labels.items()]
    )
    return scheme_from_names(pairs, path=path, source=f"{path} labels").name


def _label_value(value: Any, *, path: Path, name: str) -> int | list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise DataError(path, f"labels[{name!r}] = {value!r}: expected an integer or list of them")


def _image_files(folder: Path, *, ending: str | None = None) -> list[Path]:
    """Image files in ``folder`` (none if absent); macOS ``._*`` and other hidden files skipped."""
    if not folder.is_dir():
        return []
    endings = (ending,) if ending else NIFTI_EXTENSIONS
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(endings)
    )


def _stem(path: Path, ending: str | None = None) -> str:
    """File name without its image suffix (``.nii.gz`` counts as one)."""
    for suffix in (ending,) if ending else NIFTI_EXTENSIONS:
        if path.name.lower().endswith(suffix.lower()):
            return path.name[: -len(suffix)]
    return path.name


def _split_channel(path: Path, ending: str | None = None) -> tuple[str, int] | None:
    """``(case, channel)`` of an nnU-Net channel file name, or None."""
    match = _CHANNEL_FILE.fullmatch(_stem(path, ending))
    return (match["case"], int(match["channel"])) if match else None


def _label_file(raw_dir: Path, case_id: str, endings: tuple[str, ...]) -> Path | None:
    found = [raw_dir / TRAIN_LABELS / f"{case_id}{e}" for e in endings]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise DataError(found[0], "both .nii and .nii.gz label files")
    return found[0] if found else None


@dataclass(frozen=True, kw_only=True)
class MsdLayout:
    """MSD Task01_BrainTumour: 4D ``imagesTr/*.nii.gz``, ``labelsTr/``, ``imagesTs/``.

    ``label_scheme`` overrides the scheme derived from dataset.json ``labels`` (``msd``
    for the real Task01 file, and when ``labels`` is absent).
    """

    name: str = "msd"
    label_scheme: str | None = None

    def count_cases(self, raw_dir: Path) -> int:
        """Case files in ``imagesTr`` and ``imagesTs`` when ``raw_dir`` is an MSD dataset."""
        if dataset_kind(raw_dir) != self.name:
            return 0
        return sum(len(_image_files(raw_dir / d)) for d in (TRAIN_IMAGES, TEST_IMAGES))

    def scan(self, raw_dir: Path) -> CaseScan:
        """Every case of the dataset; a bad dataset.json refuses the whole folder."""
        json_path = raw_dir / DATASET_JSON
        info = read_dataset_json(raw_dir)
        if "modality" not in info:
            raise DataError(json_path, "'modality' (the 4D volume order) is missing")
        channels = channel_map(info["modality"], path=json_path, key="modality")
        scheme = _declared_scheme(info, self.label_scheme, path=json_path, default="msd")
        scan = CaseScan()
        for folder, labelled in ((TRAIN_IMAGES, True), (TEST_IMAGES, False)):
            for image in _image_files(raw_dir / folder):
                case_id = _stem(image)
                try:
                    scan.cases.append(
                        self._case(raw_dir, image, channels, scheme, labelled=labelled)
                    )
                except DataError as err:
                    scan.bad.append(SkippedCase.from_error(case_id, err))
        scan.bad.extend(_listed_but_missing(raw_dir, info.get("training")))
        return scan

    def _case(
        self,
        raw_dir: Path,
        image: Path,
        channels: dict[str, int],
        scheme: str,
        *,
        labelled: bool,
    ) -> RawCase:
        case_id = _stem(image)
        _check_volumes(image, len(channels))
        seg = _label_file(raw_dir, case_id, NIFTI_EXTENSIONS) if labelled else None
        if labelled and seg is None:
            raise DataError(raw_dir / TRAIN_LABELS / image.name, "missing label of a training case")
        return RawCase(
            case_id=case_id,
            modalities={m: Source(image, channel=channels[m]) for m in MODALITIES},
            seg=Source(seg) if seg is not None else None,
            label_scheme=scheme,
            root=raw_dir,
            layout=self.name,
        )


def _check_volumes(image: Path, expected: int) -> None:
    """Refuse a case file that is not 4D with one volume per declared modality (header only)."""
    try:
        loaded = nib.load(image)
        shape = tuple(loaded.shape) if isinstance(loaded, nib.Nifti1Image) else ()
    except Exception as err:  # nibabel raises several types for unreadable headers
        raise DataError(image, f"cannot read the NIfTI header ({err})") from err
    if len(shape) != 4 or shape[3] != expected:
        raise DataError(image, f"expected a 4D image with {expected} volumes, got shape {shape}")


def _listed_but_missing(raw_dir: Path, training: Any) -> list[SkippedCase]:
    """Cases that dataset.json's ``training`` list names but whose image is absent."""
    if not isinstance(training, list):
        return []
    why = "listed in dataset.json 'training' but the image file is missing"
    images = [e.get("image") for e in training if isinstance(e, dict)]
    return [
        SkippedCase(_stem(Path(image)), str(raw_dir / image), why)
        for image in images
        if isinstance(image, str) and not (raw_dir / image).is_file()
    ]


@dataclass(frozen=True, kw_only=True)
class NnUNetRawLayout:
    """nnU-Net v2 raw dataset: ``imagesTr/<case>_0000<file_ending>`` per channel.

    ``label_scheme`` overrides the scheme derived from dataset.json ``labels``.
    """

    name: str = "nnunet-raw"
    label_scheme: str | None = None

    def count_cases(self, raw_dir: Path) -> int:
        """Distinct case ids with channel files when ``raw_dir`` is an nnU-Net dataset."""
        if dataset_kind(raw_dir) != self.name:
            return 0
        cases = {
            split[0]
            for d in (TRAIN_IMAGES, TEST_IMAGES)
            for p in _image_files(raw_dir / d)
            if (split := _split_channel(p)) is not None
        }
        return len(cases)

    def scan(self, raw_dir: Path) -> CaseScan:
        """Every case of the dataset; a bad dataset.json refuses the whole folder."""
        json_path = raw_dir / DATASET_JSON
        info = read_dataset_json(raw_dir)
        key = "channel_names" if "channel_names" in info else "modality"
        if key not in info:
            raise DataError(json_path, "'channel_names' is missing")
        if "dataset" in info:
            raise DataError(json_path, "'dataset' (explicit file lists) is not supported")
        channels = channel_map(info[key], path=json_path, key=key)
        ending = _file_ending(info, path=json_path, required=key == "channel_names")
        scheme = _declared_scheme(info, self.label_scheme, path=json_path, default=None)
        scan = CaseScan()
        for folder, labelled in ((TRAIN_IMAGES, True), (TEST_IMAGES, False)):
            files: dict[str, dict[int, Path]] = {}
            for image in _image_files(raw_dir / folder, ending=ending):
                split = _split_channel(image, ending)
                if split is None:
                    scan.bad.append(
                        SkippedCase(_stem(image, ending), str(image), "not named <case>_XXXX")
                    )
                    continue
                files.setdefault(split[0], {})[split[1]] = image
            for case_id, found in sorted(files.items()):
                try:
                    raw = self._case(raw_dir / folder, case_id, found, channels, ending)
                    seg = _label_file(raw_dir, case_id, (ending,)) if labelled else None
                    if labelled and seg is None:
                        expected = raw_dir / TRAIN_LABELS / f"{case_id}{ending}"
                        raise DataError(expected, "missing label of a training case")
                except DataError as err:
                    scan.bad.append(SkippedCase.from_error(case_id, err))
                    continue
                scan.cases.append(
                    RawCase(
                        case_id=case_id,
                        modalities=raw,
                        seg=Source(seg) if seg is not None else None,
                        label_scheme=scheme,
                        root=raw_dir,
                        layout=self.name,
                    )
                )
        return scan

    @staticmethod
    def _case(
        folder: Path, case_id: str, found: dict[int, Path], channels: dict[str, int], ending: str
    ) -> dict[str, Source]:
        """One Source per modality; a missing or undeclared channel file refuses the case."""
        extra = sorted(set(found) - set(channels.values()))
        if extra:
            raise DataError(found[extra[0]], f"channel {extra[0]:04d} is not in dataset.json")
        sources = {}
        for modality, index in channels.items():
            if index not in found:
                expected = folder / f"{case_id}_{index:04d}{ending}"
                raise DataError(expected, f"missing channel {index:04d} ({modality})")
            sources[modality] = Source(found[index])
        return {m: sources[m] for m in MODALITIES}


def _file_ending(info: Mapping[str, Any], *, path: Path, required: bool) -> str:
    """The dataset's image suffix, which must be one the readers support."""
    ending = info.get("file_ending")
    if ending is None and not required:
        return ".nii.gz"  # nnU-Net v1 datasets were always NIfTI
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(path, f"'file_ending' must be a suffix like '.nii.gz', got {ending!r}")
    if ending.lower() not in READERS:
        raise DataError(path, f"file_ending {ending!r} is not readable ({', '.join(READERS)})")
    return ending


#: The layout objects registered in :data:`data_adapters.layouts.LAYOUTS`.
MSD = MsdLayout()
NNUNET_RAW = NnUNetRawLayout()
