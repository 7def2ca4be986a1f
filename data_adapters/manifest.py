"""manifest.json: what a harmonised site holds and how it was made.

The manifest records, per case, each source file's sha256, the steps applied
with their parameters and the original geometry; for the site, the split, the
skipped cases and a fingerprint of the whole dataset.  The fingerprint is a
sha256 over the sorted per-case source hashes and the parameters that decide
the output, so the same data harmonised the same way always gives the same
fingerprint, and any changed source byte gives another.  It is what a site may
share; the files are not.

Source paths are stored relative to the raw site folder (``source_root``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_adapters.errors import DataError, SkippedCase
from data_adapters.geometry import Geometry
from data_adapters.grid import Step

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CASES_DIR = "cases"


@dataclass(frozen=True)
class SourceFile:
    """A raw input file: path relative to the raw site folder, and its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class CaseRecord:
    """What the manifest says about one harmonised case.

    ``original_geometry`` is the grid of the first modality (t1n) as read,
    before any step, so predictions can be put back onto it.
    """

    case_id: str
    labelled: bool
    source_label_scheme: str
    sources: dict[str, SourceFile]
    original_geometry: Geometry
    steps: list[Step]
    output_shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "case_id": self.case_id,
            "labelled": self.labelled,
            "source_label_scheme": self.source_label_scheme,
            "sources": {k: {"path": v.path, "sha256": v.sha256} for k, v in self.sources.items()},
            "original_geometry": self.original_geometry.to_json(),
            "steps": [s.to_json() for s in self.steps],
            "output_shape": list(self.output_shape),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseRecord:
        """Inverse of :meth:`to_json`."""
        return cls(
            case_id=str(data["case_id"]),
            labelled=bool(data["labelled"]),
            source_label_scheme=str(data["source_label_scheme"]),
            sources={
                str(k): SourceFile(str(v["path"]), str(v["sha256"]))
                for k, v in data["sources"].items()
            },
            original_geometry=Geometry.from_json(data["original_geometry"]),
            steps=[Step(str(s["name"]), dict(s["params"])) for s in data["steps"]],
            output_shape=tuple(int(n) for n in data["output_shape"]),
        )


@dataclass(frozen=True)
class Split:
    """The seeded train / validation split of the labelled cases."""

    seed: int
    validation_fraction: float
    train: tuple[str, ...]
    validation: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "train": list(self.train),
            "validation": list(self.validation),
        }


@dataclass(frozen=True)
class SiteManifest:
    """A harmonised site's manifest; ``site_dir`` is where it was loaded from."""

    site: str
    fedseg_version: str
    created: str
    target_spacing_mm: tuple[float, ...]
    modalities: tuple[str, ...]
    label_scheme: str
    source_root: str
    parameters: dict[str, Any]
    split: Split
    cases: list[CaseRecord]
    skipped: list[SkippedCase]
    fingerprint: str
    schema_version: int = SCHEMA_VERSION
    site_dir: Path | None = field(default=None, compare=False)

    @property
    def train_cases(self) -> list[str]:
        """Case ids of the training split."""
        return list(self.split.train)

    @property
    def validation_cases(self) -> list[str]:
        """Case ids of the validation split."""
        return list(self.split.validation)

    @property
    def target_spacing(self) -> tuple[float, ...]:
        """Voxel size of every case, in mm along R, A, S."""
        return self.target_spacing_mm

    @property
    def case_ids(self) -> list[str]:
        """All harmonised case ids (labelled or not)."""
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> CaseRecord:
        """The record of one case."""
        for record in self.cases:
            if record.case_id == case_id:
                return record
        raise KeyError(case_id)

    def case_dir(self, case_id: str) -> Path:
        """``site_dir/cases/<case_id>``."""
        if self.site_dir is None:
            raise ValueError("manifest was not loaded from a site folder")
        return self.site_dir / CASES_DIR / case_id

    def to_json(self) -> dict[str, Any]:
        """Return the manifest.json content."""
        return {
            "schema_version": self.schema_version,
            "site": self.site,
            "fedseg_version": self.fedseg_version,
            "created": self.created,
            "target_spacing_mm": list(self.target_spacing_mm),
            "modalities": list(self.modalities),
            "label_scheme": self.label_scheme,
            "source_root": self.source_root,
            "parameters": self.parameters,
            "split": self.split.to_json(),
            "cases": [c.to_json() for c in self.cases],
            "skipped": [
                {"case_id": s.case_id, "file": s.file, "reason": s.reason} for s in self.skipped
            ],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, site_dir: Path | None = None) -> SiteManifest:
        """Inverse of :meth:`to_json` (raises KeyError / TypeError / ValueError)."""
        split = data["split"]
        return cls(
            schema_version=int(data["schema_version"]),
            site=str(data["site"]),
            fedseg_version=str(data["fedseg_version"]),
            created=str(data["created"]),
            target_spacing_mm=tuple(float(v) for v in data["target_spacing_mm"]),
            modalities=tuple(str(m) for m in data["modalities"]),
            label_scheme=str(data["label_scheme"]),
            source_root=str(data["source_root"]),
            parameters=dict(data["parameters"]),
            split=Split(
                seed=int(split["seed"]),
                validation_fraction=float(split["validation_fraction"]),
                train=tuple(str(c) for c in split["train"]),
                validation=tuple(str(c) for c in split["validation"]),
            ),
            cases=[CaseRecord.from_json(c) for c in data["cases"]],
            skipped=[
                SkippedCase(str(s["case_id"]), str(s["file"]), str(s["reason"]))
                for s in data["skipped"]
            ],
            fingerprint=str(data["fingerprint"]),
            site_dir=site_dir,
        )


def compute_fingerprint(cases: Sequence[CaseRecord], parameters: dict[str, Any]) -> str:
    """sha256 over the sorted per-case source hashes and the parameters.

    Only what decides the harmonised data enters: case ids, source roles and
    hashes, and ``parameters``; not paths, times or the fedseg version.
    """
    per_case = sorted(
        [c.case_id, sorted([role, src.sha256] for role, src in c.sources.items())] for c in cases
    )
    payload = json.dumps({"cases": per_case, "parameters": parameters}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def fedseg_version() -> str:
    """The installed fedseg version, or ``"0+unknown"`` when not installed."""
    try:
        return importlib.metadata.version("fedseg")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def write_manifest(manifest: SiteManifest, site_dir: Path) -> Path:
    """Write ``site_dir/manifest.json`` (atomically: a reader never sees half of it)."""
    path = site_dir / MANIFEST_NAME
    partial = path.with_name(f".{MANIFEST_NAME}.partial")
    partial.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def load_manifest(site_dir: Path) -> SiteManifest:
    """Read ``site_dir/manifest.json``.

    Raises
    ------
    DataError
        If the file is missing, not JSON, of another schema version, or lacks
        or mistypes a field.
    """
    path = Path(site_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(path, "manifest not found (is this a harmonised site folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(path, "manifest is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            path, f"schema_version {version!r} not supported (expected {SCHEMA_VERSION})"
        )
    try:
        return SiteManifest.from_json(data, site_dir=Path(site_dir))
    except KeyError as err:
        raise DataError(path, f"malformed manifest: missing key {err}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(path, f"malformed manifest: {err}") from err
