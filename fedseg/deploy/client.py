"""``fedseg client --site-config site.toml``: a hospital's SuperNode, checked before it connects.

The site config stays at the hospital (it is never part of the app bundle)::

    [site]
    name = "hospital-a"                 # must match the dataset's manifest
    data-path = "/data/fedseg/hospital-a"
    num-threads = 8
    # egress-log = "/var/log/fedseg/egress.jsonl"  # every reply sent (default: work-dir/logs)

    [consent]                           # what this site takes part in (see fedseg.config)
    train = true
    share-per-case = false

    [connection]
    superlink = "fl.coordinator.example.org:9092"
    root-certificates = "/etc/fedseg/ca.crt"      # the study's CA: verifies the SuperLink
    auth-private-key = "/etc/fedseg/hospital-a.key"  # registered with the coordinator
    runtime-port = 9094                 # loopback only: SuperNode <-> ClientApp
    executor = "fedseg"                 # or "flower": a fresh process per message
    work-dir = "/var/lib/fedseg"        # logs, node config, app cache (default: beside this)
    # insecure = true                   # loopback trials only: no TLS, no authentication

Before anything connects, the data folder passes ``check-site``, the certificates and the key
load and are in date, and the key is not readable by others; when the SuperLink is reachable,
its certificate is verified against the CA, so a wrong CA fails here with a plain message
rather than as a retrying gRPC error. Then the SuperNode and fedseg's SuperExec run until
either stops or the client is told to stop; both are stopped together.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from data_adapters.manifest import SiteManifest
from data_adapters.validate import check_site
from fedseg.config import ConfigError, RunConfig, SiteConfig, node_keys, read_site_tables
from fedseg.deploy.pki import check_auth_private_key, check_ca_certificate
from fedseg.deploy.processes import (
    EXECUTORS,
    SuperNodeSpec,
    start,
    superexec_command,
    supernode_command,
)
from fedseg.simulation import flower_env, stop_process_tree, wait_until_listening
from fedseg.task.device import resolve_device

_CONNECTION_KEYS = ("superlink", "root-certificates", "auth-private-key", "runtime-port",
                    "executor", "insecure", "work-dir")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """One site's ``site.toml``, parsed and resolved against the file's folder."""

    source: Path
    name: str
    site: SiteConfig
    node_config: dict[str, object]
    superlink: str
    root_certificates: Path | None
    auth_private_key: Path | None
    runtime_port: int
    executor: str
    work_dir: Path

    @property
    def insecure(self) -> bool:
        return self.root_certificates is None


def _path(value: object, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def read_client_settings(path: Path) -> ClientSettings:
    """Parse ``site.toml``; every error names the file and the key."""
    tables = read_site_tables(path)
    if not tables:
        raise ConfigError(f"{path}: no such site config")
    connection = dict(tables.get("connection", {}))
    unknown = sorted(set(connection) - set(_CONNECTION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown [connection] key(s) {unknown}; known: "
                          f"{list(_CONNECTION_KEYS)}")  # fmt: skip
    base = path.parent
    flat = node_keys(tables)
    if "data-path" not in flat:
        raise ConfigError(f"{path}: [site] data-path is missing (the site's canonical folder)")
    flat["data-path"] = str(_path(flat["data-path"], base))
    work_dir = _path(connection.get("work-dir", ".fedseg-client"), base)
    # What the egress guard logged leaving this site: with the client's other logs.
    flat["egress-log"] = str(_path(flat.get("egress-log", work_dir / "logs" / "egress.jsonl"),
                                   base))  # fmt: skip
    site = SiteConfig.from_mapping(flat, source=str(path))
    if "superlink" not in connection:
        raise ConfigError(f"{path}: [connection] superlink is missing (host:port)")
    insecure = connection.get("insecure", False) is True
    certificates = {k: connection.get(k) for k in ("root-certificates", "auth-private-key")}
    if not insecure and not all(certificates.values()):
        raise ConfigError(
            f"{path}: [connection] needs root-certificates and auth-private-key (or insecure "
            "= true for a loopback trial)"
        )
    executor = str(connection.get("executor", "fedseg"))
    if executor not in EXECUTORS:
        raise ConfigError(f"{path}: [connection] executor '{executor}' unknown; {EXECUTORS}")
    return ClientSettings(
        source=path,
        name=str(tables.get("site", {}).get("name", "")),
        site=site,
        node_config=flat,
        superlink=str(connection["superlink"]),
        root_certificates=None if insecure else _path(certificates["root-certificates"], base),
        auth_private_key=None if insecure else _path(certificates["auth-private-key"], base),
        runtime_port=_port(connection.get("runtime-port", 9094), path),
        executor=executor,
        work_dir=work_dir,
    )


def _port(value: object, source: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{source}: [connection] runtime-port must be a port number, "
                          f"got {value!r}")  # fmt: skip
    return value


def _host_port(address: str, source: Path) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{source}: [connection] superlink '{address}' is not host:port")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def preflight(settings: ClientSettings, *, say: Callable[[str], None]) -> SiteManifest:
    """Everything checked before the SuperNode starts; returns the site's manifest."""
    manifest = check_site(settings.site.data_path)
    if settings.name and settings.name != manifest.site:
        raise ConfigError(
            f"{settings.source}: [site] name is '{settings.name}' but {settings.site.data_path} "
            f"holds site '{manifest.site}'"
        )
    counts = f"{len(manifest.train_cases)} training, {len(manifest.validation_cases)} validation"
    say(f"site data: {manifest.site}, {counts} cases, fingerprint {manifest.fingerprint[:12]}")
    try:
        device = resolve_device(settings.site.device)
    except ValueError as err:
        raise ConfigError(f"{settings.source}: [site] {err}") from None
    say(f"compute device: {device}")
    # The server could ask for anything; refuse a site that can take part in nothing.
    if not (settings.site.consent.train or settings.site.consent.evaluate):
        raise ConfigError(f"{settings.source}: the site consents to neither train nor evaluate")
    host, port = _host_port(settings.superlink, settings.source)
    if settings.insecure:
        if not _is_loopback(host):
            raise ConfigError(
                f"{settings.source}: insecure = true is only allowed for a SuperLink on this "
                f"machine; {host} needs root-certificates and auth-private-key"
            )
        say("insecure loopback trial: no TLS, no node authentication")
        return manifest
    assert settings.root_certificates is not None and settings.auth_private_key is not None
    check_ca_certificate(settings.root_certificates)
    check_auth_private_key(settings.auth_private_key)
    verify_superlink(host, port, ca=settings.root_certificates, say=say)
    return manifest


def verify_superlink(host: str, port: int, *, ca: Path, say: Callable[[str], None]) -> None:
    """TLS handshake with the SuperLink against ``ca``; only a warning when it is not up
    (sites may start before the coordinator), an error when its certificate does not verify."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            say(f"SuperLink {host}:{port}: certificate verified against {ca}")
    except ssl.SSLCertVerificationError as err:
        raise ConfigError(
            f"{ca}: the SuperLink at {host}:{port} presents a certificate this CA does not "
            f"verify ({err.verify_message}); ask the coordinator for the study's CA"
        ) from None
    except ssl.SSLError as err:  # e.g. a SuperLink without TLS: the SuperNode would retry forever
        raise ConfigError(
            f"{ca}: no TLS session with the SuperLink at {host}:{port} ({err.reason}); is it "
            "running with --pki (TLS)?"
        ) from None
    except OSError as err:
        say(f"SuperLink {host}:{port} not reachable yet ({err}); the SuperNode will retry")


def superexec_secret(work_dir: Path) -> Path:
    """The SuperNode <-> SuperExec shared secret (0600, made once): another local user
    cannot take this site's tasks from its loopback runtime port, read the global model
    or answer in the site's name."""
    path = work_dir / "superexec.secret"
    if not path.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path


def write_node_config(settings: ClientSettings) -> Path:
    """The node config as a TOML file (Flower reads one; no quoting of paths on a command line)."""
    path = settings.work_dir / "node-config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(settings.node_config))
    return path


def run_client(settings: ClientSettings, *, say: Callable[[str], None]) -> int:
    """Check, then run the SuperNode (and fedseg's SuperExec) until one stops or we are told
    to; return the exit code to report."""
    preflight(settings, say=say)
    # Validates the node config exactly as the ClientApp will, before Flower sees it.
    SiteConfig.from_node_config(settings.node_config, RunConfig())
    env = flower_env(settings.work_dir / "flwr-home")
    spec = SuperNodeSpec(
        superlink=settings.superlink, runtime_port=settings.runtime_port,
        node_config=write_node_config(settings), root_certificates=settings.root_certificates,
        auth_private_key=settings.auth_private_key, executor=settings.executor,
        superexec_secret=superexec_secret(settings.work_dir),
    )  # fmt: skip
    _check_port_free(settings)
    logs = settings.work_dir / "logs"
    fast = settings.executor == "fedseg"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        procs["supernode"] = start(supernode_command(spec), log=logs / "supernode.log",
                                   env=env, fast_transfer=fast)  # fmt: skip
        if settings.executor == "fedseg":
            wait_until_listening(procs["supernode"], port=spec.runtime_port,
                                 log=logs / "supernode.log")  # fmt: skip
            command = superexec_command(runtime_port=spec.runtime_port,
                                        secret=spec.superexec_secret)  # fmt: skip
            procs["superexec"] = start(command, log=logs / "superexec.log", env=env)
        say(f"SuperNode for {settings.superlink} running; logs in {logs}")
        _supervise(procs, logs=logs)
    except _SignalledError:
        say("stopping the SuperNode")
    finally:
        for proc in procs.values():
            stop_process_tree(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class _SignalledError(Exception):
    """SIGTERM or Ctrl-C: unwind so that everything started is stopped."""


def _stop(_signum: int, _frame: object) -> None:
    raise _SignalledError


def _check_port_free(settings: ClientSettings) -> None:
    """The SuperNode's runtime port must be free: a ClientApp runner attaching to another
    site's SuperNode on the same host would work on that site's messages."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", settings.runtime_port))
        except OSError:
            raise ConfigError(
                f"{settings.source}: [connection] runtime-port {settings.runtime_port} is in "
                "use on this machine (another site's SuperNode?); choose a free port"
            ) from None


# What Flower's SuperNode logs when the SuperLink refuses it, and what the site should do.
_REFUSALS = {
    "Failed to activate SuperNode": "the SuperLink does not know this site's key: ask the "
    "coordinator to register the .pub (fedseg register-sites or flwr supernode register)",
    "CERTIFICATE_VERIFY_FAILED": "the SuperLink's certificate does not verify against "
    "root-certificates",
}


def _reason(log: Path) -> str:
    """A plain reason for a refusal Flower logged, or the log's last error line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    for marker, reason in _REFUSALS.items():
        if marker in text:
            return f": {reason}"
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return f": {errors[-1][-300:]}" if errors else ""


def _supervise(procs: dict[str, subprocess.Popen[bytes]], *, logs: Path) -> None:
    """Until a signal (:class:`_SignalledError`) or a process stops (an error naming its log)."""
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = logs / f"{name}.log"
                raise ConfigError(
                    f"{log}: {name} stopped with exit code {proc.returncode}{_reason(log)}"
                )
        time.sleep(0.5)
