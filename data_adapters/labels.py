"""Label schemes as data, and their map onto the canonical BraTS 2023 labels.

Canonical labels: 0 background, 1 NETC (necrotic / non-enhancing core),
2 SNFH (oedema), 3 ET (enhancing tumour).  A new source scheme is a new
:class:`LabelScheme` entry in :data:`SCHEMES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from data_adapters.errors import DataError

#: Canonical label values and names (BraTS 2023).
CANONICAL_LABELS: dict[int, str] = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}
CANONICAL_SCHEME = "brats2023"


@dataclass(frozen=True)
class LabelScheme:
    """A source label scheme: which values may occur and what each becomes."""

    name: str
    to_canonical: MappingProxyType[int, int]
    description: str = ""

    @property
    def values(self) -> frozenset[int]:
        """Label values allowed in source files of this scheme."""
        return frozenset(self.to_canonical)


def _scheme(name: str, mapping: dict[int, int], description: str) -> LabelScheme:
    return LabelScheme(name, MappingProxyType(dict(mapping)), description)


#: Known source schemes by name.
SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        _scheme("brats2023", {0: 0, 1: 1, 2: 2, 3: 3}, "BraTS 2023: 1 NETC, 2 SNFH, 3 ET"),
        _scheme("brats2021", {0: 0, 1: 1, 2: 2, 4: 3}, "BraTS 2017-2021: 1 NCR, 2 ED, 4 ET"),
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
