"""Flower ServerApp: strategy from the run config, rounds, checkpoints, per-site metrics;
evaluation-only and cross-site validation runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from data_adapters.sources import sha256_file
from fedseg import __version__
from fedseg.artifacts import load_weights, save_weights, write_json
from fedseg.audit import AuditTrail
from fedseg.config import RunConfig
from fedseg.contributions import leave_one_out
from fedseg.cross_site import run_cross_site
from fedseg.personalise import run_personalisation
from fedseg.records import pack_weights, unpack_weights
from fedseg.resume import (
    STATE_NAME,
    load_resume_point,
    load_strategy_state,
    save_strategy_state,
    state_payload,
    study_lock,
)
from fedseg.rounds import RoundPlan, run_rounds
from fedseg.strategies import MetricsBook, build_strategy, training_harmonisation
from fedseg.study_audit import file_entry, round_fields, study_start, weights_hash
from fedseg.task.artifact import describe_artifact
from fedseg.task.model import build_model
from fedseg.task.sharing import load_partial, normalisation_keys, travelling_state

app = ServerApp()


class RoundWriter:
    """Called after every round: checkpoint the global model, rewrite ``metrics.json`` and the
    restart point, so a crashed study leaves everything up to its last round and can resume."""

    def __init__(
        self, run_dir: Path, book: MetricsBook, run: RunConfig, *, initial: dict[str, str] | None,
        trail: AuditTrail,
    ) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.book = book
        self.run = run
        self.initial = initial
        self.trail = trail
        # sha256 of the global model the next round starts from (the audit's "before").
        self.previous = ""
        # A strategy with server-side state (FedAdam's moments) saves it with each checkpoint.
        self.strategy: object = None
        # Global vs fine-tuned model per site, after the last round (fedseg.personalise).
        self.personalisation: dict[str, object] = {}
        # Leave-one-site-out effects on the other sites (fedseg.contributions).
        self.contributions: dict[str, Any] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        write_json(self.run_dir / "metrics.json", self.payload())
        if self.run.mode == "train":
            checkpoint = self.run_dir / "checkpoints" / f"round-{server_round:03d}.pt"
            digest = save_weights(checkpoint, state_dict(arrays, self.run))
            saved = save_strategy_state(self.strategy, checkpoint)
            files = [file_entry(checkpoint, self.run_dir, digest)]
            if saved:
                files.append(file_entry(checkpoint.parent / saved["file"], self.run_dir,
                                        saved["sha256"]))  # fmt: skip
            self.audit_round(server_round, arrays, files=files)
            # Written last: it names only a checkpoint and metrics that are complete on disk.
            state = state_payload(run=self.run, last_round=server_round, checkpoint=checkpoint,
                                  sha256=digest, book=self.book, strategy_state=saved)  # fmt: skip
            write_json(self.run_dir / STATE_NAME, state)
        else:
            self.audit_round(server_round, arrays, files=[])
        record = self.book.rounds.get(server_round)
        for site, scores in sorted(record.sites.items()) if record else []:
            dice = " ".join(f"{r} {v:.3f}" for r, v in scores.get("dice", {}).items())
            shown = dice or f"withheld ({scores['n_cases']} cases < min-cases-to-report)"
            log(INFO, "fedseg round %d: %s Dice %s", server_round, site, shown)
        for failure in record.failures if record else []:
            log(INFO, "fedseg round %d: %s failed in %s: %s", server_round, failure["site"],
                failure["phase"], failure["reason"])  # fmt: skip

    def audit_round(
        self, server_round: int, arrays: ArrayRecord, *, files: list[dict[str, str]]
    ) -> None:
        """The round's audit record: before the restart point, so every round a study can
        resume after is in the trail."""
        after = weights_hash(arrays)
        record = self.book.round_record(server_round)
        fields = round_fields(record, run=self.run, before=self.previous, after=after)
        self.trail.append("round", **fields, files=files)
        self.previous = after

    def payload(self) -> dict[str, object]:
        extra: dict[str, object] = {"initial_model": self.initial} if self.initial else {}
        if self.personalisation:
            extra["personalisation"] = self.personalisation
        if self.contributions:
            extra["contributions"] = self.contributions
        return {
            "fedseg_version": __version__,
            "mode": self.run.mode,
            "config": self.run.to_flower(),
            **extra,
            **self.book.to_json(),
        }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study (or evaluation) the run config describes; leave artefacts in ``run-dir``."""
    run = RunConfig.from_flower(context.run_config)
    run_dir = Path(run.run_dir) if run.run_dir else Path.cwd() / "runs" / f"run-{context.run_id}"
    # `flwr run --stream` exits 0 even when this function raises, so the outcome is a file.
    status = run_dir / "status.json"
    status.unlink(missing_ok=True)
    try:
        with study_lock(run_dir):
            run_study(run, run_dir, grid)
    except Exception as err:
        write_json(status, {"status": "failed", "reason": f"{type(err).__name__}: {err}"})
        raise
    write_json(status, {"status": "completed"})


def run_study(run: RunConfig, run_dir: Path, grid: Grid) -> None:
    """Rounds of training (or one of evaluation, or cross-site validation), then the final
    model and metrics."""
    # A resumed study's weights come from its checkpoint; initial-model may have moved since.
    model = build_model(run.model_preset, seed=run.seed) if run.resume else initial_model(run)
    if run.keeps_norm_local and not normalisation_keys(model):
        raise ValueError(
            f"strategy fedbn keeps each site's normalisation layers at the site, but model "
            f"preset '{run.model_preset}' has none to keep: use '{run.model_preset}-bn'"
        )
    size = sum(t.numel() for t in travelling(model, run).values())
    book = MetricsBook(weights_size=size)
    trail = AuditTrail(run_dir)
    info = getattr(grid, "run", None)
    study_start(trail, run=run, run_info=info, run_id=_run_id(grid))
    writer = RoundWriter(run_dir, book, run, initial=initial_model_record(run, run_dir),
                         trail=trail)  # fmt: skip
    try:
        _run_mode(run, run_dir, grid, model=model, writer=writer)
    except Exception as err:
        trail.append("study-failed", reason=f"{type(err).__name__}: {err}")
        raise


def _run_mode(
    run: RunConfig, run_dir: Path, grid: Grid, *, model: torch.nn.Module, writer: RoundWriter
) -> None:
    book = writer.book
    if run.mode == "cross-site":
        # Local models start where the study started: the preset's seeded initialisation.
        start = travelling(build_model(run.model_preset, seed=run.seed), run)
        cross = run_cross_site(
            grid, run=run, start=pack_weights(start),
            global_model=pack_weights(travelling(model, run)), book=book,
        )  # fmt: skip
        files = save_local_models(run_dir, run, cross.local_models, book=book)
        payload = writer.payload()
        payload["final"] = cross.evaluation.to_json()
        payload["cross_site"] = cross.matrix()
        write_json(run_dir / "metrics.json", payload)
        writer.trail.append("cross-site", models=cross.models,
                            dice=cross.matrix()["dice"], files=files)  # fmt: skip
        return
    run_training(run, run_dir, grid, model=model, writer=writer)


def run_training(
    run: RunConfig, run_dir: Path, grid: Grid, *, model: torch.nn.Module, writer: RoundWriter
) -> None:
    """Federated rounds (one validation-only round in evaluate mode), from round 1 or from
    where an interrupted study stopped."""
    book, first_round = writer.book, 1
    if run.resume:
        point = load_resume_point(run_dir, run, weights_size=book.weights_size)
        book = writer.book = point.book
        model.load_state_dict(point.weights)
        first_round = point.last_round + 1
        log(INFO, "fedseg: resuming the study in %s at round %d", run_dir, first_round)
    writer.previous = weights_hash(pack_weights(travelling(model, run)))
    last_round = 1 if run.mode == "evaluate" else run.num_server_rounds
    strategy = writer.strategy = build_strategy(run, book=book)
    if run.resume and point.strategy_state:
        load_strategy_state(strategy, point.strategy_state)
    privacy = getattr(strategy, "privacy", None)
    if run.resume and privacy is not None:
        # Every release so far spent privacy: the resumed accountant starts where it stood.
        privacy.restore([r.privacy for _, r in sorted(book.rounds.items()) if r.privacy])
    arrays = run_rounds(
        strategy,
        grid,
        arrays=pack_weights(travelling(model, run)),
        # Evaluation: one round in which no site trains and every site validates.
        plan=RoundPlan(
            first_round=first_round,
            last_round=last_round,
            min_sites=run.available_sites,
            wait_for_sites_s=run.wait_for_sites,
            round_timeout_s=run.round_timeout,
        ),
        on_round=writer,
    )
    if run.mode == "train":
        files = save_final_model(run_dir, run, book, arrays, provenance={
            "run_id": _run_id(grid), "strategy": run.strategy, "fedseg_version": __version__,
            # The model follows this audit record: the file and the trail vouch for each other.
            "audit_seq": writer.trail.seq - 1, "audit_hash": writer.trail.last,
        })  # fmt: skip
        if run.personalise_steps:
            writer.personalisation = run_personalisation(grid, arrays=arrays, run=run, book=book)
            writer.trail.append("personalisation", **_personal_dice(writer.personalisation))
        if run.leave_one_out:
            start = pack_weights(travelling(initial_model(run), run))
            writer.contributions = leave_one_out(grid, run=run, start=start, book=book)
            writer.trail.append("contributions", **writer.contributions)
        writer.trail.append("study-end", global_model=weights_hash(arrays), files=files)
    else:
        writer.trail.append("study-end", global_model=weights_hash(arrays), files=[])
    write_json(run_dir / "metrics.json", writer.payload())


def _personal_dice(personalisation: dict[str, Any]) -> dict[str, Any]:
    sites = {
        site: {v: entry[v].get("dice") for v in ("global", "personalised")}
        for site, entry in personalisation["sites"].items()
    }
    return {"steps": personalisation["steps"], "sites": sites,
            "failures": personalisation["failures"]}  # fmt: skip


def initial_model_record(run: RunConfig, run_dir: Path) -> dict[str, str] | None:
    """``initial-model``'s path and sha256 for ``metrics.json`` (what the study started from);
    a resumed study keeps what the interrupted one recorded."""
    if not run.initial_model:
        return None
    previous = run_dir / "metrics.json"
    if run.resume and previous.is_file():
        recorded = json.loads(previous.read_text(encoding="utf-8")).get("initial_model")
        if recorded:
            return dict(recorded)
    path = Path(run.initial_model)
    return {"path": str(path), "sha256": sha256_file(path)}


def initial_model(run: RunConfig) -> torch.nn.Module:
    """The preset's network, seeded, or loaded from ``initial-model`` when one is named."""
    model = build_model(run.model_preset, seed=run.seed)
    if run.initial_model:
        path = Path(run.initial_model)
        try:
            model.load_state_dict(load_weights(path))
        except RuntimeError as err:  # torch lists every mismatched tensor
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(
                f"{path}: weights do not fit model preset '{run.model_preset}' ({first})"
            ) from None
    return model


def _run_id(grid: Grid) -> int:
    return int(getattr(getattr(grid, "run", None), "run_id", 0) or 0)


def save_final_model(
    run_dir: Path, run: RunConfig, book: MetricsBook, arrays: ArrayRecord, *,
    provenance: Mapping[str, Any],
) -> list[dict[str, str]]:  # fmt: skip
    """Write ``model.pt`` and ``model.json``; refuse when no site ever trained. Return the
    audit's file entries of both."""
    if not any(r.train for r in book.rounds.values()):
        failures = [f for r in book.rounds.values() for f in r.failures]
        reason = failures[0]["reason"] if failures else "no site replied"
        raise RuntimeError(f"no site completed a training round (first failure: {reason})")
    path = run_dir / "model.pt"
    harmonisation, differences = training_harmonisation(book)
    trained = {s: e["fingerprint"] for r in book.rounds.values() for s, e in r.train.items()}
    provenance = {**provenance, "final_round": max(book.rounds, default=0),
                  "site_fingerprints": dict(sorted(trained.items()))}  # fmt: skip
    save_model(path, state_dict(arrays, run), run=run, trained_on="federation",
               harmonisation=harmonisation, provenance=provenance,
               conflict=differences)  # fmt: skip
    return [_file(path, run_dir), _file(path.with_suffix(".json"), run_dir)]


def _file(path: Path, run_dir: Path) -> dict[str, str]:
    return file_entry(path, run_dir, sha256_file(path))


def save_local_models(
    run_dir: Path, run: RunConfig, models: dict[str, ArrayRecord], *, book: MetricsBook
) -> list[dict[str, str]]:
    """Each site's own model from cross-site validation, as ``local-models/<site>.pt``, with
    the harmonisation that site reported while training it."""
    files = []
    reported = book.harmonisation_by_site()
    for site, arrays in models.items():
        path = run_dir / "local-models" / f"{site}.pt"
        save_model(path, state_dict(arrays, run), run=run, trained_on=site,
                   harmonisation=reported.get(site),
                   provenance={"fedseg_version": __version__})  # fmt: skip
        files.append(_file(path, run_dir))
    return files


def travelling(model: torch.nn.Module, run: RunConfig) -> dict[str, torch.Tensor]:
    """What of ``model`` the server sends and the sites return in this study."""
    return travelling_state(model, keep_norm_local=run.keeps_norm_local)


def state_dict(arrays: ArrayRecord, run: RunConfig) -> dict[str, torch.Tensor]:
    """Packed weights from the wire back into the preset's full state dict; what never
    travels (FedBN's normalisation, integer counters) is the preset's seeded initial value."""
    model = build_model(run.model_preset, seed=run.seed)
    load_partial(model, unpack_weights(arrays, travelling(model, run)))
    return dict(model.state_dict())


def save_model(
    path: Path, state: Mapping[str, torch.Tensor], *, run: RunConfig, trained_on: str,
    harmonisation: Mapping[str, Any] | None, provenance: Mapping[str, Any],
    conflict: Sequence[str] = (),
) -> None:  # fmt: skip
    """Weights plus the ``.json`` beside them: the model artefact
    (:mod:`fedseg.task.artifact`: network, harmonisation, labels, provenance) and how it was
    trained (what ``fedseg evaluate`` and cross-site validation read)."""
    digest = save_weights(path, state)
    artifact = describe_artifact(weights=path, sha256=digest, preset=run.model_preset,
                                 roi_size=run.patch_size, harmonisation=harmonisation,
                                 provenance={**provenance, "trained_on": trained_on})  # fmt: skip
    write_json(
        path.with_suffix(".json"),
        {
            **artifact,
            "rounds": run.num_server_rounds,
            "local_steps": run.local_steps,
            "batch_size": run.batch_size,
            "learning_rate": run.learning_rate,
            "seed": run.seed,
            "trained_on": trained_on,
            "strategy": run.strategy,
            # FedBN: these layers hold the initialisation; each site's own never left it.
            "site_local_layers": "normalisation" if run.keeps_norm_local else "",
            "fedseg_version": __version__,
            # The sites' spacings when they differ (the model then has no one harmonisation).
            **({"harmonisation_conflict": list(conflict)} if conflict else {}),
        },
    )
