"""A site's SuperExec that forks each ClientApp from a process with torch and MONAI loaded.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message (one per
task token), so torch, MONAI, SimpleITK and nibabel are imported again each time: seconds per
message on a loaded machine. Flower's warm executor pools exist only for Kubernetes and not for
ClientApps, so this is the local equivalent: a long-lived process imports the heavy libraries
once, then forks a child per task that runs Flower's own ``run_clientapp``. Each message still
gets its own process (a crash or a leak stays in it), and the app code itself is imported
fresh in the child from the app bundle the researcher shipped, because fedseg's own modules
are dropped from the parent after the warm-up import.

Run it beside ``flower-supernode --isolation process`` (``fedseg client`` does)::

    python -m fedseg.deploy.superexec --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

from flwr.common.logger import log
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# The app's own packages: imported for the warm-up, then dropped so the child imports the
# bundle's copy. Everything else stays loaded.
APP_PACKAGES = ("fedseg", "data_adapters", "evaluation")
WARM_UP_MODULE = "fedseg.client_app"
POLL_SECONDS = 0.2


def preload(module: str = WARM_UP_MODULE, *, app_packages: Sequence[str] = APP_PACKAGES) -> float:
    """Import ``module`` (and so every library it pulls in), then forget the app's own
    modules; return the seconds it took."""
    start = time.perf_counter()
    importlib.import_module(module)
    for name in [n for n in sys.modules if n.split(".")[0] in app_packages]:
        if name != __name__:
            del sys.modules[name]
    return time.perf_counter() - start


def _run_child(
    *, runtime_api_address: str, token: str, insecure: bool, root_certificates: str | None
) -> None:
    """In the forked child: Flower's own ClientApp runner; never return into the parent's loop."""
    code = 1
    # The parent's handlers would stop the parent's children; the child's are Flower's own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        certificates = None
        if root_certificates:
            with open(root_certificates, "rb") as handle:
                certificates = handle.read()
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=insecure,
            certificates=certificates,
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as done:  # run_clientapp ends with flwr_exit -> sys.exit
        code = done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # report anything, then leave the child
        log(ERROR, "ClientApp child failed: %s", err)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit: the parent's atexit handlers and open clients are not the child's to run.
        os._exit(code)


@dataclass
class ForkingExecutor:
    """Flower's ``Executor`` protocol: launch = fork a warm child (see the module docstring)."""

    children: dict[int, tuple[int, float]] = field(default_factory=dict)  # pid -> task, start
    # A ClientApp still running after this long is killed: a hung child would otherwise keep
    # its task alive by heartbeat and the SuperNode waiting on it, and the site out of every
    # later round. Flower then answers the server with an error for it.
    task_timeout_s: float = 6 * 3600

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], **_: object
    ) -> tuple[set[TaskType], set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, *_: object, **__: object) -> None:
        return None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        try:
            pid = os.fork()
        except OSError as err:  # EAGAIN / ENOMEM: this task fails, the site stays up
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:
            self.children.clear()
            _run_child(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                root_certificates=spec.root_certificates_path,
            )
        self.children[pid] = (spec.task_id, time.monotonic())
        log(INFO, "fedseg superexec: task %s in process %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children so none is left a zombie; kill those past the timeout."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # already reaped elsewhere
                self.children.pop(pid)
                continue
            if not done and time.monotonic() - self.children[pid][1] > self.task_timeout_s:
                log(WARNING, "fedseg superexec: task %s over %.0f s, killed",
                    self.children[pid][0], self.task_timeout_s)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if done:
                task, started = self.children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                level = INFO if code == 0 else WARNING
                log(level, "fedseg superexec: task %s done in %.1f s (exit code %d)", task,
                    time.monotonic() - started, code)  # fmt: skip

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.children.clear()


def serve(
    *, runtime_api_address: str, insecure: bool, root_certificates: str | None,
    task_timeout_s: float, auth_secret: bytes | None = None,
) -> None:  # fmt: skip
    """The SuperExec loop of Flower's ``run_superexec``, with the forking executor and a short
    poll (Flower's is 1 s; each message waits on it)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    class ClientAppPlugin(BaseExecPlugin):
        supported_task_types = frozenset({TaskType.CLIENT_APP})
        visible_output_task_types = frozenset({TaskType.CLIENT_APP})

    executor = ForkingExecutor(task_timeout_s=task_timeout_s)
    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
        ))  # fmt: skip
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=make_simple_http_retry_invoker(),
    )
    plugin = ClientAppPlugin(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates,
        runtime_dependency_install=False,
        executor=executor,  # type: ignore[arg-type]
    )

    def stop(_signum: int, _frame: object) -> None:
        executor.close()
        # os._exit: a SystemExit raised here could be swallowed by the HTTP retry loop the
        # signal interrupted, leaving this process polling a SuperNode that is gone.
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            executor.reconcile()
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            )
            if reply.HasField("task") and reply.token:
                plugin.launch_task(token=reply.token, task=reply.task)
            time.sleep(POLL_SECONDS)
    finally:
        executor.close()
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument(
        "--superexec-auth-secret-file",
        default=None,
        help="The secret shared with the SuperNode (its flag of the same name).",
    )
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=6 * 3600,
        help="Seconds after which a ClientApp still running is killed.",
    )
    args = parser.parse_args(argv)
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    seconds = preload()
    log(INFO, "fedseg superexec: libraries loaded once in %.1f s", seconds)
    serve(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        task_timeout_s=args.task_timeout,
        auth_secret=load_superexec_auth_secret(args.superexec_auth_secret_file),
    )


if __name__ == "__main__":
    main()
