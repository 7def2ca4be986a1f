"""Federated validation of a trained model: every site scores it on its own held-out cases.

An evaluation-only Flower run (``mode = "evaluate"``): no site trains, nothing but aggregate
metrics leaves a site (per-case values only where a site's consent allows it), and the model's
sha256 is recorded with the results. With cross-site validation (``mode = "cross-site"``,
:mod:`fedseg.cross_site`) each site also trains a model alone and every model is validated at
every site.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.report import load_metrics, write_report
from evaluation.summary import DEFAULT_MIN_CASES
from fedseg.artifacts import write_json
from fedseg.config import RunConfig, simulation_sites
from fedseg.simulation import SimulationSpec, app_dir, run_simulation


def model_settings(model: Path) -> dict[str, Any]:
    """The preset and patch size a model was trained with, from the ``model.json`` beside it."""
    meta = _model_description(model)
    if meta.get("site_local_layers"):
        raise ValueError(
            f"{model}: trained with {meta.get('strategy', 'fedbn')}, its "
            f"{meta['site_local_layers']} layers stayed at each site; this file holds only "
            "their initialisation, so it cannot be validated as one model"
        )
    try:
        return {"model_preset": str(meta["model_preset"]), "patch_size": int(meta["patch_size"])}
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{model.with_suffix('.json')}: not a fedseg model description ({err})"
        ) from None


_BUDGET = ("local_steps", "batch_size", "learning_rate", "seed")


def training_budget(model: Path) -> dict[str, Any]:
    """How the model's study trained (rounds, local steps, batch, learning rate, seed), so
    cross-site local models get the same budget; RunConfig's defaults where not recorded."""
    meta = _model_description(model)
    defaults = RunConfig()
    keys = {"rounds": "num_server_rounds", **{k: k for k in _BUDGET}}
    return {field: meta.get(key, getattr(defaults, field)) for key, field in keys.items()}


def _model_description(model: Path) -> dict[str, Any]:
    meta_path = model.with_suffix(".json")
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: missing (it names the network of {model})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: not a fedseg model description ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a fedseg model description (not a JSON object)")
    return meta


@dataclass(frozen=True, kw_only=True)
class CrossSitePlan:
    """Cross-site validation: train one model per site with this budget (``None``: the
    evaluated model's own, from its ``model.json``)."""

    rounds: int | None = None
    local_steps: int | None = None


def run_evaluation(
    *,
    model: Path,
    sites_dir: Path,
    out: Path,
    on_log: Callable[[str], None],
    cross_site: CrossSitePlan | None = None,
    min_cases_to_report: int = DEFAULT_MIN_CASES,
) -> dict[str, Any]:
    """Validate ``model`` at every canonical site under ``sites_dir`` (simulation runtime);
    with ``cross_site``, also each site's own model at every site."""
    settings = model_settings(model)  # refuse a bad model before starting anything
    sites = simulation_sites(sites_dir)
    if not sites:
        raise FileNotFoundError(f"{sites_dir}: no canonical site folders (with manifest.json)")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra: dict[str, Any] = {}
    if cross_site is not None:
        extra = training_budget(model)
        if cross_site.rounds is not None:
            extra["num_server_rounds"] = cross_site.rounds
        if cross_site.local_steps is not None:
            extra["local_steps"] = cross_site.local_steps
    run = RunConfig(
        mode="evaluate" if cross_site is None else "cross-site",
        initial_model=str(model.resolve()),
        min_train_sites=len(sites),
        min_cases_to_report=min_cases_to_report,
        run_dir=str(run_dir.resolve()),
        sim_sites_dir=str(sites_dir.resolve()),
        **{"num_server_rounds": 1, **settings, **extra},
    )
    spec = SimulationSpec(
        app_dir=app_dir(), run=run, num_supernodes=len(sites), work_dir=out / "flower"
    )
    run_simulation(spec, on_line=on_log)
    metrics = load_metrics(run_dir)
    write_json(out / "metrics.json", metrics)
    kind = "federated validation" if cross_site is None else "cross-site validation"
    write_report(metrics, out, title=f"fedseg {kind} of {model.name}")
    return metrics
