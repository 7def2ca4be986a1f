"""The ``fedseg`` command line: one thin command per workflow, each calling a typed function.

Errors print one line naming the file and the problem and exit 1; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from data_adapters.errors import DataError
from fedseg.deploy.pki_cli import pki_app

app = typer.Typer(
    help="Federated BraTS-style brain-tumour segmentation across hospitals (Flower + MONAI).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(pki_app, name="pki")
audit_app = typer.Typer(
    help="A study's hash-chained audit trail (audit.jsonl).", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")
# soft_wrap: never break a file path across lines; users copy them.
console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}
# Flower log lines worth showing while a study runs; everything goes to the log file.
_FLOWER_PROGRESS = re.compile(r"\[ROUND|fedseg round|failures|ERROR|Traceback|finished in|Error")


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False) -> None:
    """fedseg: only model parameters and aggregate metrics ever leave a site."""
    _state["debug"] = debug


def friendly_errors(func: F) -> F:
    """Turn expected failures into one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (DataError, OSError, ValueError, RuntimeError, KeyError) as err:
            if _state["debug"]:
                raise
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _progress(message: str) -> None:
    console.print(f"[dim]·[/dim] {message}", highlight=False)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output folder for the whole demo.")] = Path("demo-run"),
    sites: Annotated[
        int | None, typer.Option(min=2, help="Simulated hospitals [default: 5, or 3 with --quick].")
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Federated rounds.")] = None,
    quick: Annotated[bool, typer.Option(help="Smaller, faster demo.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the generated federation.")] = 0,
) -> None:
    """Generate a federation, harmonise each site, train with Flower, validate at every site."""
    from fedseg.demo import demo_plan, run_demo

    plan = demo_plan(sites=sites, rounds=rounds, quick=quick, seed=seed)
    with _flower_log(out / "flower" / "run.log") as on_log:
        metrics = run_demo(out, plan=plan, progress=_progress, on_log=on_log)
    _print_final(metrics)
    console.print(
        f"[green]done[/green]: {out / 'report.html'}, {out / 'metrics.json'}, {out / 'model.pt'}"
    )


@contextmanager
def _flower_log(path: Path, *, append: bool = False) -> Iterator[Callable[[str], None]]:
    """A sink for Flower's log lines: all to ``path``, the progress ones to the console."""
    # SIGTERM (a scheduler, a timeout) must unwind like Ctrl-C so Flower gets stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as log:

        def on_log(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            if _FLOWER_PROGRESS.search(line):
                console.print(f"  [dim]flower[/dim] {_strip_ansi(line)}", highlight=False)

        yield on_log


def _strip_ansi(line: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", line).replace("INFO :", "").strip()


def _print_final(metrics: dict[str, Any]) -> None:
    final = metrics.get("final")
    if not final:
        console.print("[yellow]no validation results recorded[/yellow]")
        return
    for name, site in sorted(final["sites"].items()):
        dice = "  ".join(f"{r} {v:.3f}" for r, v in site["dice"].items()) if "dice" in site else ""
        console.print(f"  {name:<14} n={site['n_cases']:<3} Dice {dice or 'withheld (n < min)'}")
    pooled = "  ".join(f"{r} {v:.3f}" for r, v in final["pooled"].get("dice", {}).items())
    console.print(f"  {'pooled':<14} n={final['pooled']['n_cases']:<3} Dice {pooled}")


@app.command()
@friendly_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder for the raw federation.")],
    sites: Annotated[int, typer.Option(min=1, help="Sites (the first five use five layouts).")] = 5,
    cases: Annotated[int, typer.Option(min=2, help="Cases at the largest site.")] = 12,
    seed: Annotated[int, typer.Option()] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing site folders.")] = False,
) -> None:
    """Write a raw heterogeneous multi-site federation (no harmonisation)."""
    from fedseg.synth import generate_federation

    paths = generate_federation(
        out, n_sites=sites, cases_per_site=cases, seed=seed, progress=_progress, overwrite=overwrite
    )
    console.print(f"[green]done[/green]: {len(paths)} sites under {out}")


@app.command()
@friendly_errors
def convert(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="DICOM series folder, NIfTI, NRRD or MHA.")
    ],
    output: Annotated[Path, typer.Argument(help="Output .nii.gz file.")],
    series: Annotated[
        str | None, typer.Option(help="SeriesInstanceUID, when the folder holds several.")
    ] = None,
) -> None:
    """Convert one image to NIfTI with the same world geometry (no resampling)."""
    import warnings

    from data_adapters.convert import convert_image

    with warnings.catch_warnings(record=True):  # the notes below say the same, once
        warnings.simplefilter("always")
        result = convert_image(input_path, output, series_uid=series)
    for note in result.notes:
        console.print(f"[yellow]warning[/yellow]: {input_path}: {note}", highlight=False)
    g = result.geometry
    console.print(
        f"[green]done[/green]: {output} ({'x'.join(map(str, g.shape))} voxels, "
        f"spacing {' x '.join(f'{v:.4g}' for v in g.spacing)} mm, {g.axcodes}, {result.dtype})",
        highlight=False,
    )


@app.command()
@friendly_errors
def harmonise(
    raw_dir: Annotated[Path, typer.Argument(help="A raw site folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Canonical site folder to write.")],
    layout: Annotated[
        str | None, typer.Option(help="Layout name or mapping .toml; detected when omitted.")
    ] = None,
    spacing: Annotated[float, typer.Option(help="Target isotropic spacing in mm.")] = 1.0,
    validation_fraction: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Cases held out for validation; 1 = an evaluation-only site."
        ),
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    strict: Annotated[bool, typer.Option(help="Any bad case is fatal.")] = False,
    register: Annotated[
        bool,
        typer.Option(
            help="Rigidly register every modality to t1n (always done when grids do not overlap)."
        ),
    ] = False,
    min_size: Annotated[
        int, typer.Option(min=0, help="Pad every case to at least N voxels per axis.")
    ] = 0,
    qc: Annotated[bool, typer.Option(help="Write qc/ histograms, overlays and summary.")] = True,
) -> None:
    """Turn a raw site folder into a validated, harmonised canonical dataset.

    --layout is one of brats2023, brats2021, brats2024-gli (2023 names, label 4 = resection
    cavity, dropped), dicom-study, msd, nnunet-raw, or a mapping .toml file; all but
    brats2024-gli and mapping files are detected when omitted.
    """
    from data_adapters.site import harmonise_site

    result = harmonise_site(
        raw_dir, out_dir, layout=layout, target_spacing=(spacing,) * 3,
        validation_fraction=validation_fraction, seed=seed, strict=strict, progress=_progress,
        register=register, min_size=min_size, qc=qc,
    )  # fmt: skip
    for s in result.skipped:
        console.print(
            f"[yellow]skipped[/yellow] {s.case_id}: {s.file}: {s.reason}", highlight=False
        )
    n = len(result.manifest.train_cases) + len(result.manifest.validation_cases)
    console.print(f"[green]done[/green]: {n} cases in {out_dir}, {len(result.skipped)} skipped")


@audit_app.command("verify")
@friendly_errors
def audit_verify(
    run_dir: Annotated[Path, typer.Argument(help="A study's run folder (holds audit.jsonl).")],
) -> None:
    """Check the audit trail's hash chain and every checkpoint and model it names; name the
    first record or file that does not fit (exit 1)."""
    from fedseg.audit import verify_run

    checked = verify_run(run_dir)
    console.print(
        f"[green]ok[/green]: {run_dir / 'audit.jsonl'}: {checked.records} records chained, "
        f"{checked.files} files match their sha256"
    )


@app.command("check-site")
@friendly_errors
def check_site_cmd(
    site_dir: Annotated[Path, typer.Argument(help="Canonical site folder.")],
) -> None:
    """Validate a canonical site folder."""
    from data_adapters.validate import check_site

    manifest = check_site(site_dir)
    console.print(
        f"[green]ok[/green]: {manifest.site}: {len(manifest.train_cases)} training, "
        f"{len(manifest.validation_cases)} validation cases, "
        f"fingerprint {manifest.fingerprint[:16]}"
    )


@app.command()
@friendly_errors
def metrics(
    reference: Annotated[Path, typer.Option(help="Reference segmentation (NIfTI label map).")],
    prediction: Annotated[Path, typer.Option(help="Predicted segmentation on the same grid.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    labels: Annotated[
        str,
        typer.Option(
            help="Label scheme of both files: brats2023 (canonical), brats2021 (ET = 4), msd,"
            " brats2024-gli."
        ),
    ] = "brats2023",
    lesion_wise: Annotated[
        bool, typer.Option(help="Add BraTS 2023 lesion-wise Dice, HD95 and TP/FN/FP lesions.")
    ] = False,
) -> None:
    """Dice, HD95 (mm), sensitivity, specificity and volumes per region (WT, TC, ET)."""
    from evaluation.case import score_files

    scores = score_files(
        reference=reference, prediction=prediction, labels=labels, lesion_wise=lesion_wise
    )
    if as_json:
        typer.echo(json.dumps({r: s.as_dict() for r, s in scores.items()}, allow_nan=False))
        return
    header = "region    Dice   HD95 mm   Sens    Spec    ref ml  pred ml"
    if lesion_wise:
        header += "  | LW Dice  LW HD95   TP  FN  FP"
    typer.echo(header)
    for region, s in scores.items():
        line = (
            f"{region:<6} {s.dice:7.4f} {s.hd95:9.2f} {s.sensitivity:6.4f} {s.specificity:7.5f}"
            f" {s.reference_ml:9.2f} {s.prediction_ml:8.2f}"
        )
        if s.lesions is not None:
            les = s.lesions
            line += f"  | {les.dice:7.4f} {les.hd95:8.2f} {les.tp:4d} {les.fn:3d} {les.fp:3d}"
        typer.echo(line)


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="Model weights (model.pt, with model.json beside).")],
    sites: Annotated[Path, typer.Option(help="Folder of canonical site folders.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("evaluation-run"),
    cross_site: Annotated[
        bool,
        typer.Option(
            help="Also train one model per site alone and validate every model at every site"
            " (a models x sites matrix)."
        ),
    ] = False,
    local_rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Cross-site: rounds of local training [default: MODEL's]."),
    ] = None,
    local_steps: Annotated[
        int | None,
        typer.Option(min=1, help="Cross-site: steps per round [default: MODEL's]."),
    ] = None,
    min_cases_to_report: Annotated[
        int,
        typer.Option(min=1, help="A site with fewer validation cases sends only their count."),
    ] = 3,
) -> None:
    """Federated validation: every site scores MODEL on its own validation cases, trains nothing.

    Only aggregate metrics leave a site (per-case values only where its site.toml allows it);
    with --cross-site each site also trains a model on its own data, with MODEL's training
    budget, and every model is validated at every site.
    """
    from fedseg.evaluate import CrossSitePlan, model_settings, run_evaluation

    model_settings(model)  # a wrong model is refused before anything is written
    plan = CrossSitePlan(rounds=local_rounds, local_steps=local_steps) if cross_site else None
    if not cross_site and (local_rounds or local_steps):
        raise typer.BadParameter("--local-rounds and --local-steps need --cross-site")
    with _flower_log(out / "flower" / "run.log") as on_log:
        metrics = run_evaluation(
            model=model, sites_dir=sites, out=out, on_log=on_log, cross_site=plan,
            min_cases_to_report=min_cases_to_report,
        )  # fmt: skip
    _print_final(metrics)
    if metrics.get("cross_site"):
        _print_cross_site(metrics["cross_site"])
    console.print(f"[green]done[/green]: {out / 'report.html'}, {out / 'metrics.json'}")


def _print_cross_site(cross: dict[str, Any]) -> None:
    console.print("  WT Dice, trained on (rows) x validated at (columns):")
    console.print("  " + " " * 14 + "".join(f"{s[:12]:>13}" for s in cross["sites"]))
    for name, row in zip(cross["models"], cross["dice"]["WT"], strict=True):
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>13}" for v in row)
        console.print(f"  {name:<14}{cells}", highlight=False)


@app.command()
@friendly_errors
def predict(
    model: Annotated[Path, typer.Option(help="The model: model.json (model.pt beside it).")],
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            help="A case folder (any layout fedseg reads, or a DICOM study); with "
            "--batch, a raw site folder.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder (with --batch: one per case).")],
    batch: Annotated[bool, typer.Option(help="Predict every case of a raw site folder.")] = False,
    case: Annotated[
        str | None, typer.Option(help="The case id, for layouts that keep cases as files.")
    ] = None,
    layout: Annotated[str | None, typer.Option(help="Layout name; detected when omitted.")] = None,
    label_scheme: Annotated[
        str, typer.Option(help="Output labels: brats2023 (3 = ET) or brats2021 (4 = ET).")
    ] = "brats2023",
    mirror: Annotated[
        bool, typer.Option(help="Test-time mirroring: mean over 8 flips (8x slower).")
    ] = False,
    keep_canonical: Annotated[
        bool, typer.Option(help="Also keep the harmonised scans and labels (OUT/canonical/).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Segment a new patient's scans with a trained model, on the scan's own grid.

    Writes seg.nii.gz (the input t1n's shape and affine), volumes.json (ml per label and
    region) and, for DICOM input, seg.dcm (DICOM-SEG referencing the t1n series). The scans
    are harmonised with the parameters the model records, never with flags.
    """
    from rich.progress import track

    from fedseg.task.artifact import load_artifact
    from fedseg.task.device import resolve_device
    from fedseg.task.predict import (
        CaseFailure,
        PredictOptions,
        find_case,
        output_values,
        predict_case,
        predict_one_of_many,
        site_cases,
    )

    artifact = load_artifact(model)
    output_values(label_scheme)  # refuse an unusable scheme before any work
    network = artifact.network(resolve_device(device))
    options = PredictOptions(label_scheme=label_scheme, mirror=mirror,
                             keep_canonical=keep_canonical)  # fmt: skip
    if not batch:
        result = predict_case(artifact, network, find_case(input, case_id=case, layout=layout),
                              out, options=options)  # fmt: skip
        _print_prediction(result)
        return
    cases, failures = site_cases(input, layout=layout)
    for raw in track(cases, description="predicting", console=console):
        outcome = predict_one_of_many(artifact, network, raw, out, options=options)
        if isinstance(outcome, CaseFailure):
            failures.append(outcome)
        else:
            _print_prediction(outcome)
    for failure in failures:
        console.print(
            f"[yellow]failed[/yellow] {failure.case_id}: {failure.reason}", highlight=False
        )
    console.print(f"[green]done[/green]: {len(cases) - len(failures)} cases predicted into {out}, "
                  f"{len(failures)} failed")  # fmt: skip
    if failures and len(failures) >= len(cases):
        raise typer.Exit(1)


def _print_prediction(result: Any) -> None:
    volumes = json.loads(result.volumes.read_text())["regions"]
    sizes = ", ".join(f"{r} {v:.1f} ml" for r, v in volumes.items())
    extra = f", {result.dicom_seg.name}" if result.dicom_seg else ""
    console.print(f"{result.case_id}: {result.seg}{extra} ({sizes})", highlight=False)


@app.command()
@friendly_errors
def report(
    run_dir: Annotated[
        Path | None, typer.Argument(help="Run folder holding metrics.json (or the file).")
    ] = None,
    site: Annotated[
        Path | None,
        typer.Option(help="Instead: a canonical site folder; writes its local site_report.html."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: RUN_DIR, or the site folder).")
    ] = None,
) -> None:
    """Write report.html (self-contained), report.md and PNG plots from a run's metrics.json.

    With --site: site_report.html, a site's own QC report (images of its patients: local only).
    """
    if (run_dir is None) == (site is None):
        raise typer.BadParameter("give either RUN_DIR or --site SITE_DIR, not both or neither")
    if site is not None:
        from evaluation.site_report import write_site_report

        path = write_site_report(site, out=out)
        console.print(f"[green]done[/green]: {path} (stays at the site)", highlight=False)
        return
    from evaluation.report import report_run
    from fedseg.audit import audit_summary

    assert run_dir is not None  # for mypy: checked above
    files = report_run(run_dir, out=out, audit=audit_summary(run_dir))
    console.print(f"[green]done[/green]: {files.html}, {files.markdown}", highlight=False)


@app.command()
@friendly_errors
def client(
    site_config: Annotated[
        Path, typer.Option(help="The site's site.toml: data, consent, SuperLink, CA and key.")
    ],
    check_only: Annotated[
        bool, typer.Option(help="Run the start-up checks and stop (no connection made).")
    ] = False,
) -> None:
    """Run this hospital's SuperNode: check its data and certificates, then take part in the
    studies the coordinator's SuperLink runs, as far as the site's consent allows.

    Scans never leave the site: the SuperNode sends only model updates and aggregate metrics.
    """
    from fedseg.deploy.client import preflight, read_client_settings, run_client

    settings = read_client_settings(site_config)
    if check_only:
        preflight(settings, say=_progress)
        console.print("[green]ready[/green]: start-up checks passed", highlight=False)
        return
    code = run_client(settings, say=_progress)
    raise typer.Exit(code)


@app.command()
@friendly_errors
def superlink(
    pki: Annotated[
        Path | None,
        typer.Option(help="Pilot PKI folder (fedseg pki init): TLS + SuperNode authentication."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port of the SuperLink's API (sites and flwr).")] = 9092,
    database: Annotated[
        Path, typer.Option(help="SuperLink state (registered sites, runs); survives restarts.")
    ] = Path("superlink.db"),
    server_name: Annotated[
        str | None, typer.Option(help="Check the certificate is valid for this host name.")
    ] = None,
) -> None:
    """Run the coordinator's SuperLink (Flower) with TLS and SuperNode authentication.

    Without --pki it refuses anything but loopback (an insecure local trial).
    """
    from fedseg.deploy.coordinator import superlink_args
    from fedseg.deploy.processes import TRANSFER_ENV
    from fedseg.simulation import FLOWER_ENV

    command = superlink_args(pki_dir=pki, host=host, port=port, database=database,
                             check_host=server_name)  # fmt: skip
    _progress(" ".join(command))
    env = {**os.environ, **FLOWER_ENV, **TRANSFER_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # exec, not a child: signals (docker stop, systemd) reach the SuperLink itself.
    os.execvpe(command[0], command, env)


@app.command("register-sites")
@friendly_errors
def register_sites_cmd(
    pki: Annotated[Path, typer.Option(help="Pilot PKI folder holding sites.json.")],
    connection: Annotated[str, typer.Option(help="SuperLink connection ($FLWR_HOME/config.toml).")],
) -> None:
    """Register every (non-revoked) site's public key with the SuperLink."""
    from fedseg.deploy.coordinator import register_sites

    for site, node in register_sites(pki, connection=connection, env=os.environ).items():
        console.print(f"  {site:<16} node {node}", highlight=False)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@app.command()
@friendly_errors
def study(
    connection: Annotated[str, typer.Option(help="SuperLink connection ($FLWR_HOME/config.toml).")],
    config: Annotated[
        Path | None, typer.Option(help="Study preset, e.g. configs/brats-fedavg.toml.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run folder from its last completed round.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/study-<time>).")
    ] = None,
    wait_for_sites: Annotated[
        int | None, typer.Option(min=0, help="Seconds to wait for min-train-sites sites.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a run-config key: key=value.")
    ] = None,
) -> None:
    """Submit a study to a SuperLink, stream its progress, and write its report.

    The run folder gets metrics.json, a checkpoint per round, model.pt and report.html; after
    a crash or restart, --resume RUN_DIR continues from the last completed round.
    """
    from evaluation.report import report_run
    from fedseg.audit import audit_summary
    from fedseg.deploy.coordinator import StudyRequest, study_config, submit_study

    overrides = _overrides(set_ or [])
    if wait_for_sites is not None:
        overrides["wait-for-sites"] = wait_for_sites
    request = StudyRequest(connection=connection, config=config, overrides=overrides,
                           run_dir=run_dir, resume=resume)  # fmt: skip
    run, folder = study_config(request)
    _progress(f"study {'resumed' if run.resume else 'submitted'}: run folder {folder}")
    # Appended: a resumed study's log follows the interrupted one's (the audit trail).
    with _flower_log(folder / "flower" / "study.log", append=True) as on_log:
        submit_study(run, folder, connection=connection, on_line=on_log, env=os.environ)
    files = report_run(folder, audit=audit_summary(folder))
    metrics = json.loads((folder / "metrics.json").read_text())
    _print_final(metrics)
    console.print(f"[green]done[/green]: {files.html}, {folder / 'model.pt'}", highlight=False)
