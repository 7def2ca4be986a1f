"""Raw site data -> canonical harmonised dataset (no torch, no flwr).

Entry points: :func:`harmonise_site` writes a canonical site folder,
:func:`check_site` validates one, :func:`load_manifest` reads its manifest.
Every refusal raises :class:`DataError` (``str()`` is ``"<path>: <reason>"``).
"""

from data_adapters.errors import DataError, SkippedCase
from data_adapters.grid import Step
from data_adapters.harmonise import HarmonisedCase, harmonise_case
from data_adapters.labels import remap_labels
from data_adapters.layouts import MODALITIES, RawCase, detect_layout, list_cases, scan_cases
from data_adapters.manifest import SiteManifest, load_manifest, write_manifest
from data_adapters.readers import read_image
from data_adapters.site import HarmoniseResult, harmonise_site
from data_adapters.validate import check_site

__all__ = [
    "MODALITIES",
    "DataError",
    "HarmoniseResult",
    "HarmonisedCase",
    "RawCase",
    "SiteManifest",
    "SkippedCase",
    "Step",
    "check_site",
    "detect_layout",
    "harmonise_case",
    "harmonise_site",
    "list_cases",
    "load_manifest",
    "read_image",
    "remap_labels",
    "scan_cases",
    "write_manifest",
]
