"""The ``dicom-study`` layout: one folder of DICOM files per patient, one series per modality.

``SITE/<patient>/`` holds the patient's DICOM files in any sub-folder structure; each of
t1n, t1c, t2w and t2f is one series, recognised from its SeriesDescription (the
ProtocolName when the description is empty) and its sequence parameters.  An optional label
map ``SITE/<patient>/seg.nii.gz`` (NIfTI, on the t1n series' grid, scheme ``brats2023``
unless the layout is built with another) makes the case labelled.  Each modality becomes a
``Source(path=<patient folder>, series_uid=<uid>)``.  A case with two candidate series for a
modality, or none, is refused with a one-line error listing the candidates (uid and
description), so the site can fix it with a rules file.

Rules
-----
Series are matched against an ordered table of rules; the first rule that matches decides.
The default table is :data:`DEFAULT_RULES_TOML`.  A site overrides it with
``SITE/dicom-series.toml`` (:data:`RULES_FILE`), whose rules are tried before the defaults::

    # defaults = false        # uncomment to use only the rules below
    [[rule]]
    modality = "t2f"          # t1n, t1c, t2w, t2f, or "ignore" to skip the series
    pattern = 'DARK ?FLUID'   # regex, searched in the description
    [[rule]]
    modality = "ignore"
    pattern = '^COR\\b'        # coronal duplicates: keep the axial series

Every key but ``modality`` is a condition, and a rule matches when all its conditions hold
(a condition on an absent header value fails):

- ``pattern``: a Python regex (or a list of them, all of which must match) searched,
  ignoring case, in the description (the ProtocolName when the description is empty)
  upper-cased with ``_ - / ( ) . , : ;`` turned into spaces (``t1_mprage`` reads
  ``T1 MPRAGE``, so ``\\bT1`` finds it); write regexes in single-quoted TOML strings,
  which keep backslashes as they are;
- ``contrast``: true when ContrastBolusAgent (or enhanced MR's contrast usage) is set;
- ``te_min``, ``te_max``, ``tr_min``, ``tr_max``, ``ti_min``, ``ti_max``: EchoTime,
  RepetitionTime, InversionTime bounds in ms (inclusive);
- ``scanning_sequence``, ``image_type``: a code that must be among ScanningSequence (e.g.
  ``"IR"``) or ImageType (e.g. ``"DERIVED"``);
- ``acquisition_contrast``: enhanced MR's AcquisitionContrast (``T1``, ``T2``, ``FLAIR``...).

Detection (:meth:`DicomStudyLayout.count_cases`) counts patient folders where one of the
first few files carries the DICOM marker, so NIfTI-only folders are never claimed.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_adapters.errors import DataError, SkippedCase
from data_adapters.layouts import MODALITIES, CaseScan, RawCase, case_dirs
from data_adapters.sources import Source

if TYPE_CHECKING:
    from data_adapters.dicom import SeriesInfo

#: A site's rules file, in the raw site folder.
RULES_FILE = "dicom-series.toml"
#: The label map's file name in a patient folder (``.nii`` is accepted too).
SEG_NAMES = ("seg.nii.gz", "seg.nii")
IGNORE = "ignore"
#: Files probed per patient folder when detecting the layout.
PROBE_FILES = 32

_T1 = r"(\bT1|MP ?RAGE|\bSPGR|FSPGR|\bBRAVO|\bTFE\b|\bVIBE\b)"

#: The default rules (TOML, same format as a site's rules file); first match wins.
DEFAULT_RULES_TOML = rf"""
[[rule]]  # localisers, scouts, calibration
modality = "ignore"
pattern = '\b(LOC|LOCALI[SZ]ER|SCOUT|SURVEY|PILOT|3 ?PLANE|TRI ?PLANE|CAL|CALIBRATION)\b'
[[rule]]  # diffusion, perfusion, susceptibility
modality = "ignore"
pattern = '\b(DWI|DTI|DIFF\w*|E?ADC|TRACE|EXP|SWI|SWAN|SUSC\w*|PERF\w*|PWI|DSC|DCE|P?C?ASL)\b'
[[rule]]  # angiography, spectroscopy, parameter maps, derived images
modality = "ignore"
pattern = '\b(CBF|CBV|MTT|TTP|TOF|MRA|ANGIO\w*|VENO\w*|SPECT\w*|MRS|CSI|SVS|\w*MAP|MIP|MPR|SUB)\b'
[[rule]]  # T1 explicitly before contrast
modality = "t1n"
pattern = ['{_T1}', '\bPRE\b|\bW ?O\b|WITHOUT|\bNON ?(C|CE|CON\w*)\b|\bNATIVE?\b']
[[rule]]  # T1 after contrast, said in the description
modality = "t1c"
pattern = ['{_T1}', '\bPOST|\+ ?C\b|\+ ?GA?D|\bGAD\w*|\bGD\b|\bCE\b|\bC\+|CONTRAST|\bW ?C\b|\bKM\b']
[[rule]]  # T1 with a contrast agent in the header
modality = "t1c"
pattern = '{_T1}'
contrast = true
[[rule]]  # other T1: SE, MPRAGE, SPGR, T1 FLAIR (a T1 sequence)
modality = "t1n"
pattern = '{_T1}'
[[rule]]
modality = "t2f"
pattern = '(FLAIR|DARK ?FLUID|\bTIRM\b|\bT2 ?IR\b)'
[[rule]]  # T2*, gradient echo, proton density without T2
modality = "ignore"
pattern = '(T2\*|T2 ?STAR|\bGRE\b|\bFFE\b|\bHEMO|^(?!.*\bT2).*\bPD\b)'
[[rule]]
modality = "t2w"
pattern = '(\bT2|\bTSE\b|\bFSE\b|\bFRFSE\b|\bHASTE\b|\bPROPELLER\b|\bBLADE\b)'
[[rule]]  # from here on, sequence parameters alone (descriptions that name no contrast)
modality = "t2f"
acquisition_contrast = "FLAIR"
[[rule]]  # inversion recovery with a long TI nulls fluid: FLAIR
modality = "t2f"
ti_min = 1500
[[rule]]
modality = "t1c"
acquisition_contrast = "T1"
contrast = true
[[rule]]
modality = "t1n"
acquisition_contrast = "T1"
[[rule]]
modality = "t2w"
acquisition_contrast = "T2"
[[rule]]  # short TE and TR: T1-weighted spin echo
modality = "t1c"
te_max = 30
tr_max = 1000
contrast = true
[[rule]]
modality = "t1n"
te_max = 30
tr_max = 1000
[[rule]]  # long TE and TR: T2-weighted
modality = "t2w"
te_min = 60
tr_min = 2000
"""

_BOUNDS = ("te_min", "te_max", "tr_min", "tr_max", "ti_min", "ti_max")
_KEYS = {"modality", "pattern", "contrast", "scanning_sequence", "image_type"}
_KEYS |= {"acquisition_contrast", *_BOUNDS}


@dataclass(frozen=True)
class SeriesRule:
    """One row of the rules table: a modality and the conditions a series must meet."""

    modality: str
    patterns: tuple[re.Pattern[str], ...] = ()
    contrast: bool | None = None
    bounds: tuple[tuple[str, float], ...] = ()
    scanning_sequence: str | None = None
    image_type: str | None = None
    acquisition_contrast: str | None = None

    def matches(self, series: SeriesInfo) -> bool:
        """Whether every condition of the rule holds for ``series``."""
        text = series_text(series)
        if not all(pattern.search(text) for pattern in self.patterns):
            return False
        if self.contrast is not None and bool(series.contrast_agent) != self.contrast:
            return False
        times = {"te": series.echo_time, "tr": series.repetition_time, "ti": series.inversion_time}
        for key, limit in self.bounds:
            value = times[key[:2]]
            if value is None or (value < limit if key.endswith("min") else value > limit):
                return False
        return (
            (self.scanning_sequence is None or self.scanning_sequence in series.scanning_sequence)
            and (self.image_type is None or self.image_type in series.image_type)
            and (
                self.acquisition_contrast is None
                or self.acquisition_contrast == series.acquisition_contrast.upper()
            )
        )


def series_text(series: SeriesInfo) -> str:
    """The text patterns search: description (else protocol), upper case, punctuation spaced."""
    text = series.description or series.protocol
    return " ".join(re.sub(r"[_\-/().,:;]", " ", text.upper()).split())


def parse_rules(data: Mapping[str, Any], source: Path) -> tuple[SeriesRule, ...]:
    """Rules from a parsed TOML table (``[[rule]]`` entries); DataError names ``source``."""
    rules = []
    for number, entry in enumerate(data.get("rule", []), start=1):
        where = f"rule {number}"
        if not isinstance(entry, dict):
            raise DataError(source, f"{where}: expected a [[rule]] table")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise DataError(source, f"{where}: unknown key {unknown[0]!r} (known: {sorted(_KEYS)})")
        modality = entry.get("modality")
        if modality not in (*MODALITIES, IGNORE):
            raise DataError(source, f"{where}: modality must be one of {[*MODALITIES, IGNORE]}")
        if len(entry) == 1:
            raise DataError(source, f"{where}: no condition (it would match every series)")
        try:
            texts = entry.get("pattern", [])
            texts = [texts] if isinstance(texts, str) else list(texts)
            patterns = tuple(re.compile(str(text), re.IGNORECASE) for text in texts)
            bounds = tuple((k, float(entry[k])) for k in _BOUNDS if k in entry)
        except (re.error, TypeError, ValueError) as err:
            raise DataError(source, f"{where}: {err}") from err
        rules.append(
            SeriesRule(
                modality=modality,
                patterns=patterns,
                contrast=bool(entry["contrast"]) if "contrast" in entry else None,
                bounds=bounds,
                scanning_sequence=_code(entry.get("scanning_sequence")),
                image_type=_code(entry.get("image_type")),
                acquisition_contrast=_code(entry.get("acquisition_contrast")),
            )
        )
    return tuple(rules)


def _code(value: Any) -> str | None:
    return None if value is None else str(value).strip().upper()


DEFAULT_RULES: tuple[SeriesRule, ...] = parse_rules(
    tomllib.loads(DEFAULT_RULES_TOML), Path("DEFAULT_RULES_TOML")
)


def load_rules(path: Path) -> tuple[SeriesRule, ...]:
    """A site's rules file followed by the default rules (unless it says ``defaults = false``)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DataError(path, f"invalid rules file ({err})") from err
    rules = parse_rules(data, path)
    return rules + DEFAULT_RULES if data.get("defaults", True) else rules


def classify(series: SeriesInfo, rules: tuple[SeriesRule, ...] = DEFAULT_RULES) -> str | None:
    """The modality (or ``"ignore"``) of the first rule ``series`` matches; None if none does."""
    return next((rule.modality for rule in rules if rule.matches(series)), None)


@dataclass(frozen=True)
class DicomStudyLayout:
    """Patient folders of DICOM files; modalities recognised by :func:`classify`."""

    name: str = "dicom-study"
    label_scheme: str = "brats2023"
    rules: tuple[SeriesRule, ...] = field(default=DEFAULT_RULES, repr=False)

    def count_cases(self, raw_dir: Path) -> int:
        """Patient folders where one of the first files probed is a DICOM file."""
        return sum(_holds_dicom(d) for d in case_dirs(raw_dir))

    def scan(self, raw_dir: Path) -> CaseScan:
        """Cases with one series per modality; the others are refused with the candidates."""
        rules_file = raw_dir / RULES_FILE
        rules = load_rules(rules_file) if rules_file.is_file() else self.rules
        scan = CaseScan()
        for case_dir in case_dirs(raw_dir):
            try:
                scan.cases.append(self.case(raw_dir, case_dir, rules=rules))
            except DataError as err:
                scan.bad.append(SkippedCase.from_error(case_dir.name, err))
        return scan

    def single_case(self, case_dir: Path) -> RawCase | None:
        """``case_dir`` as one patient's case (with the site's rules file beside it, if
        any), or None when it holds no DICOM; a DataError names what a DICOM folder lacks.
        Reads that one folder, not the whole site."""
        if not case_dir.is_dir() or not _holds_dicom(case_dir):
            return None
        rules_file = case_dir.parent / RULES_FILE
        rules = load_rules(rules_file) if rules_file.is_file() else self.rules
        return self.case(case_dir.parent, case_dir, rules=rules)

    def case(
        self, raw_dir: Path, case_dir: Path, *, rules: tuple[SeriesRule, ...] | None = None
    ) -> RawCase:
        """One patient folder as a case, or a DataError naming what is missing or ambiguous."""
        from data_adapters.dicom import list_series  # pydicom loads only when DICOM is used

        rules = self.rules if rules is None else rules
        series = [s for s in list_series(case_dir) if s.n_frames > 0]
        if not series:
            raise DataError(case_dir, "no DICOM image series found")
        found: dict[str, list[SeriesInfo]] = {m: [] for m in MODALITIES}
        for info in series:
            modality = classify(info, rules)
            if modality in found:
                found[modality].append(info)
        problems = []
        for modality, candidates in found.items():
            if len(candidates) > 1:
                listed = ", ".join(s.describe() for s in candidates)
                problems.append(f"{len(candidates)} series look like {modality}: {listed}")
            elif not candidates:
                problems.append(f"no {modality} series")
        if problems:
            listing = ", ".join(f"{s.describe()} -> {classify(s, rules) or '?'}" for s in series)
            raise DataError(case_dir, f"{'; '.join(problems)} (series: {listing or 'none'})")
        seg = next((case_dir / n for n in SEG_NAMES if (case_dir / n).is_file()), None)
        return RawCase(
            case_id=case_dir.name,
            modalities={m: Source(case_dir, series_uid=c[0].uid) for m, c in found.items()},
            seg=Source(seg) if seg is not None else None,
            label_scheme=self.label_scheme,
            root=raw_dir,
            layout=self.name,
        )


def _holds_dicom(folder: Path) -> bool:
    """Whether one of the first :data:`PROBE_FILES` files under ``folder`` is DICOM."""
    probed = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.lower().endswith((".nii", ".nii.gz", ".toml")):
                continue
            try:
                with open(os.path.join(root, name), "rb") as stream:
                    if stream.read(132)[128:] == b"DICM":
                        return True
            except OSError:
                pass
            probed += 1
            if probed >= PROBE_FILES:
                return False
    return False


#: The registered layout.
DICOM_STUDY = DicomStudyLayout()
