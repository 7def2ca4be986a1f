"""Flower ClientApp: a site's side of a study. Message in, task call, Message out.

Only model parameters, aggregate metrics and the site's name and dataset fingerprint leave;
per-case scores leave only when the site's consent allows it. The site's own settings
(:class:`fedseg.config.SiteConfig`) decide what it takes part in; a message it does not agree
to, or cannot serve, is declined with a reason that names no file or case.

Actions: ``train`` (a federated round), ``train.local`` (cross-site validation: train a model
on this site alone), ``evaluate`` (validate the global model), ``evaluate.models`` (validate
several models at once, cross-site), ``evaluate.personalised`` (fine-tune the final model here
and validate both; the fine-tuned one never leaves), ``query.identity`` (the site's name, so a
cyclic study can visit sites in a named order).

With ``strategy = "fedbn"`` the site's normalisation layers live in Flower's per-run site state
(``context.state``): they are loaded before each task, updated after training, never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from data_adapters.errors import DataError
from data_adapters.manifest import SiteManifest, load_manifest
from data_adapters.validate import check_site
from evaluation.regions import REGION_NAMES
from fedseg.config import ConfigError, Consent, RunConfig, SiteConfig, derive_seed
from fedseg.egress import egress_guard
from fedseg.privacy import clipping_mod
from fedseg.records import (
    METRICS,
    DeclineKind,
    MetricValues,
    add_case_values,
    decline_reply,
    identity_record,
    pack_weights,
    summary_metrics,
    unpack_weights,
)
from fedseg.secure import secure_aggregation_mod
from fedseg.task.data import training_batches
from fedseg.task.device import resolve_device
from fedseg.task.model import build_model
from fedseg.task.sharing import load_partial, local_state, travelling_state
from fedseg.task.train import TrainSettings, train_local
from fedseg.task.validate import SiteValidation, validate_models

# The egress guard sees every reply last: nothing but weights and aggregate metrics leaves.
# Mods run outermost first: the reply is clipped (under DP), then checked, then sent.
# The guard sees each reply last, after SecAgg+ masked it and after DP clipping.
app = ClientApp(mods=[egress_guard, secure_aggregation_mod, clipping_mod])


class SiteDeclinedError(Exception):
    """This site sits the message out: its data failed validation, or it does not consent."""

    def __init__(self, site: str, reason: str, *, kind: DeclineKind) -> None:
        super().__init__(reason)
        self.site, self.reason, self.kind = site, reason, kind


# What each action needs the site to have agreed to, checked in order.
_TRAIN_CONSENT = (lambda c: c.train, "the site does not take part in training (train = false)")
_EVALUATE_CONSENT = (lambda c: c.evaluate, "the site does not take part in evaluation")
_NEEDS: dict[str, list[tuple[Callable[[Consent], bool], str]]] = {
    "train": [_TRAIN_CONSENT],
    "local": [
        _TRAIN_CONSENT,
        (
            lambda c: c.share_local_model,
            "the site does not share a model trained on its data alone (share-local-model = false)",
        ),
    ],
    "evaluate": [_EVALUATE_CONSENT],
    # Fine-tuning trains on the site's data; only validation scores leave.
    "personalise": [_TRAIN_CONSENT, _EVALUATE_CONSENT],
}


def _open_site(context: Context, action: str) -> tuple[RunConfig, SiteConfig, SiteManifest]:
    run = RunConfig.from_flower(context.run_config)
    try:
        site = SiteConfig.from_node_config(context.node_config, run)
    except ConfigError as err:
        log(ERROR, "site configuration is invalid, declining: %s", err)
        name = str(context.node_config.get("data-path", f"node-{context.node_id}"))
        raise SiteDeclinedError(
            Path(name).name, "site configuration is invalid; details are in the site's log",
            kind="invalid-data",
        ) from err  # fmt: skip
    if site.num_threads > 0:
        torch.set_num_threads(site.num_threads)
    for agrees, refusal in _NEEDS[action]:
        if not agrees(site.consent):
            log(INFO, "declining %s: %s", action, refusal)
            raise SiteDeclinedError(_site_name(site.data_path), refusal, kind="abstain")
    try:
        manifest = check_site(site.data_path)
    except DataError as err:
        # The detail (file paths, case ids) stays in the site's own log; the server only
        # learns which site declined and why in general terms.
        log(ERROR, "site data failed validation, declining: %s", err)
        raise SiteDeclinedError(
            _site_name(site.data_path),
            "site data failed validation; details are in the site's log",
            kind="invalid-data",
        ) from err
    splits = {"evaluate": ("validation",), "personalise": ("training", "validation")}
    for split in splits.get(action, ("training",)):
        cases = manifest.validation_cases if split == "validation" else manifest.train_cases
        if not cases:
            raise SiteDeclinedError(manifest.site, f"the site has no {split} cases", kind="abstain")
    return run, site, manifest


def _site_name(data_path: Path) -> str:
    """The site's name from its manifest when that still reads, else its folder's name."""
    try:
        return load_manifest(data_path).site
    except DataError:
        return data_path.name


@dataclass(frozen=True)
class SiteTask:
    """One message at one site: the study, the site's settings and data, and its run state."""

    msg: Message
    run: RunConfig
    site: SiteConfig
    manifest: SiteManifest
    # Flower's per-run state of this node: stays at the site (FedBN's normalisation).
    state: RecordDict

    def model(self, key: str = "arrays") -> torch.nn.Module:
        """The received model (``key`` of the message) with this site's own normalisation
        when the study keeps it local, on the site's device."""
        model = build_model(self.run.model_preset, seed=self.run.seed)
        arrays = self.msg.content[key]
        assert isinstance(arrays, ArrayRecord)
        template = travelling_state(model, keep_norm_local=self.run.keeps_norm_local)
        load_partial(model, unpack_weights(arrays, template))
        own = self.state.get(_LOCAL_NORM)
        if self.run.keeps_norm_local and isinstance(own, ArrayRecord):
            load_partial(model, own.to_torch_state_dict())
        return model.to(resolve_device(self.site.device))

    def outgoing(self, model: torch.nn.Module) -> ArrayRecord:
        """What of a trained model leaves the site; FedBN's normalisation is kept here."""
        if self.run.keeps_norm_local:
            self.state[_LOCAL_NORM] = ArrayRecord(local_state(model))
        return pack_weights(travelling_state(model, keep_norm_local=self.run.keeps_norm_local))


# The context.state key of a FedBN site's own normalisation layers.
_LOCAL_NORM = "fedbn-normalisation"


def _answer(
    msg: Message,
    context: Context,
    *,
    action: str,
    work: Callable[[SiteTask], RecordDict],
) -> Message:
    try:
        run, site, manifest = _open_site(context, action)
    except SiteDeclinedError as no:
        return decline_reply(msg, site=no.site, reason=no.reason, kind=no.kind)
    try:
        content = work(SiteTask(msg, run, site, manifest, context.state))
    except SiteDeclinedError as no:
        return decline_reply(msg, site=no.site, reason=no.reason, kind=no.kind)
    except Exception:  # anything: its text may hold paths or case ids
        # Flower would send the exception's text to the server; it stays in the site's log.
        log(ERROR, "%s failed at this site, declining", action, exc_info=True)
        reason = f"the site could not complete {action}; details are in the site's log"
        return decline_reply(msg, site=manifest.site, reason=reason, kind="invalid-data")
    content["site"] = identity_record(
        manifest.site, manifest.fingerprint, harmonisation=manifest.parameters
    )
    return Message(content=content, reply_to=msg)


def _train(task: SiteTask) -> RecordDict:
    msg, run, manifest = task.msg, task.run, task.manifest
    model = task.model()
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    # Distinct, reproducible patch streams per site and round.
    seed = derive_seed(run.seed, server_round, manifest.site)
    batches = training_batches(
        manifest, patch_size=run.patch_size, batch_size=run.batch_size, seed=seed
    )
    result = train_local(
        model,
        batches,
        settings=TrainSettings(
            steps=run.local_steps, learning_rate=run.learning_rate, proximal_mu=mu
        ),
    )
    metrics = MetricRecord(
        {
            # FedAvg weights by cases, not batches (Algorithm 1 of Rieke et al.).
            "num-examples": len(manifest.train_cases),
            "train-loss": result.mean_loss,
            "train-loss-final": result.final_loss,
            "local-steps": result.steps,
            "train-seconds": result.seconds,
        }
    )
    return RecordDict({"arrays": task.outgoing(model), "metrics": metrics})


def validation_metrics(
    result: SiteValidation, *, min_cases: int, share_per_case: bool
) -> MetricValues:
    """What leaves the site after validating one model: the summary, per-case lists only with
    the site's consent, nothing but the count below ``min_cases``."""
    values = summary_metrics(result.summary(min_cases=min_cases), result.n_cases)
    if share_per_case:
        add_case_values(
            values, {k: {r: result.case_values(k, r) for r in REGION_NAMES} for k in METRICS}
        )
    return values


def _validated(task: SiteTask, models: dict[str, torch.nn.Module]) -> dict[str, MetricRecord]:
    """Validate ``models`` on this site's held-out cases: what may leave, per model."""
    run, site = task.run, task.site
    results = validate_models(models, task.manifest, roi_size=run.patch_size)
    out = {}
    for key, result in results.items():
        values = validation_metrics(
            result, min_cases=site.min_cases(run), share_per_case=site.consent.share_per_case
        )
        out[key] = MetricRecord(values)
    return out


def _evaluate(task: SiteTask) -> RecordDict:
    if task.run.keeps_norm_local and _LOCAL_NORM not in task.state:
        # Scores with the preset's initial BatchNorm statistics would describe no real model.
        reason = "fedbn: the site has not trained in this study, so has no normalisation of its own"
        raise SiteDeclinedError(task.manifest.site, reason, kind="abstain")
    [metrics] = _validated(task, {"global": task.model()}).values()
    return RecordDict({"metrics": metrics})


def _evaluate_models(task: SiteTask) -> RecordDict:
    """Cross-site validation: ``model-<i>`` arrays in, ``metrics-<i>`` records out."""
    config = task.msg.content["config"]
    assert isinstance(config, ConfigRecord)
    count = int(config["num-models"])  # type: ignore[arg-type]
    models = {f"{i}": task.model(f"model-{i}") for i in range(count)}
    return RecordDict({f"metrics-{k}": m for k, m in _validated(task, models).items()})


def _personalise(task: SiteTask) -> RecordDict:
    """Fine-tune the final model on this site's training cases for ``personalise-steps`` and
    validate it beside the global one: ``metrics-global`` and ``metrics-personalised`` leave,
    the fine-tuned weights stay (the seed paper's point that the global optimum need not be
    best for every site)."""
    run, manifest = task.run, task.manifest
    personalised = task.model()
    seed = derive_seed(run.seed, "personalise", manifest.site)
    batches = training_batches(
        manifest, patch_size=run.patch_size, batch_size=run.batch_size, seed=seed
    )
    result = train_local(
        personalised, batches,
        settings=TrainSettings(steps=run.personalise_steps, learning_rate=run.learning_rate),
    )  # fmt: skip
    models = {"global": task.model(), "personalised": personalised}
    reply = RecordDict({f"metrics-{k}": m for k, m in _validated(task, models).items()})
    reply["metrics-training"] = MetricRecord(
        {"local-steps": result.steps, "train-loss": result.mean_loss}
    )
    return reply


def _identity(msg: Message, context: Context) -> Message:
    """Who this node is; the name only, no data check (that comes with real work)."""
    run = RunConfig.from_flower(context.run_config)
    try:
        site = SiteConfig.from_node_config(context.node_config, run)
        name = _site_name(site.data_path)
    except (ConfigError, OSError):
        log(ERROR, "site configuration is invalid", exc_info=True)
        name = f"node-{context.node_id}"
    return Message(content=RecordDict({"site": ConfigRecord({"site": name})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training cases."""
    return _answer(msg, context, action="train", work=_train)


@app.train("local")
def train_alone(msg: Message, context: Context) -> Message:
    """Cross-site validation: train this site's own model (never averaged with others)."""
    return _answer(msg, context, action="local", work=_train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validate the received global model on this site's own validation cases."""
    return _answer(msg, context, action="evaluate", work=_evaluate)


@app.evaluate("personalised")
def evaluate_personalised(msg: Message, context: Context) -> Message:
    """Fine-tune the final model on this site's own cases; validate both versions."""
    return _answer(msg, context, action="personalise", work=_personalise)


@app.query("identity")
def identity(msg: Message, context: Context) -> Message:
    """Name this site (a cyclic study's roll-call)."""
    return _identity(msg, context)


@app.evaluate("models")
def evaluate_models(msg: Message, context: Context) -> Message:
    """Validate every received model on this site's own validation cases."""
    return _answer(msg, context, action="evaluate", work=_evaluate_models)
