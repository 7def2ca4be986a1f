"""Federated validation of a trained model: every site scores it on its own held-out cases.

An evaluation-only Flower run (``mode = "evaluate"``): no site trains, nothing but aggregate
metrics leaves a site, and the model's sha256 is recorded with the results.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluation.report import load_metrics, write_report
from fedseg.artifacts import write_json
from fedseg.config import RunConfig, simulation_sites
from fedseg.simulation import SimulationSpec, app_dir, run_simulation


def model_settings(model: Path) -> dict[str, Any]:
    """The preset and patch size a model was trained with, from the ``model.json`` beside it."""
    meta_path = model.with_suffix(".json")
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return {"model_preset": str(meta["model_preset"]), "patch_size": int(meta["patch_size"])}
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: missing (it names the network of {model})") from None
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{meta_path}: not a fedseg model description ({err})") from None


def run_evaluation(
    *, model: Path, sites_dir: Path, out: Path, on_log: Callable[[str], None]
) -> dict[str, Any]:
    """Validate ``model`` at every canonical site under ``sites_dir`` (simulation runtime)."""
    settings = model_settings(model)  # refuse a bad model before starting anything
    sites = simulation_sites(sites_dir)
    if not sites:
        raise FileNotFoundError(f"{sites_dir}: no canonical site folders (with manifest.json)")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run = RunConfig(
        mode="evaluate",
        initial_model=str(model.resolve()),
        num_server_rounds=1,
        min_train_sites=len(sites),
        run_dir=str(run_dir.resolve()),
        sim_sites_dir=str(sites_dir.resolve()),
        **settings,
    )
    spec = SimulationSpec(
        app_dir=app_dir(), run=run, num_supernodes=len(sites), work_dir=out / "flower"
    )
    run_simulation(spec, on_line=on_log)
    metrics = load_metrics(run_dir)
    write_json(out / "metrics.json", metrics)
    write_report(metrics, out, title=f"fedseg federated validation of {model.name}")
    return metrics
