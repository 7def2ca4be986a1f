"""Raw site folder layouts: where each case's modality and label files are.

A layout turns a raw site folder into :class:`RawCase` records naming every
case's files by canonical modality (t1n, t1c, t2w, t2f) and its label scheme.
Layouts live in :data:`LAYOUTS`; a new one (MSD 4D, nnU-Net raw, DICOM study,
mapping file) is a new object with ``count_cases`` and ``scan`` methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from data_adapters.errors import DataError, SkippedCase
from data_adapters.sources import Source

#: Canonical modality names, in the order every later step uses.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class RawCase:
    """One raw case: its files by canonical modality, its label file and scheme.

    ``modalities`` maps every canonical name in :data:`MODALITIES` to a file;
    ``seg`` is ``None`` for an unlabelled case; ``root`` is the raw site folder
    (the manifest records paths relative to it).
    """

    case_id: str
    modalities: dict[str, Source]
    seg: Source | None
    label_scheme: str
    root: Path
    layout: str = ""

    @property
    def labelled(self) -> bool:
        """Whether the case has a segmentation."""
        return self.seg is not None

    def sources(self) -> dict[str, Source]:
        """All sources by role (modality names, then ``"seg"`` if any)."""
        files = {name: self.modalities[name] for name in MODALITIES}
        if self.seg is not None:
            files["seg"] = self.seg
        return files


@dataclass(frozen=True)
class CaseScan:
    """What a layout found in a raw folder: usable cases and refused ones."""

    cases: list[RawCase] = field(default_factory=list)
    bad: list[SkippedCase] = field(default_factory=list)


class Layout(Protocol):
    """What the registry needs from a layout."""

    @property
    def name(self) -> str:
        """Registry name, e.g. ``"brats2023"``."""
        ...

    def count_cases(self, raw_dir: Path) -> int:
        """How many cases in ``raw_dir`` this layout recognises (for detection)."""
        ...

    def scan(self, raw_dir: Path) -> CaseScan:
        """Find every case in ``raw_dir``, refusing incomplete ones individually."""
        ...


@dataclass(frozen=True)
class CaseFolderLayout:
    """One folder per case holding ``<case-id><separator><token><ext>`` files."""

    name: str
    separator: str
    tokens: tuple[tuple[str, str], ...]  # (canonical modality, file token)
    seg_token: str
    label_scheme: str

    def _find(self, case_dir: Path, token: str) -> list[Path]:
        stem = f"{case_dir.name}{self.separator}{token}"
        return [
            case_dir / (stem + ext)
            for ext in NIFTI_EXTENSIONS
            if (case_dir / (stem + ext)).is_file()
        ]

    def count_cases(self, raw_dir: Path) -> int:
        """Count case folders holding at least one file named the way this layout names them."""
        all_tokens = [t for _, t in self.tokens] + [self.seg_token]
        return sum(any(self._find(d, t) for t in all_tokens) for d in case_dirs(raw_dir))

    def scan(self, raw_dir: Path) -> CaseScan:
        """Return complete cases; cases missing a modality or with duplicate files are bad."""
        scan = CaseScan()
        for case_dir in case_dirs(raw_dir):
            try:
                scan.cases.append(self._case(raw_dir, case_dir))
            except DataError as err:
                scan.bad.append(SkippedCase.from_error(case_dir.name, err))
        return scan

    def _case(self, raw_dir: Path, case_dir: Path) -> RawCase:
        found: dict[str, Path] = {}
        for modality, token in (*self.tokens, ("seg", self.seg_token)):
            files = self._find(case_dir, token)
            if len(files) > 1:
                raise DataError(files[0], f"both .nii and .nii.gz files for {modality}")
            if files:
                found[modality] = files[0]
            elif modality != "seg":
                expected = case_dir / f"{case_dir.name}{self.separator}{token}.nii.gz"
                raise DataError(expected, f"missing {modality} image (expected .nii.gz or .nii)")
        seg = found.pop("seg", None)
        return RawCase(
            case_id=case_dir.name,
            modalities={m: Source(p) for m, p in found.items()},
            seg=Source(seg) if seg is not None else None,
            label_scheme=self.label_scheme,
            root=raw_dir,
            layout=self.name,
        )


def case_dirs(raw_dir: Path) -> list[Path]:
    """Sub-folders of ``raw_dir`` that may be cases or patients (hidden ones are not)."""
    return sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


#: Known layouts by name.
LAYOUTS: dict[str, Layout] = {
    "brats2023": CaseFolderLayout(
        name="brats2023",
        separator="-",
        tokens=(("t1n", "t1n"), ("t1c", "t1c"), ("t2w", "t2w"), ("t2f", "t2f")),
        seg_token="seg",
        label_scheme="brats2023",
    ),
    "brats2021": CaseFolderLayout(
        name="brats2021",
        separator="_",
        tokens=(("t1n", "t1"), ("t1c", "t1ce"), ("t2w", "t2"), ("t2f", "flair")),
        seg_token="seg",
        label_scheme="brats2021",
    ),
    # BraTS 2024 GLI names files as 2023 does but writes 4 for the resection cavity.
    "brats2024-gli": CaseFolderLayout(
        name="brats2024-gli",
        separator="-",
        tokens=(("t1n", "t1n"), ("t1c", "t1c"), ("t2w", "t2w"), ("t2f", "t2f")),
        seg_token="seg",
        label_scheme="brats2024-gli",
    ),
}
#: Layouts whose files look exactly like another's: only used when named explicitly.
NOT_DETECTED = frozenset({"brats2024-gli"})


def get_layout(name: str) -> Layout:
    """Look up a layout by name (or build one from a ``.toml`` mapping file's path).

    Raises :class:`DataError` for an unknown name or a missing or invalid mapping file.
    """
    if name.endswith(".toml"):
        return mapping_layout(Path(name))
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataError(Path(name), f"unknown layout (known: {', '.join(LAYOUTS)})") from None


def detect_layout(raw_dir: Path) -> str:
    """Name the one registered layout that recognises cases in ``raw_dir``.

    Raises
    ------
    DataError
        If ``raw_dir`` is not a folder, or no layout or several layouts match.
    """
    _require_dir(raw_dir)
    counts = {
        name: layout.count_cases(raw_dir)
        for name, layout in LAYOUTS.items()
        if name not in NOT_DETECTED
    }
    matches = sorted(name for name, count in counts.items() if count > 0)
    if not matches:
        tried = ", ".join(counts)
        raise DataError(raw_dir, f"no case folders of a known layout found (tried {tried})")
    if len(matches) > 1:
        found = ", ".join(f"{name}: {counts[name]} cases" for name in matches)
        raise DataError(raw_dir, f"ambiguous layout ({found}); name one explicitly")
    return matches[0]


def scan_cases(raw_dir: Path, layout: str) -> CaseScan:
    """Find the cases of ``raw_dir`` under ``layout``, with the refused ones."""
    _require_dir(raw_dir)
    return get_layout(layout).scan(raw_dir)


def list_cases(raw_dir: Path, layout: str) -> list[RawCase]:
    """Return the complete cases of ``raw_dir`` (see :func:`scan_cases` for the bad ones)."""
    return scan_cases(raw_dir, layout).cases


def _require_dir(raw_dir: Path) -> None:
    if not raw_dir.is_dir():
        raise DataError(
            raw_dir, "raw site folder not found" if not raw_dir.exists() else "not a folder"
        )


# Layouts living in their own modules register here (imported last: they use the types above).
from data_adapters.layouts_dicom import DICOM_STUDY  # noqa: E402
from data_adapters.layouts_mapping import mapping_layout  # noqa: E402
from data_adapters.layouts_more import MSD, NNUNET_RAW  # noqa: E402

LAYOUTS[MSD.name] = MSD
LAYOUTS[NNUNET_RAW.name] = NNUNET_RAW
LAYOUTS[DICOM_STUDY.name] = DICOM_STUDY
