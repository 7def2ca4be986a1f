"""The egress guard: the last thing every reply passes before it leaves a site.

A ClientApp mod (:func:`egress_guard`) checks each outgoing message against what a site may
send, whatever the code before it did:

- ``site``: the site's name, its dataset fingerprint (64 hex digits) and, for a decline, a
  reason in plain words (no path, no digit, so no file name or patient identifier) and its
  kind;
- ``arrays`` (training replies only): one float32 ``weights`` vector of exactly the size the
  study's model sends, every value finite;
- ``metrics`` / ``metrics-<name>``: scalar metrics whose names are on the list below, finite;
  per-case lists only when the site's consent shares them.

Anything else (another record, an image-shaped array, a metric named after a patient, a file
path in a reason) is not sent: the server gets a decline saying the guard blocked it, and the
site's egress log (JSON lines, :func:`egress_log_path`) gets what and why. Every reply sent is
logged too (round, kind, bytes, sha256 of the content as :func:`content_digest` computes it),
so a site can later compare its own log with the server's audit trail (the same digest).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from data_adapters.harmonise import harmonisation_parameters
from evaluation.regions import REGION_NAMES
from evaluation.summary import STATISTICS
from fedseg.config import ConfigError, RunConfig, SiteConfig
from fedseg.privacy import CLIPPED_METRIC
from fedseg.records import METRICS, WEIGHTS, content_digest, decline_reply, update_problem
from fedseg.secure import reply_problems as secure_reply_problems

TRAIN_METRICS = frozenset(
    {
        "num-examples",
        "train-loss",
        "train-loss-final",
        "local-steps",
        "train-seconds",
        CLIPPED_METRIC,
    }
)
SUMMARY_METRICS = frozenset(
    {"num-examples"} | {f"{m}-{r}-{s}" for m in METRICS for r in REGION_NAMES for s in STATISTICS}
)
CASE_METRICS = frozenset(f"{m}-{r}-cases" for m in METRICS for r in REGION_NAMES)
IDENTITY_KEYS = frozenset({"site", "fingerprint", "declined", "decline-kind", "harmonisation"})
_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
# Plain words only: a path needs "/" or "\", a case id or date needs digits.
_REASON = re.compile(r"[a-z][a-z ,;:'()=._-]{0,199}")
FAILED = "the site could not complete the task; details are in the site's log"
BLOCKED = (
    "the site's egress guard blocked a reply holding more than model weights and aggregate "
    "metrics; details are in the site's log"
)


@dataclass(frozen=True, kw_only=True)
class EgressPolicy:
    """What this site may send in this study."""

    weights_size: int
    share_per_case: bool
    # SecAgg+ (fedseg.secure): training replies carry the protocol's records instead.
    secure_aggregation: bool = False


def policy_for(run: RunConfig, site: SiteConfig) -> EgressPolicy:
    """The policy of a study at a site: the model's travelling size and the site's consent."""
    return EgressPolicy(
        weights_size=_weights_size(run.model_preset, run.keeps_norm_local),
        share_per_case=site.consent.share_per_case,
        secure_aggregation=run.secure_aggregation,
    )


@cache
def _weights_size(preset: str, keep_norm_local: bool) -> int:
    from fedseg.task.model import build_model
    from fedseg.task.sharing import travelling_state

    model = build_model(preset, seed=0)
    return sum(t.numel() for t in travelling_state(model, keep_norm_local=keep_norm_local).values())


def reply_problems(content: RecordDict, *, kind: str, policy: EgressPolicy) -> list[str]:
    """Why ``content`` may not leave the site (empty: it may). The texts stay at the site."""
    problems = []
    for name, record in content.items():
        secure = None
        if policy.secure_aggregation and kind.startswith("train"):
            secure = secure_reply_problems(name, record, weights_size=policy.weights_size)
        if secure is not None:
            problems += secure
        elif name == "site" and isinstance(record, ConfigRecord):
            problems += _identity_problems(record)
        elif name == "arrays" and isinstance(record, ArrayRecord) and kind.startswith("train"):
            problems += _weights_problems(record, size=policy.weights_size)
        elif _is_metrics(name) and isinstance(record, MetricRecord):
            problems += _metric_problems(name, record, policy=policy)
        else:
            problems.append(f"record '{name}' ({type(record).__name__}) is not allowed")
    return problems


def _is_metrics(name: str) -> bool:
    return name == "metrics" or (name.startswith("metrics-") and bool(_SITE_NAME.fullmatch(name)))


def _identity_problems(record: ConfigRecord) -> list[str]:
    problems = [f"identity key '{k}' is not allowed" for k in record if k not in IDENTITY_KEYS]
    checks = {"site": _SITE_NAME, "fingerprint": _FINGERPRINT, "declined": _REASON}
    for key, pattern in checks.items():
        value = record.get(key)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            problems.append(f"identity '{key}' is not of the allowed form: {value!r}")
    if record.get("decline-kind") not in (None, "invalid-data", "abstain"):
        problems.append(f"decline-kind {record.get('decline-kind')!r} is not allowed")
    if "harmonisation" in record:
        problems += _harmonisation_problems(record["harmonisation"])
    return problems


def _harmonisation_problems(value: object) -> list[str]:
    """The harmonisation parameters: exactly fedseg's keys, numbers where fedseg has numbers,
    and fedseg's own fixed text where it has text (so nothing else can ride along)."""
    reference = harmonisation_parameters(target_spacing=(1.0, 1.0, 1.0))
    try:
        given = json.loads(str(value))
    except json.JSONDecodeError:
        return ["identity 'harmonisation' is not JSON"]
    if not isinstance(given, dict) or set(given) != set(reference):
        return ["identity 'harmonisation' does not hold exactly fedseg's harmonisation keys"]
    problems = []
    for key, expected in reference.items():
        if not _same_form(given[key], expected, free_text=key == "harmonise_version"):
            problems.append(f"harmonisation '{key}' is not of the allowed form: {given[key]!r}")
    return problems


def _same_form(value: Any, expected: Any, *, free_text: bool) -> bool:
    if isinstance(expected, bool) or expected is None:
        return isinstance(value, bool) or value is None
    if isinstance(expected, int | float):
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if isinstance(expected, list):
        return isinstance(value, list) and len(value) == len(expected) and all(
            _same_form(v, e, free_text=False) for v, e in zip(value, expected, strict=True)
        )  # fmt: skip
    return value == expected or (free_text and isinstance(value, str | int) and
                                 bool(_SITE_NAME.fullmatch(str(value))))  # fmt: skip


def _weights_problems(record: ArrayRecord, *, size: int) -> list[str]:
    """The server's own check on an update (one packed vector of the model's size, finite),
    and here also its form: a flat float32 vector, so no volume can pass as weights."""
    if list(record) == [WEIGHTS]:
        array = record[WEIGHTS]
        if array.dtype != "float32" or len(array.shape) != 1:
            return [f"weights are {array.dtype} {array.shape}; the model sends float32 ({size},)"]
    problem = update_problem(record, size=size)
    return [problem] if problem else []


def _metric_problems(name: str, record: MetricRecord, *, policy: EgressPolicy) -> list[str]:
    allowed = TRAIN_METRICS | SUMMARY_METRICS
    if policy.share_per_case:
        allowed |= CASE_METRICS
    problems = []
    for key, value in record.items():
        if key not in allowed:
            problems.append(f"metric '{key}' in '{name}' is not an allowed name")
        elif not all(math.isfinite(v) for v in _numbers(value)):
            problems.append(f"metric '{key}' in '{name}' is not finite")
    return problems


def _numbers(value: Any) -> Iterator[float]:
    yield from (float(v) for v in (value if isinstance(value, list) else [value]))


def egress_log_path(site: SiteConfig) -> Path:
    """The site's egress log: ``egress-log`` in its settings, else beside its data."""
    return site.egress_log or site.data_path / "egress.jsonl"


def _append(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(entry, sort_keys=True) + "\n")


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: send the reply only if it passes :func:`reply_problems`; log it.

    An exception or error reply from inside would reach the server with its text (Flower
    sends ``str(exception)``, which may hold a path or a case id): it leaves as a decline or
    an error in general terms, the detail stays in the site's log.
    """
    try:
        reply = call_next(msg, context)
    except Exception:
        log(ERROR, "the %s task failed at this site", msg.metadata.message_type, exc_info=True)
        return decline_reply(msg, site=_node_name(context), reason=FAILED, kind="invalid-data")
    if reply.has_error():
        log(ERROR, "the %s task returned an error: %s", msg.metadata.message_type, reply.error)
        return Message(Error(code=reply.error.code, reason=FAILED), reply_to=msg)
    site: SiteConfig | None
    try:
        run = RunConfig.from_flower(context.run_config)
        site = SiteConfig.from_node_config(context.node_config, run)
        policy = policy_for(run, site)
    except ConfigError:
        # The app has declined already; with no settings to read, nothing but that may go.
        site, policy = None, EgressPolicy(weights_size=-1, share_per_case=False)
    kind = msg.metadata.message_type
    problems = reply_problems(reply.content, kind=kind, policy=policy)
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": context.run_id,
        "message_type": kind,
        "round": _round_of(msg),
        "records": sorted(reply.content),
    }
    if problems:
        log(ERROR, "egress guard blocked the %s reply: %s", kind, "; ".join(problems))
        identity = reply.content.get("site")
        name = identity.get("site") if isinstance(identity, ConfigRecord) else None
        safe = str(name) if isinstance(name, str) and _SITE_NAME.fullmatch(name) else "unknown"
        reply = decline_reply(msg, site=safe, reason=BLOCKED, kind="invalid-data")
        entry |= {"verdict": "blocked", "problems": problems}
    else:
        entry["verdict"] = "sent"
    entry["bytes"], entry["sha256"] = content_digest(reply.content)
    if site is not None:
        _append(egress_log_path(site), entry)
    return reply


def _node_name(context: Context) -> str:
    path = context.node_config.get("data-path")
    name = Path(str(path)).name if path else ""
    return name if _SITE_NAME.fullmatch(name) else f"node-{context.node_id}"


def _round_of(msg: Message) -> int | None:
    config = msg.content.get("config") if msg.has_content() else None
    value = config.get("server-round") if isinstance(config, ConfigRecord) else None
    return int(value) if isinstance(value, int) else None
