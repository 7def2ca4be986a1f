"""The Flower processes of a deployment, as commands: SuperLink, SuperNode, fedseg's SuperExec.

One place spells the flags, so ``fedseg client``, ``fedseg superlink``, the deployment tests
and the overhead benchmark start exactly the same processes. Flower 1.42's SuperLink serves
its Fleet, Control and runtime APIs on one HTTP port; a SuperNode serves its own runtime API
(for the ClientApp processes) on a second, loopback-only port.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedseg.simulation import FLOWER_ENV

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

#: How a site runs its ClientApps: "fedseg" forks each from a warm process (fast), "flower"
#: is Flower's default (a fresh Python process per message).
EXECUTORS = ("fedseg", "flower")


# Flower moves a message as one object per tensor (the tiny U-Net: ~80), two at a time over
# HTTP by default; on loopback that is ~1 s per message. These are Flower's own knobs.
TRANSFER_ENV = {
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """The SuperLink's certificate chain (see ``fedseg pki init``)."""

    ca: Path
    cert: Path
    key: Path


def superlink_command(
    *, host: str, port: int, database: Path, tls: ServerTls | None, node_auth: bool
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication, or insecure (loopback
    trials only; Flower refuses authentication without TLS)."""
    command = ["flower-superlink", "--host", host, "--port", str(port)]
    command += ["--database", str(database), "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*command, "--insecure"]
    command += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)]
    command += ["--ssl-keyfile", str(tls.key)]
    return [*command, "--enable-supernode-auth"] if node_auth else command


@dataclass(frozen=True, kw_only=True)
class SuperNodeSpec:
    """One site's SuperNode: where it connects, how it proves who it is, what it runs."""

    superlink: str
    runtime_port: int
    node_config: Path
    root_certificates: Path | None
    auth_private_key: Path | None
    executor: str = "fedseg"
    # Shared with fedseg's SuperExec: only a holder may take tasks from the runtime port.
    superexec_secret: Path | None = None


def supernode_command(spec: SuperNodeSpec) -> list[str]:
    """Flower's SuperNode. With the fedseg executor: its short idle poll
    (:mod:`fedseg.deploy.supernode`) in ``process`` isolation, the ClientApps coming from
    :func:`superexec_command`; with "flower", ``flower-supernode`` exactly as Flower ships it."""
    if spec.executor == "fedseg":
        command = [sys.executable, "-m", "fedseg.deploy.supernode"]
    else:
        command = ["flower-supernode"]
    command += ["--superlink", spec.superlink]
    command += ["--host", "127.0.0.1", "--port", str(spec.runtime_port)]
    command += ["--node-config", str(spec.node_config)]
    command += ["--isolation", "process" if spec.executor == "fedseg" else "subprocess"]
    if spec.root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(spec.root_certificates)]
    if spec.auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(spec.auth_private_key)]
    if spec.executor == "fedseg" and spec.superexec_secret is not None:
        command += ["--superexec-auth-secret-file", str(spec.superexec_secret)]
    return command


def superexec_command(*, runtime_port: int, secret: Path | None = None) -> list[str]:
    """fedseg's forking SuperExec for a SuperNode's loopback runtime API."""
    command = [sys.executable, "-m", "fedseg.deploy.superexec",
               "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure"]  # fmt: skip
    return command + (["--superexec-auth-secret-file", str(secret)] if secret else [])


def start(
    command: list[str], *, log: Path, env: Mapping[str, str], fast_transfer: bool = True
) -> subprocess.Popen[bytes]:
    """Start a process with Flower's safety switches (and :data:`TRANSFER_ENV`), its output
    appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = {**env, **FLOWER_ENV, **(TRANSFER_ENV if fast_transfer else {})}
    with log.open("ab") as out:
        return subprocess.Popen(command, env=full, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, so a
    killed ``fedseg client`` never leaves a SuperNode connected on its own."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
