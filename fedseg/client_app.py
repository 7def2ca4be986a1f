"""Flower ClientApp: a site's side of a study. Message in, task call, Message out.

Only model parameters, aggregate metrics and the site's name and dataset fingerprint leave;
per-case scores leave only when the site's consent allows it. The site's own settings
(:class:`fedseg.config.SiteConfig`) decide what it takes part in; a message it does not agree
to, or cannot serve, is declined with a reason that names no file or case.

Actions: ``train`` (a federated round), ``train.local`` (cross-site validation: train a model
on this site alone), ``evaluate`` (validate the global model), ``evaluate.models`` (validate
several models at once, cross-site).
"""

from __future__ import annotations

from collections.abc import Callable
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
from fedseg.task.data import training_batches
from fedseg.task.device import resolve_device
from fedseg.task.model import build_model
from fedseg.task.train import TrainSettings, train_local
from fedseg.task.validate import SiteValidation, validate_models

app = ClientApp()


class SiteDeclinedError(Exception):
    """This site sits the message out: its data failed validation, or it does not consent."""

    def __init__(self, site: str, reason: str, *, kind: DeclineKind) -> None:
        super().__init__(reason)
        self.site, self.reason, self.kind = site, reason, kind


# What each action needs the site to have agreed to, checked in order.
_TRAIN_CONSENT = (lambda c: c.train, "the site does not take part in training (train = false)")
_NEEDS: dict[str, list[tuple[Callable[[Consent], bool], str]]] = {
    "train": [_TRAIN_CONSENT],
    "local": [
        _TRAIN_CONSENT,
        (
            lambda c: c.share_local_model,
            "the site does not share a model trained on its data alone (share-local-model = false)",
        ),
    ],
    "evaluate": [(lambda c: c.evaluate, "the site does not take part in evaluation")],
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
    cases = manifest.validation_cases if action == "evaluate" else manifest.train_cases
    if not cases:
        split = "validation" if action == "evaluate" else "training"
        raise SiteDeclinedError(manifest.site, f"the site has no {split} cases", kind="abstain")
    return run, site, manifest


def _site_name(data_path: Path) -> str:
    """The site's name from its manifest when that still reads, else its folder's name."""
    try:
        return load_manifest(data_path).site
    except DataError:
        return data_path.name


def _answer(
    msg: Message,
    context: Context,
    *,
    action: str,
    work: Callable[[Message, RunConfig, SiteConfig, SiteManifest], RecordDict],
) -> Message:
    try:
        run, site, manifest = _open_site(context, action)
    except SiteDeclinedError as no:
        return decline_reply(msg, site=no.site, reason=no.reason, kind=no.kind)
    try:
        content = work(msg, run, site, manifest)
    except Exception:  # anything: its text may hold paths or case ids
        # Flower would send the exception's text to the server; it stays in the site's log.
        log(ERROR, "%s failed at this site, declining", action, exc_info=True)
        reason = f"the site could not complete {action}; details are in the site's log"
        return decline_reply(msg, site=manifest.site, reason=reason, kind="invalid-data")
    content["site"] = identity_record(manifest.site, manifest.fingerprint)
    return Message(content=content, reply_to=msg)


def _model_from(arrays: object, run: RunConfig, site: SiteConfig) -> torch.nn.Module:
    model = build_model(run.model_preset, seed=run.seed)
    assert isinstance(arrays, ArrayRecord)
    model.load_state_dict(unpack_weights(arrays, model.state_dict()))
    return model.to(resolve_device(site.device))


def _train(msg: Message, run: RunConfig, site: SiteConfig, manifest: SiteManifest) -> RecordDict:
    model = _model_from(msg.content["arrays"], run, site)
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
    return RecordDict({"arrays": pack_weights(model.state_dict()), "metrics": metrics})


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


def _evaluate(msg: Message, run: RunConfig, site: SiteConfig, manifest: SiteManifest) -> RecordDict:
    model = _model_from(msg.content["arrays"], run, site)
    [result] = validate_models({"global": model}, manifest, roi_size=run.patch_size).values()
    values = validation_metrics(
        result, min_cases=site.min_cases(run), share_per_case=site.consent.share_per_case
    )
    return RecordDict({"metrics": MetricRecord(values)})


def _evaluate_models(
    msg: Message, run: RunConfig, site: SiteConfig, manifest: SiteManifest
) -> RecordDict:
    """Cross-site validation: ``model-<i>`` arrays in, ``metrics-<i>`` records out."""
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    count = int(config["num-models"])  # type: ignore[arg-type]
    models = {f"{i}": _model_from(msg.content[f"model-{i}"], run, site) for i in range(count)}
    results = validate_models(models, manifest, roi_size=run.patch_size)
    reply = RecordDict()
    for key, result in results.items():
        values = validation_metrics(
            result, min_cases=site.min_cases(run), share_per_case=site.consent.share_per_case
        )
        reply[f"metrics-{key}"] = MetricRecord(values)
    return reply


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


@app.evaluate("models")
def evaluate_models(msg: Message, context: Context) -> Message:
    """Validate every received model on this site's own validation cases."""
    return _answer(msg, context, action="evaluate", work=_evaluate_models)
