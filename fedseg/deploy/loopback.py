"""A whole deployment on one machine: a SuperLink and one ``fedseg client`` per site, on loopback.

What the deployment tests and the overhead benchmark run, and what a coordinator can use to
rehearse a study before the hospitals join: the same commands (``fedseg superlink``,
``fedseg pki``, ``fedseg client``, ``fedseg study``) with every process started here stopped
here, by PID, also on error.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedseg.deploy.coordinator import register_site
from fedseg.deploy.pki import PkiPaths, add_site, init_pki
from fedseg.deploy.processes import start
from fedseg.simulation import (
    flower_env,
    free_port,
    kill_process_tree,
    stop_process_tree,
    wait_until_listening,
)

CONNECTION = "pilot"


def _fedseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedseg", *args]


@dataclass
class LoopbackFederation:
    """A running SuperLink plus the site clients added to it; see :func:`loopback_federation`."""

    work: Path
    tls: bool
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr-home"

    @property
    def pki(self) -> Path:
        return self.work / "pki"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def write_connection(self) -> None:
        """``$FLWR_HOME/config.toml`` with the ``pilot`` connection (the researcher's side)."""
        connection: dict[str, object] = {"address": f"127.0.0.1:{self.port}"}
        if self.tls:
            connection["root-certificates"] = str(PkiPaths.at(self.pki).ca_cert)
        else:
            connection["insecure"] = True
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def start_superlink(self) -> None:
        """``fedseg superlink`` (TLS and node authentication when ``tls``); returns once up."""
        args = ["--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--database", str(self.work / "superlink.db")]
        if self.tls:
            args += ["--pki", str(self.pki), "--server-name", "127.0.0.1"]
        log = self.work / "superlink.log"
        self.procs["superlink"] = start(_fedseg("superlink", *args), log=log, env=self.env)
        wait_until_listening(self.procs["superlink"], port=self.port, log=log)

    def site_config(
        self, name: str, data_path: Path, *, consent: Mapping[str, bool] | None = None,
        executor: str = "fedseg", registered: bool = True,
    ) -> Path:  # fmt: skip
        """Write a site's ``site.toml`` (and, with TLS, create and register its key)."""
        folder = self.work / "sites" / name
        folder.mkdir(parents=True, exist_ok=True)
        connection: dict[str, object] = {
            "superlink": f"127.0.0.1:{self.port}", "runtime-port": free_port(),
            "executor": executor,
        }  # fmt: skip
        if self.tls:
            record = add_site(self.pki, site=name)
            if registered:
                register_site(record.public_key, site=name, connection=CONNECTION, env=self.env)
            assert record.private_key is not None  # the pilot made the pair
            connection["root-certificates"] = str(PkiPaths.at(self.pki).ca_cert)
            connection["auth-private-key"] = str(record.private_key)
        else:
            connection["insecure"] = True
        config = {"site": {"name": name, "data-path": str(data_path), "num-threads": 1},
                  "consent": dict(consent or {}), "connection": connection}  # fmt: skip
        path = folder / "site.toml"
        path.write_text(tomli_w.dumps(config))
        return path

    def start_site(self, name: str, site_toml: Path) -> subprocess.Popen[bytes]:
        """``fedseg client --site-config`` for one site."""
        log = self.work / "sites" / name / "client.log"
        proc = start(_fedseg("client", "--site-config", str(site_toml)), log=log, env=self.env)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a site's client and everything below it, as a power cut would."""
        kill_process_tree(self.procs.pop(name))

    def stop(self, name: str) -> None:
        stop_process_tree(self.procs.pop(name))

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextmanager
def loopback_federation(work: Path, *, tls: bool) -> Iterator[LoopbackFederation]:
    """A SuperLink on a free loopback port (with a fresh pilot PKI when ``tls``), stopped with
    every site client on exit."""
    federation = LoopbackFederation(work=work, tls=tls)
    work.mkdir(parents=True, exist_ok=True)
    if tls:
        init_pki(federation.pki, server_names=("localhost",), server_ips=("127.0.0.1",))
    federation.write_connection()
    try:
        federation.start_superlink()
        yield federation
    finally:
        federation.close()
