"""The wire format of what a site sends back, written by the ClientApp and read by the server.

One module for both directions so the two can never drift apart:

- a validation reply is a flat :class:`MetricRecord`: ``num-examples`` always; per region and
  metric the statistics of :mod:`evaluation.summary` (``dice-WT-median``) unless the site has
  fewer cases than ``min-cases-to-report``; per-case lists (``dice-WT-cases``, in the site's
  validation order, no case ids) only when the site's consent allows it and the minimum is met;
- model weights travel as one float32 vector (:func:`pack_weights`), unpacked against the
  preset's own state dict, which both sides build;
- a declined message carries the site's name, a reason that names no file or case, and a kind:
  ``invalid-data`` (a failure, recorded as such) or ``abstain`` (the site's choice or nothing to
  do: an evaluation-only site asked to train).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from data_adapters.harmonise import harmonisation_parameters
from evaluation.regions import REGION_NAMES
from evaluation.summary import STATISTICS
from fedseg.task.validate import VALIDATION_METRICS

#: Per-case and per-region metrics a validation reply carries: what the site scored.
METRICS = VALIDATION_METRICS
DeclineKind = Literal["invalid-data", "abstain"]
MetricValues = dict[str, int | float | list[int] | list[float]]


#: The one array of a packed model.
WEIGHTS = "weights"


def pack_weights(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as one float32 vector in the preset's tensor order.

    Flower sends every Array of a record as separate objects, a few HTTP calls each; a U-Net's
    ~80 tensors made that seconds per message on loopback, one vector costs a call per 5 MB
    chunk. FedAvg's weighted mean of the vector is exactly the per-tensor weighted mean.
    """
    other = sorted({str(t.dtype) for t in state.values()} - {"torch.float32"})
    if other:
        raise ValueError(f"model weights must all be float32 to travel packed, found {other}")
    flat = torch.cat([t.detach().reshape(-1).cpu() for t in state.values()])
    return ArrayRecord({WEIGHTS: Array(flat.numpy())})


def update_problem(arrays: ArrayRecord, *, size: int) -> str | None:
    """Why a site's trained weights cannot enter the average (``None`` when they can): one
    packed vector of the preset's size, every value finite. Flower's own check compares only
    the keys, and a broadcastable vector of the wrong length would be averaged silently."""
    if list(arrays) != [WEIGHTS]:
        return f"the update is not one packed '{WEIGHTS}' array"
    values = arrays[WEIGHTS].numpy()
    if values.size != size:
        return f"the update holds {values.size} values; the model has {size}"
    if not np.isfinite(values).all():
        return "the update holds NaN or infinite values"
    return None


def unpack_weights(
    arrays: ArrayRecord, template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The state dict :func:`pack_weights` packed, shaped like ``template`` (the preset's)."""
    if list(arrays) != [WEIGHTS]:
        raise ValueError(f"model weights must be one packed '{WEIGHTS}' array, got {list(arrays)}")
    flat = torch.from_numpy(arrays[WEIGHTS].numpy().copy())
    expected = sum(t.numel() for t in template.values())
    if flat.numel() != expected:
        raise ValueError(f"model weights hold {flat.numel()} values; the preset needs {expected}")
    state, offset = {}, 0
    for name, like in template.items():
        state[name] = flat[offset : offset + like.numel()].reshape(like.shape).to(like.dtype)
        offset += like.numel()
    return state


def summary_metrics(summary: dict[str, Any], n_cases: int) -> MetricValues:
    """Flatten a site summary into metric keys like ``dice-WT-median``.

    A summary withheld for too few cases holds only counts, so only ``num-examples`` is sent.
    """
    values: MetricValues = {"num-examples": n_cases}
    for region, metrics in summary.items():
        for metric, stats in metrics.items():
            for stat in STATISTICS:
                if stats.get(stat) is not None:
                    values[f"{metric}-{region}-{stat}"] = float(stats[stat])
    return values


def add_case_values(values: MetricValues, case_values: dict[str, dict[str, list[float]]]) -> None:
    """Add per-case lists (``{metric: {region: [v, ...]}}``) unless the summary was withheld."""
    if withheld(values):
        return
    for metric, by_region in case_values.items():
        for region, listed in by_region.items():
            values[f"{metric}-{region}-cases"] = [float(v) for v in listed]


def withheld(values: MetricValues | MetricRecord) -> bool:
    """Whether a validation reply holds only the case count."""
    return f"{METRICS[0]}-{REGION_NAMES[0]}-mean" not in values


def site_entry(m: MetricRecord, identity: ConfigRecord) -> dict[str, Any]:
    """The ``metrics.json`` record of one site's validation reply (see the README schema)."""
    n_cases = int(m["num-examples"])  # type: ignore[arg-type]
    entry: dict[str, Any] = {"n_cases": n_cases, "fingerprint": str(identity["fingerprint"])}
    if withheld(m):
        entry["withheld"] = True
        entry["summary"] = {r: {k: {"count": n_cases} for k in METRICS} for r in REGION_NAMES}
        return entry
    entry["summary"] = {
        r: {k: _statistics(m, f"{k}-{r}", n_cases) for k in METRICS} for r in REGION_NAMES
    }
    for k in METRICS:
        entry[k] = {r: entry["summary"][r][k]["mean"] for r in REGION_NAMES}
    if f"{METRICS[0]}-{REGION_NAMES[0]}-cases" in m:
        entry["per_case"] = {
            k: {r: [float(v) for v in m[f"{k}-{r}-cases"]] for r in REGION_NAMES}  # type: ignore[union-attr]
            for k in METRICS
        }
    return entry


def _statistics(m: MetricRecord, prefix: str, n_cases: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"count": n_cases}
    for stat in STATISTICS:
        value = m.get(f"{prefix}-{stat}")
        stats[stat] = None if value is None else float(value)  # type: ignore[arg-type]
    return stats


def identity_record(
    site: str, fingerprint: str, *, harmonisation: Mapping[str, Any] | None = None
) -> ConfigRecord:
    """Who replied: the site's name, its dataset fingerprint (never a file name) and the
    parameters it harmonised its data with (spacing, orientation, normalisation: what a
    model trained on it needs from a new scan; :func:`harmonisation_contract`)."""
    record = ConfigRecord({"site": site, "fingerprint": fingerprint})
    if harmonisation is not None:
        record["harmonisation"] = json.dumps(harmonisation_contract(harmonisation), sort_keys=True)
    return record


def harmonisation_contract(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Of a manifest's parameters, those that decide the canonical data (not the site's
    split)."""
    keys = harmonisation_parameters(target_spacing=(1.0, 1.0, 1.0))
    return {k: parameters[k] for k in keys if k in parameters}


def decline_reply(msg: Message, *, site: str, reason: str, kind: DeclineKind) -> Message:
    """A reply saying the site sits this message out, and why in general terms."""
    identity = ConfigRecord({"site": site, "declined": reason, "decline-kind": kind})
    return Message(content=RecordDict({"site": identity}), reply_to=msg)


def declined(msg: Message) -> tuple[DeclineKind, str] | None:
    """``(kind, reason)`` when a reply declines, else None."""
    if msg.has_error() or "site" not in msg.content:
        return None
    identity = msg.content["site"]
    assert isinstance(identity, ConfigRecord)
    reason = identity.get("declined")
    if reason is None:
        return None
    kind: DeclineKind = "abstain" if identity.get("decline-kind") == "abstain" else "invalid-data"
    return kind, str(reason)


def content_digest(content: RecordDict) -> tuple[int, str]:
    """Bytes and sha256 of a message's content in a canonical form (records by name; arrays'
    raw bytes; metrics and configs as sorted JSON), computed the same way on both sides."""
    digest, size = hashlib.sha256(), 0
    for name in sorted(content):
        record = content[name]
        digest.update(name.encode())
        if isinstance(record, ArrayRecord):
            chunks = [record[k].data for k in record]
        else:
            chunks = [json.dumps(dict(record), sort_keys=True, default=str).encode()]
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
