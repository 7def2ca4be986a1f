"""The coordinator's side: the SuperLink, the sites' keys, and submitting a study.

A study is ``flwr run`` against a named connection (in ``$FLWR_HOME/config.toml``) with the
study's run config; fedseg adds what Flower leaves out: the config checked before it is
sent, a run folder on the coordinator's disk that gets ``metrics.json``, checkpoints, the
model and the report, and ``--resume`` from that folder after a crash.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedseg.config import ConfigError, RunConfig, Scalar
from fedseg.deploy.pki import PkiPaths, check_public_key, check_server_pair, list_sites
from fedseg.deploy.processes import ServerTls, superlink_command
from fedseg.resume import read_state, study_lock
from fedseg.simulation import FLOWER_ENV, SimulationError, app_dir, check_status


def pki_server_tls(pki_dir: Path, *, host: str | None = None) -> ServerTls:
    """The SuperLink's certificate chain from a pilot PKI folder, checked."""
    paths = PkiPaths.at(pki_dir)
    check_server_pair(paths.server_cert, paths.server_key, paths.ca_cert, host=host)
    return ServerTls(ca=paths.ca_cert, cert=paths.server_cert, key=paths.server_key)


def superlink_args(
    *, pki_dir: Path | None, host: str, port: int, database: Path, check_host: str | None = None
) -> list[str]:
    """The ``flower-superlink`` command: TLS and node authentication from ``pki_dir``;
    ``None`` only for an insecure loopback trial."""
    if pki_dir is None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError("an insecure SuperLink may only listen on loopback; give --pki")
        return superlink_command(host=host, port=port, database=database, tls=None,
                                 node_auth=False)  # fmt: skip
    tls = pki_server_tls(pki_dir, host=check_host)
    return superlink_command(host=host, port=port, database=database, tls=tls, node_auth=True)


def register_site(public_key: Path, *, site: str, connection: str, env: Mapping[str, str]) -> int:
    """``flwr supernode register`` for one site's public key; returns its node id."""
    check_public_key(public_key)
    proc = subprocess.run(
        ["flwr", "supernode", "register", str(public_key), connection, "--name", site,
         "--format", "json"],
        env={**env, **FLOWER_ENV}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        answer = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        detail = (answer.get("error-message") or proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"{public_key}: registering site '{site}' failed: {detail[-500:]}")
    return int(answer["node-id"])


def register_sites(pki_dir: Path, *, connection: str, env: Mapping[str, str]) -> dict[str, int]:
    """Register every site in the PKI registry that is not revoked; site -> node id."""
    ids = {}
    for record in list_sites(pki_dir):
        if record.active:
            ids[record.name] = register_site(record.public_key, site=record.name,
                                             connection=connection, env=env)  # fmt: skip
    return ids


@dataclass(frozen=True, kw_only=True)
class StudyRequest:
    """What ``fedseg study`` submits: a run config (file + overrides) or a run to resume."""

    connection: str
    config: Path | None = None
    overrides: Mapping[str, Scalar] | None = None
    run_dir: Path | None = None
    resume: Path | None = None


def study_config(request: StudyRequest) -> tuple[RunConfig, Path]:
    """The checked run config and the run folder it writes to."""
    if (request.config is None) == (request.resume is None):
        raise ConfigError("give either --config (a new study) or --resume RUN_DIR, not both")
    if request.resume is not None:
        run_dir = request.resume.resolve()
        if request.run_dir is not None or "resume" in (request.overrides or {}):
            raise ConfigError("--resume continues RUN_DIR itself: no --run-dir, no --set resume")
        with study_lock(run_dir):  # refused while the interrupted ServerApp still runs
            values: dict[str, object] = dict(read_state(run_dir)["config"])
        values["resume"] = True
    else:
        assert request.config is not None
        try:
            values = tomllib.loads(request.config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{request.config}: cannot read the study config ({err})") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = (request.run_dir or Path("runs") / f"study-{stamp}").resolve()
        if (run_dir / "state.json").exists():
            raise ConfigError(f"{run_dir}: holds a study already; resume it with --resume")
    values |= dict(request.overrides or {})
    values["run-dir"] = str(run_dir)
    source = request.config or run_dir / "state.json"
    unknown = sorted(set(values) - set(RunConfig().to_flower()))
    if unknown:
        raise ConfigError(f"{source}: unknown run-config key(s) {unknown}")
    try:
        return RunConfig.from_flower(values), run_dir
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def submit_study(
    run: RunConfig, run_dir: Path, *, connection: str, on_line: Callable[[str], None],
    env: Mapping[str, str],
) -> None:  # fmt: skip
    """``flwr run --stream`` the study and wait for it; raise unless the ServerApp finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "run-config.toml"
    config_file.write_text(tomli_w.dumps(run.to_flower()))
    command = ["flwr", "run", str(app_dir()), connection, "--run-config", str(config_file),
               "--stream"]  # fmt: skip
    proc = subprocess.Popen(command, env={**env, **FLOWER_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
    try:
        check_status(run_dir)
    except SimulationError as err:
        hint = f"; continue it with `fedseg study --resume {run_dir}`"
        resumable = (run_dir / "state.json").is_file()
        raise RuntimeError(
            f"{err} (flwr run exited with {code}){hint if resumable else ''}"
        ) from None
