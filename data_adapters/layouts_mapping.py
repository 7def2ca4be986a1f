"""A site-written mapping file (TOML) for any folder layout the registry does not know.

Example (paths are glob patterns relative to the raw folder; ``{case}`` is the case id)::

    label_scheme = "brats2021"          # any registered scheme
    [cases]
    pattern = "{case}/anat"             # folders matching this define the case ids
    [modalities]
    t1n = "{case}/anat/{case}_T1w.nii.gz"
    t1c = "{case}/anat/{case}_ce-gd_T1w.nii.gz"
    t2w = "{case}/anat/{case}_T2w.nii.gz"
    t2f = "{case}/anat/{case}_FLAIR.nii.gz"
    seg = "{case}/derivatives/*dseg.nii.gz"   # optional: without it cases are unlabelled

Patterns use ``*``, ``?``, ``[...]`` within one path component and ``**`` across folders.
A modality pattern matching no file, or several, makes that case bad (the error lists
the matches: ``*T1w.nii.gz`` also matches ``*_ce-gd_T1w.nii.gz``, hence ``{case}_T1w``
above); so does one file claimed by two roles.  The file itself is validated loudly:
unknown keys, an unknown label scheme or a missing modality raise :class:`DataError`
naming the TOML file and the key.  A mapping layout is never auto-detected:
``get_layout("site.toml")`` builds one.
"""

from __future__ import annotations

import glob
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data_adapters.errors import DataError, SkippedCase
from data_adapters.labels import get_scheme
from data_adapters.layouts import MODALITIES, CaseScan, Layout, RawCase
from data_adapters.sources import Source

CASE = "{case}"
_ROLES = (*MODALITIES, "seg")
_KEYS: dict[str, tuple[str, ...]] = {
    "": ("label_scheme", "cases", "modalities"),
    "cases": ("pattern",),
    "modalities": _ROLES,
}


@dataclass(frozen=True)
class MappingLayout:
    """Cases and files found by the glob patterns of a mapping file."""

    toml_path: Path
    label_scheme: str
    case_pattern: str
    patterns: MappingProxyType[str, str]  # role (t1n .. t2f, seg) -> pattern
    name: str = "mapping"

    def count_cases(self, raw_dir: Path) -> int:
        """How many case ids the ``[cases]`` pattern finds."""
        return len(self._case_ids(raw_dir))

    def scan(self, raw_dir: Path) -> CaseScan:
        """Resolve every role of every case; ambiguous or missing files make a case bad."""
        scan = CaseScan()
        for case_id, folders in self._case_ids(raw_dir).items():
            try:
                if len(folders) > 1:
                    where = ", ".join(f.relative_to(raw_dir).as_posix() for f in folders)
                    raise DataError(
                        folders[0], f"case id {case_id!r} names several folders: {where}"
                    )
                scan.cases.append(self._case(raw_dir, case_id))
            except DataError as err:
                scan.bad.append(SkippedCase.from_error(case_id, err))
        return scan

    def _case_ids(self, raw_dir: Path) -> dict[str, list[Path]]:
        """Case id -> the folders matching ``[cases] pattern`` for it (hidden ones skipped)."""
        regex = _pattern_regex(self.case_pattern)
        found: dict[str, list[Path]] = {}
        for path in sorted(raw_dir.glob(self.case_pattern.replace(CASE, "*"))):
            relative = path.relative_to(raw_dir)
            match = regex.fullmatch(relative.as_posix())
            if path.is_dir() and match and not any(p.startswith(".") for p in relative.parts):
                found.setdefault(match["case"], []).append(path)
        return found

    def _case(self, raw_dir: Path, case_id: str) -> RawCase:
        files: dict[str, Path] = {}
        for role, pattern in self.patterns.items():
            concrete = pattern.replace(CASE, glob.escape(case_id))
            matches = sorted(p for p in raw_dir.glob(concrete) if p.is_file())
            if len(matches) == 1:
                files[role] = matches[0]
            elif matches or role != "seg":
                listed = ", ".join(m.relative_to(raw_dir).as_posix() for m in matches) or "none"
                raise DataError(
                    raw_dir / concrete,
                    f"{role} pattern of {self.toml_path.name} must match one file, "
                    f"matched {len(matches)}: {listed}",
                )
        shared = [path for path, n in Counter(files.values()).items() if n > 1]
        if shared:
            roles = [r for r, p in files.items() if p == shared[0]]
            raise DataError(shared[0], f"claimed by {' and '.join(roles)} in {self.toml_path.name}")
        seg = files.pop("seg", None)
        return RawCase(
            case_id=case_id,
            modalities={m: Source(files[m]) for m in MODALITIES},
            seg=Source(seg) if seg is not None else None,
            label_scheme=self.label_scheme,
            root=raw_dir,
            layout=self.name,
        )


def mapping_layout(toml_path: Path) -> Layout:
    """Build the layout a mapping file describes.

    Raises
    ------
    DataError
        Naming the file (and the key) if it is missing, not TOML, has unknown or
        missing keys, an unknown label scheme or a pattern that is not a relative glob
        holding ``{case}``.
    """
    toml_path = Path(toml_path)
    if not toml_path.is_file():
        raise DataError(toml_path, "mapping file not found")
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DataError(toml_path, f"cannot be read as TOML ({err})") from err
    _check_keys(toml_path, data, "")
    scheme = data.get("label_scheme")
    if not isinstance(scheme, str):
        raise DataError(toml_path, "label_scheme: missing (name a registered label scheme)")
    try:
        get_scheme(scheme)
    except DataError as err:
        raise DataError(toml_path, f"label_scheme = {scheme!r}: {err.reason}") from None
    cases = _table(toml_path, data, "cases")
    modalities = _table(toml_path, data, "modalities")
    missing = [m for m in (*MODALITIES, "pattern") if m not in {**modalities, **cases}]
    if missing:
        where = "[cases] pattern" if missing == ["pattern"] else f"[modalities] {missing[0]}"
        raise DataError(toml_path, f"{where}: missing")
    patterns = {
        role: _pattern(toml_path, modalities, role, section="modalities")
        for role in _ROLES
        if role in modalities
    }
    return MappingLayout(
        toml_path=toml_path,
        label_scheme=scheme,
        case_pattern=_pattern(toml_path, cases, "pattern", section="cases"),
        patterns=MappingProxyType(patterns),
    )


def _check_keys(toml_path: Path, data: dict[str, Any], table: str) -> None:
    allowed = _KEYS[table]
    for key in data:
        if key not in allowed:
            where = f"[{table}] {key}" if table else key
            raise DataError(toml_path, f"{where}: unknown key (allowed: {', '.join(allowed)})")


def _table(toml_path: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name)
    if not isinstance(table, dict):
        raise DataError(toml_path, f"[{name}]: missing table")
    _check_keys(toml_path, table, name)
    return table


def _pattern(toml_path: Path, values: dict[str, Any], key: str, *, section: str) -> str:
    """A validated pattern: a relative glob that names ``{case}`` and stays inside the folder."""
    pattern = values[key]
    where = f"[{section}] {key}"
    if not isinstance(pattern, str) or CASE not in pattern:
        raise DataError(toml_path, f"{where}: expected a glob pattern holding {CASE}")
    parts = pattern.split("/")
    if pattern.startswith("/") or ".." in parts or "" in parts:
        raise DataError(toml_path, f"{where} = {pattern!r}: must be relative to the raw folder")
    return pattern


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A regex matching the relative paths ``pattern`` matches, capturing ``{case}``."""
    chunks = [_glob_regex(chunk) for chunk in pattern.split(CASE)]
    text = chunks[0] + "(?P<case>[^/]+)" + "(?P=case)".join(chunks[1:])
    return re.compile(text)


def _glob_regex(glob_text: str) -> str:
    """Translate glob syntax (``**``, ``*``, ``?``, ``[...]``) into a regex fragment."""
    out, i = [], 0
    while i < len(glob_text):
        char = glob_text[i]
        if glob_text.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        close = glob_text.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif close > 0:
            body = glob_text[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)
