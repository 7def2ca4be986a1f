"""The model artefact: the weights and everything needed to use them on a new scan.

A trained model is two files side by side: ``model.pt`` (tensors only, loadable with
``torch.load(weights_only=True)``, never a pickle of code) and ``model.json``, which says
what the weights are and how to feed them:

- ``schema``: ``fedseg-model/1``; a loader refuses any other;
- ``sha256`` of ``model.pt``; a loader refuses weights that do not match it;
- ``model_preset`` (the MONAI network) and ``inference`` (sliding-window size, overlap,
  threshold);
- ``harmonisation``: the parameters every training site harmonised with (target spacing,
  orientation, mask, normalisation; from the sites' manifests), so prediction prepares a new
  scan exactly as the training data was, and ``modalities`` in the network's input order;
- ``labels``: the output label scheme (BraTS 2023 values) and the regions the three output
  channels are;
- ``provenance``: run id, final round, strategy, the sites and their dataset fingerprints,
  and the hash of the audit record the study had reached when the model was written (which
  ties the file to ``audit.jsonl``).

Older ``model.json`` files (no ``schema``) still serve ``fedseg evaluate``, which needs only
the preset; prediction needs the harmonisation and refuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_adapters.harmonise import harmonisation_parameters
from data_adapters.labels import CANONICAL_LABELS, CANONICAL_SCHEME
from data_adapters.layouts import MODALITIES
from evaluation.regions import REGION_NAMES, REGIONS
from fedseg.artifacts import load_weights
from fedseg.task.model import build_model

SCHEMA = "fedseg-model/1"
# What prediction reads from ``inference``.
DEFAULT_OVERLAP = 0.25
DEFAULT_THRESHOLD = 0.5


class ArtifactError(ValueError):
    """A model file that is missing, corrupt or not a fedseg model; names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True, kw_only=True)
class ModelArtifact:
    """A checked ``model.pt`` + ``model.json``."""

    weights: Path
    sha256: str
    preset: str
    roi_size: int
    overlap: float
    threshold: float
    harmonisation: dict[str, Any]
    modalities: tuple[str, ...]
    provenance: dict[str, Any]

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        """The grid spacing (mm, along R, A, S) the network was trained on."""
        x, y, z = (float(v) for v in self.harmonisation["target_spacing_mm"])
        return x, y, z

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The preset network with the weights loaded, in eval mode, on ``device``."""
        model = build_model(self.preset, seed=0)
        try:
            model.load_state_dict(load_weights(self.weights))
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise ArtifactError(
                self.weights, f"weights do not fit '{self.preset}' ({first})"
            ) from None
        return model.to(device).eval()


def label_description() -> dict[str, Any]:
    """The output label scheme, for ``model.json``."""
    return {
        "scheme": CANONICAL_SCHEME,
        "values": {name: value for value, name in CANONICAL_LABELS.items()},
        "channels": list(REGION_NAMES),
        "regions": {r: list(REGIONS[r]) for r in REGION_NAMES},
    }


def describe_artifact(
    *, weights: Path, sha256: str, preset: str, roi_size: int,
    harmonisation: Mapping[str, Any] | None, provenance: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The artefact part of ``model.json`` (the study adds its training settings)."""
    return {
        "schema": SCHEMA,
        "weights": weights.name,
        "sha256": sha256,
        "model_preset": preset,
        "patch_size": roi_size,
        "inference": {
            "roi_size": roi_size,
            "overlap": DEFAULT_OVERLAP,
            "threshold": DEFAULT_THRESHOLD,
            "mode": "gaussian",
        },
        "modalities": list(MODALITIES),
        "harmonisation": dict(harmonisation) if harmonisation is not None else None,
        "labels": label_description(),
        "provenance": dict(provenance),
    }


def artifact_paths(path: Path) -> tuple[Path, Path]:
    """``(model.pt, model.json)`` for a path to either file or to their folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    if path.suffix == ".json":
        return path.with_suffix(".pt"), path
    return path, path.with_suffix(".json")


def load_artifact(path: Path) -> ModelArtifact:
    """Read and check a model artefact (see the module docstring).

    Raises
    ------
    ArtifactError
        Naming the file: missing, not JSON, another schema, a field missing or of the wrong
        type, weights whose sha256 differs from the description, no harmonisation recorded.
    """
    weights, description = artifact_paths(path)
    meta = _read_description(description)
    _check_schema(meta, description)
    if not weights.is_file():
        raise ArtifactError(weights, "no such weights file (model.json names it)")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise ArtifactError(
            weights, f"sha256 {digest[:12]}... is not the {meta['sha256'][:12]}... model.json "
            "records: the file is corrupt or was replaced"
        )  # fmt: skip
    inference = meta["inference"]
    return ModelArtifact(
        weights=weights,
        sha256=digest,
        preset=str(meta["model_preset"]),
        roi_size=int(inference["roi_size"]),
        overlap=float(inference["overlap"]),
        threshold=float(inference["threshold"]),
        harmonisation=dict(meta["harmonisation"]),
        modalities=tuple(meta["modalities"]),
        provenance=dict(meta["provenance"]),
    )


def _read_description(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(path, "no such model description (model.json beside the weights)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(path, "not a JSON object")
    return meta


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "weights": str,
    "sha256": str,
    "model_preset": str,
    "inference": dict,
    "modalities": list,
    "labels": dict,
    "provenance": dict,
}


def _check_schema(meta: Mapping[str, Any], path: Path) -> None:
    schema = meta.get("schema")
    if schema != SCHEMA:
        found = "no schema (written before fedseg recorded one)" if schema is None else repr(schema)
        raise ArtifactError(path, f"model schema is {found}; this fedseg reads {SCHEMA}")
    for key, kind in _FIELDS.items():
        if not isinstance(meta.get(key), kind):
            raise ArtifactError(path, f"field '{key}' is missing or not a {_name(kind)}")
    if meta.get("site_local_layers"):
        raise ArtifactError(
            path, f"its {meta['site_local_layers']} layers stayed at each site (FedBN): this "
            "file holds only their initialisation and predicts nothing useful"
        )  # fmt: skip
    harmonisation = meta.get("harmonisation")
    if not isinstance(harmonisation, dict):
        conflict = meta.get("harmonisation_conflict")
        why = f"the sites harmonised differently ({conflict})" if conflict else "none recorded"
        raise ArtifactError(path, f"no single harmonisation to prepare new scans with: {why}")
    missing = sorted(set(harmonisation_parameters(target_spacing=(1, 1, 1))) - set(harmonisation))
    if missing:
        raise ArtifactError(path, f"harmonisation lacks {', '.join(missing)}")
    if list(meta["modalities"]) != list(MODALITIES):
        raise ArtifactError(path, f"modalities {meta['modalities']} are not fedseg's {MODALITIES}")
    for key in ("roi_size", "overlap", "threshold"):
        if not isinstance(meta["inference"].get(key), int | float):
            raise ArtifactError(path, f"inference '{key}' is missing or not a number")


def _name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
