"""Flower ClientApp: a site's side of a study. Message in, task call, Message out.

Only model parameters, aggregate metrics and the site's name and dataset fingerprint leave;
per-case scores stay in the process.
"""

from __future__ import annotations

from logging import ERROR
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from data_adapters.errors import DataError
from data_adapters.manifest import SiteManifest, load_manifest
from data_adapters.validate import check_site
from evaluation.summary import STATISTICS
from fedseg.config import RunConfig, SiteConfig, derive_seed
from fedseg.task.data import training_batches
from fedseg.task.model import build_model
from fedseg.task.train import TrainSettings, train_local
from fedseg.task.validate import validate_site

app = ClientApp()


class SiteDeclinedError(Exception):
    """This site's data failed validation; it sits the round out."""

    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.site = site


def _open_site(context: Context) -> tuple[RunConfig, SiteManifest]:
    run = RunConfig.from_flower(context.run_config)
    site = SiteConfig.from_node_config(context.node_config, run)
    if site.num_threads > 0:
        torch.set_num_threads(site.num_threads)
    try:
        return run, check_site(site.data_path)
    except DataError as err:
        # The detail (file paths, case ids) stays in the site's own log; the server only
        # learns which site declined and why in general terms.
        log(ERROR, "site data failed validation, declining: %s", err)
        raise SiteDeclinedError(_site_name(site.data_path)) from err


def _site_name(data_path: Path) -> str:
    """The site's name from its manifest when that still reads, else its folder's name."""
    try:
        return load_manifest(data_path).site
    except DataError:
        return data_path.name


def _decline(msg: Message, declined: SiteDeclinedError) -> Message:
    reason = "site data failed validation; details are in the site's log"
    identity = ConfigRecord({"site": declined.site, "declined": reason})
    return Message(content=RecordDict({"site": identity}), reply_to=msg)


def _model_from(msg: Message, run: RunConfig) -> torch.nn.Module:
    model = build_model(run.model_preset, seed=run.seed)
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _identity(manifest: SiteManifest) -> ConfigRecord:
    return ConfigRecord({"site": manifest.site, "fingerprint": manifest.fingerprint})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training cases."""
    try:
        run, manifest = _open_site(context)
    except SiteDeclinedError as declined:
        return _decline(msg, declined)
    model = _model_from(msg, run)
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
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, "site": _identity(manifest)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validate the received global model on this site's own validation cases."""
    try:
        run, manifest = _open_site(context)
    except SiteDeclinedError as declined:
        return _decline(msg, declined)
    model = _model_from(msg, run)
    result = validate_site(model, manifest, roi_size=run.patch_size)
    values = summary_metrics(result.summary(min_cases=run.min_cases_to_report), result.n_cases)
    content = RecordDict({"metrics": MetricRecord(values), "site": _identity(manifest)})
    return Message(content=content, reply_to=msg)


def summary_metrics(
    summary: dict[str, Any], n_cases: int
) -> dict[str, int | float | list[int] | list[float]]:
    """Flatten a site summary into metric keys like ``dice-WT-median``.

    A summary withheld for too few cases holds only counts, so only ``num-examples`` is sent.
    """
    values: dict[str, int | float | list[int] | list[float]] = {"num-examples": n_cases}
    for region, metrics in summary.items():
        for metric, stats in metrics.items():
            for stat in STATISTICS:
                if stats.get(stat) is not None:
                    values[f"{metric}-{region}-{stat}"] = float(stats[stat])
    return values
