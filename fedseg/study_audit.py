"""What a study writes to its audit trail (:mod:`fedseg.audit`), from the server's records.

Names and fingerprints only: a site appears by its name and its dataset fingerprint (a hash
of its manifest), never a file name or case id. What each site sent is recorded by size and
sha256 (:func:`fedseg.records.content_digest`), the same digest the site's egress log holds,
so the two sides can be compared line by line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedseg import __version__
from fedseg.audit import AuditTrail, canonical
from fedseg.config import RunConfig
from fedseg.records import WEIGHTS
from fedseg.strategies import RoundRecord, aggregation_weights


def config_hash(run: RunConfig) -> str:
    """sha256 of the run config's canonical JSON."""
    return hashlib.sha256(canonical(run.to_flower())).hexdigest()


def weights_hash(arrays: ArrayRecord) -> str:
    """sha256 of a packed model's bytes: the identity of a global model on the wire."""
    return hashlib.sha256(arrays[WEIGHTS].data).hexdigest()


def file_entry(path: Path, run_dir: Path, sha256: str) -> dict[str, str]:
    """A file the record vouches for, relative to the run folder."""
    return {"path": str(path.relative_to(run_dir)), "sha256": sha256}


def study_start(trail: AuditTrail, *, run: RunConfig, run_info: object, run_id: int) -> None:
    """Who started what: the submitting account, the app bundle's hash, fedseg's version,
    the run config and its hash."""
    trail.append(
        "study-resumed" if run.resume else "study-start",
        run_id=run_id,
        submitted_by=str(
            getattr(run_info, "flwr_aid", "") or getattr(run_info, "account_name", "")
        ),
        app_bundle={
            "fab_id": str(getattr(run_info, "fab_id", "")),
            "fab_version": str(getattr(run_info, "fab_version", "")),
            "fab_hash": str(getattr(run_info, "fab_hash", "")),
        },
        fedseg_version=__version__,
        run_config=run.to_flower(),
        config_hash=config_hash(run),
    )


def round_fields(record: RoundRecord, *, run: RunConfig, before: str, after: str) -> dict[str, Any]:
    """One round: who trained (fingerprint, cases, steps, seconds, what each sent), the
    aggregation weights, the global model's hash before and after, validation and failures."""
    weights = aggregation_weights(run, record.train)
    trained: dict[str, dict[str, Any]] = {}
    for site, entry in record.train.items():
        trained[site] = {
            k: entry[k]
            for k in ("fingerprint", "n_cases", "steps", "seconds", "loss")
            if k in entry
        }
        if site in weights:
            trained[site]["weight"] = weights[site]
    validated = {
        site: {
            "fingerprint": e["fingerprint"],
            "n_cases": e["n_cases"],
            "dice": e.get("dice"),
            "withheld": bool(e.get("withheld")),
        }
        for site, e in record.sites.items()
    }
    return {
        "round": record.round,
        "strategy": run.strategy,
        "global_model_before": before,
        "global_model_after": after,
        "trained": trained,
        # The cyclic plan's visiting order is the order sites trained in.
        "order": list(record.train) if run.strategy == "cyclic" else None,
        "validated": validated,
        "pooled": record.pooled(),
        "received": record.received,
        "failures": record.failures,
        "abstained": record.abstained,
        "not_aggregated": record.not_aggregated or None,
        "privacy": record.privacy or None,
    }
