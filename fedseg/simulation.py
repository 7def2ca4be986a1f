"""Run the fedseg Flower app on Flower's simulation runtime, and stop everything it started.

This goes through the same path as a real study (a SuperLink and ``flwr run``), only with
virtual SuperNodes: what works here works against a deployed SuperLink. The SuperLink is ours,
on free loopback ports, with its own ``FLWR_HOME``, so it never touches a user's Flower setup,
and it is stopped (with every process below it) on success, error and Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedseg.config import RunConfig

FLOWER_ENV = {
    # Without this Flower runs `uv sync` per run and pulls a CUDA build of torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
CONNECTION = "fedseg-local"


class SimulationError(RuntimeError):
    """The simulation could not start or did not finish."""


@dataclass(frozen=True, kw_only=True)
class SimulationSpec:
    """One simulated study."""

    app_dir: Path
    run: RunConfig
    num_supernodes: int
    work_dir: Path
    client_cpus: int = 1
    timeout_s: float = 6 * 3600


def app_dir() -> Path:
    """The Flower app folder (the project root holding ``pyproject.toml``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(
            f"{root}: no pyproject.toml; the simulation needs the fedseg source tree "
            "(install with `pip install -e .`)"
        )
    return root


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment plus Flower's safety switches and an isolated FLWR_HOME."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (bound together, so never the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One free TCP port on loopback."""
    return free_ports(1)[0]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_tree(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGTERM a process and everything below it, then SIGKILL what is left after 10 s."""
    pids = [*_descendants(proc.pid), proc.pid]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            if pid == proc.pid and proc.poll() is not None:
                break
            time.sleep(0.1)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def kill_process_tree(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL a process and everything below it at once, as a power cut would."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextmanager
def local_superlink(work_dir: Path) -> Iterator[dict[str, str]]:
    """A simulation-mode SuperLink on free loopback ports; yields the env for ``flwr``."""
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port, control_port, fleet_port = free_ports(3)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": CONNECTION,
                    CONNECTION: {"address": f"127.0.0.1:{http_port}", "insecure": True},
                }
            }
        )
    )
    env = flower_env(flwr_home)
    log_path = work_dir / "superlink.log"
    command = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--database", str(work_dir / "superlink.db"),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_listening(proc, port=http_port, log=log_path)
        yield env
    finally:
        stop_process_tree(proc)


def wait_until_listening(
    proc: subprocess.Popen[bytes], *, port: int, log: Path, timeout_s: float = 60
) -> None:
    """Return once something accepts connections on loopback ``port``; raise (naming the log)
    if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"{log}: the process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SimulationError(f"{log}: nothing listened on port {port} within {timeout_s:.0f} s")


def check_status(run_dir: Path) -> None:
    """Raise unless the ServerApp finished (``flwr run`` itself exits 0 on a failed run)."""
    path = run_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SimulationError(f"{path}: missing; the ServerApp did not finish") from None
    if status.get("status") != "completed":
        raise SimulationError(f"{path}: the run failed: {status.get('reason', 'unknown')}")


def run_simulation(spec: SimulationSpec, *, on_line: Callable[[str], None]) -> None:
    """Run the study on ``num_supernodes`` virtual SuperNodes; stream Flower's log lines.

    Raises :class:`SimulationError` when Flower could not run it or the ServerApp failed.
    """
    if not spec.run.run_dir:
        raise SimulationError("run-dir must be set: the run's outcome is read from it")
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    run_config = spec.work_dir / "run-config.toml"
    run_config.write_text(tomli_w.dumps(spec.run.to_flower()))
    federation = (
        f"num-supernodes={spec.num_supernodes} client-resources-num-cpus={spec.client_cpus}"
    )
    with local_superlink(spec.work_dir) as env:
        command = [
            "flwr", "run", str(spec.app_dir), CONNECTION,
            "--run-config", str(run_config),
            "--federation-config", federation,
            "--stream",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + spec.timeout_s
            for line in proc.stdout:
                on_line(line.rstrip("\n"))
                if time.monotonic() > deadline:
                    raise SimulationError(f"simulation exceeded {spec.timeout_s:.0f} s")
            if proc.wait() != 0:
                raise SimulationError(f"`flwr run` exited with {proc.returncode}")
        finally:
            stop_process_tree(proc)
    check_status(Path(spec.run.run_dir))
