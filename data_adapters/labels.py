"""Label schemes as data, and their map onto the canonical BraTS 2023 labels.

Canonical labels: 0 background, 1 NETC (necrotic / non-enhancing core),
2 SNFH (oedema), 3 ET (enhancing tumour).  A new source scheme is a new
:class:`LabelScheme` entry in :data:`SCHEMES`.

Datasets that declare their labels by name (MSD and nnU-Net ``dataset.json``) get a
scheme derived from those names with :func:`scheme_from_names`: the registered scheme
with the same value map when there is one (so the manifest says ``msd``, not a new
name), otherwise a new ``derived:...`` scheme registered for this process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from data_adapters.errors import DataError

#: Canonical label values and names (BraTS 2023).
CANONICAL_LABELS: dict[int, str] = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}
CANONICAL_SCHEME = "brats2023"

T = TypeVar("T")


@dataclass(frozen=True)
class LabelScheme:
    """A source label scheme: which values may occur and what each becomes."""

    name: str
    to_canonical: MappingProxyType[int, int]
    description: str = ""
    #: Source values deliberately mapped to background, with why (e.g. a resection cavity).
    dropped: MappingProxyType[int, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def values(self) -> frozenset[int]:
        """Label values allowed in source files of this scheme."""
        return frozenset(self.to_canonical)


def _scheme(
    name: str,
    mapping: Mapping[int, int],
    description: str,
    *,
    dropped: Mapping[int, str] | None = None,
) -> LabelScheme:
    return LabelScheme(
        name, MappingProxyType(dict(mapping)), description, MappingProxyType(dict(dropped or {}))
    )


_RESECTION_CAVITY = "resection cavity (RC): not tumour, so background"

#: Known source schemes by name.
SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        _scheme("brats2023", {0: 0, 1: 1, 2: 2, 3: 3}, "BraTS 2023: 1 NETC, 2 SNFH, 3 ET"),
        _scheme("brats2021", {0: 0, 1: 1, 2: 2, 4: 3}, "BraTS 2017-2021: 1 NCR, 2 ED, 4 ET"),
        _scheme(
            "brats2024-gli",
            {0: 0, 1: 1, 2: 2, 3: 3, 4: 0},
            "BraTS 2024 GLI (post-treatment): 1 NETC, 2 SNFH, 3 ET; 4 resection cavity (RC)"
            " becomes 0 background because a cavity is not tumour",
            dropped={4: _RESECTION_CAVITY},
        ),
        _scheme(
            "msd",
            {0: 0, 1: 2, 2: 1, 3: 3},
            "MSD Task01_BrainTumour: 1 oedema -> 2 SNFH, 2 non-enhancing tumour -> 1 NETC,"
            " 3 enhancing tumour -> 3 ET",
        ),
    )
}


def get_scheme(name: str) -> LabelScheme:
    """Look up a scheme by name, raising :class:`DataError` for an unknown one."""
    try:
        return SCHEMES[name]
    except KeyError:
        known = ", ".join(sorted(SCHEMES))
        raise DataError(Path(name), f"unknown label scheme (known: {known})") from None


def remap_labels(
    array: npt.NDArray[Any], scheme: LabelScheme | str, *, path: str | Path = "<array>"
) -> npt.NDArray[np.uint8]:
    """Map source label values onto the canonical scheme.

    Parameters
    ----------
    array
        Source segmentation voxels (any numeric dtype holding whole numbers).
    scheme
        The source scheme, or its name in :data:`SCHEMES`.
    path
        The file the array came from, named in errors.

    Returns
    -------
    numpy.ndarray
        uint8 array of canonical labels, same shape.

    Raises
    ------
    DataError
        If a value is not a whole number or not in the scheme; the message
        names the offending values.
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if array.dtype.kind == "f":
        fractional = array != np.round(array)
        if fractional.any():
            bad = np.unique(array[fractional])[:5]
            raise DataError(path, f"label values are not whole numbers: {_fmt(bad)}")
    elif array.dtype.kind not in "iub":
        raise DataError(path, f"label array of unsupported type {array.dtype}")
    values = np.unique(array)
    unknown = [v for v in values.tolist() if int(v) not in scheme.to_canonical]
    if unknown:
        allowed = sorted(scheme.values)
        raise DataError(
            path,
            f"label values {_fmt(unknown)} not in scheme {scheme.name} (allowed {allowed})",
        )
    out = np.zeros(array.shape, dtype=np.uint8)
    for source, target in scheme.to_canonical.items():
        if target != 0 and source in values:
            out[array == source] = target
    return out


def _fmt(values: Any) -> str:
    """Print label values compactly (5, not 5.0)."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def remap_record(array: npt.NDArray[Any], scheme: LabelScheme | str) -> dict[str, Any]:
    """What the remap step did, for the manifest: scheme, value map, and dropped labels.

    Source values a scheme maps to background on purpose (BraTS 2024's resection cavity)
    are listed with the reason and how many voxels of ``array`` (the source labels) held
    them, so a reader of the manifest sees that tumour-like labels were removed.
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    record: dict[str, Any] = {
        "scheme": scheme.name,
        "map": {str(k): v for k, v in scheme.to_canonical.items()},
    }
    if scheme.dropped:
        record["dropped"] = {
            str(value): {"reason": reason, "voxels": int(np.count_nonzero(array == value))}
            for value, reason in scheme.dropped.items()
        }
    return record


# --------------------------------------------------------------------------- schemes by name

# Label names as BraTS-derived datasets spell them (after :func:`_spellings`), by
# canonical value.  Resection-cavity names map to background and are recorded as dropped.
_NAMES_BY_VALUE: dict[int, tuple[str, ...]] = {
    0: ("background", "bg"),
    1: (
        "netc", "ncr", "net", "ncr net", "necrosis", "necrotic", "necrotic core",
        "necrotic tumor", "necrotic tumor core", "necrotic and non enhancing tumor",
        "necrotic and non enhancing tumor core", "non enhancing tumor",
        "non enhancing tumor core", "nonenhancing tumor",
    ),
    2: (
        "snfh", "ed", "edema", "peritumoral edema", "flair hyperintensity",
        "surrounding non enhancing flair hyperintensity",
    ),
    3: ("et", "enhancing", "enhancing tumor", "gd enhancing tumor"),
}  # fmt: skip
_CAVITY_NAMES = frozenset({"rc", "resection cavity", "cavity", "surgical cavity"})
# nnU-Net region names (region-based training declares nested sets of raw values).
_REGION_NAMES: dict[str, tuple[str, ...]] = {
    "WT": ("whole tumor", "wt", "complete tumor"),
    "TC": ("tumor core", "tc"),
    "ET": ("enhancing tumor", "et", "enhancing"),
}
_VALUE_OF_NAME = {n: v for v, names in _NAMES_BY_VALUE.items() for n in names}
_REGION_OF_NAME = {n: r for r, names in _REGION_NAMES.items() for n in names}
_HINT = (
    "known names: NETC/necrosis/non-enhancing tumor, SNFH/edema, ET/enhancing tumor,"
    " background, resection cavity; otherwise name a label scheme explicitly"
)

#: One declared label: a raw value, or (nnU-Net regions) the raw values a region covers.
LabelDeclaration = int | Sequence[int]


def _spellings(name: str) -> list[str]:
    """Spellings of a label name to look up: whole, without and inside parentheses."""
    text = name.lower().replace("tumour", "tumor").replace("oedema", "edema")
    text = re.sub(r"[\s_\-/&+,]+", " ", text)
    parts = [text, re.sub(r"\([^)]*\)", " ", text), *re.findall(r"\(([^)]*)\)", text)]
    return [" ".join(p.split()) for p in parts if p.strip()]


def _lookup(name: str, table: Mapping[str, T]) -> T | None:
    return next((table[s] for s in _spellings(name) if s in table), None)


def scheme_from_names(
    labels: Iterable[tuple[str, LabelDeclaration]], *, path: str | Path, source: str
) -> LabelScheme:
    """The scheme a dataset declares by label name, registered if it is new.

    Parameters
    ----------
    labels
        ``(name, value)`` pairs (``("edema", 1)``), or nnU-Net region-based pairs whose
        values list raw values (``("whole tumor", [1, 2, 3])``; background stays an int).
    path
        The file holding the declaration (``dataset.json``), named in errors.
    source
        Where the declaration came from, for the description of a new scheme.

    Returns
    -------
    LabelScheme
        The registered scheme with the same value map (``msd`` for MSD Task01's
        labels), else a new ``derived:<value>><canonical>,...`` scheme added to
        :data:`SCHEMES`.

    Raises
    ------
    DataError
        If a name is not a recognised BraTS label or region name, a value or region is
        declared twice, or regions are incomplete or not nested.
    """
    pairs: list[tuple[str, LabelDeclaration]] = [
        (str(n), v if isinstance(v, int) else tuple(int(x) for x in v)) for n, v in labels
    ]
    dropped: dict[int, str] = {}
    plain = [(n, v) for n, v in pairs if isinstance(v, int)]
    if len(plain) == len(pairs):
        mapping = _map_from_names(plain, dropped, path=path)
    else:
        mapping = _map_from_regions(pairs, path=path)
    for scheme in SCHEMES.values():
        if dict(scheme.to_canonical) == mapping:
            return scheme
    name = "derived:" + ",".join(f"{k}>{v}" for k, v in sorted(mapping.items()))
    declared = ", ".join(f"{v} {n}" for n, v in pairs)
    scheme = _scheme(name, mapping, f"derived from {source}: {declared}", dropped=dropped)
    return SCHEMES.setdefault(name, scheme)


def _map_from_names(
    pairs: list[tuple[str, int]], dropped: dict[int, str], *, path: str | Path
) -> dict[int, int]:
    """Value map of plain ``name: value`` labels; cavity values are added to ``dropped``."""
    mapping: dict[int, int] = {}
    for name, value in pairs:
        if value in mapping:
            raise DataError(path, f"label value {value} is declared twice (again as {name!r})")
        target = _lookup(name, _VALUE_OF_NAME)
        if target is None and any(s in _CAVITY_NAMES for s in _spellings(name)):
            target, dropped[value] = 0, _RESECTION_CAVITY
        if target is None:
            raise DataError(path, f"label {name!r} (value {value}) is not recognised ({_HINT})")
        mapping[value] = target
    if 0 not in mapping.values():
        raise DataError(path, "the labels declare no background")
    return mapping


def _map_from_regions(
    pairs: list[tuple[str, LabelDeclaration]], *, path: str | Path
) -> dict[int, int]:
    """Value map of nnU-Net regions: ET -> 3, tumour core less ET -> 1, the rest of WT -> 2."""
    regions: dict[str, set[int]] = {}
    mapping: dict[int, int] = {}
    for name, value in pairs:
        if isinstance(value, int) and _lookup(name, _VALUE_OF_NAME) == 0:
            mapping[value] = 0
            continue
        region = _lookup(name, _REGION_OF_NAME)
        if region is None:
            raise DataError(path, f"region {name!r} is not a BraTS region (whole tumor, "
                            "tumor core, enhancing tumor)")  # fmt: skip
        if region in regions:
            raise DataError(path, f"region {name!r} is declared twice")
        regions[region] = {value} if isinstance(value, int) else set(value)
    missing = [r for r in _REGION_NAMES if r not in regions] + ([] if mapping else ["background"])
    if missing:
        raise DataError(path, f"region-based labels lack {', '.join(missing)}")
    wt, tc, et = regions["WT"], regions["TC"], regions["ET"]
    if not et <= tc <= wt:
        raise DataError(path, f"regions are not nested (need ET {sorted(et)} within "
                        f"TC {sorted(tc)} within WT {sorted(wt)})")  # fmt: skip
    for values, target in ((wt - tc, 2), (tc - et, 1), (et, 3)):
        mapping.update(dict.fromkeys(values, target))
    return mapping
