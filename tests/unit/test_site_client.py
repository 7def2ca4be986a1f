"""``fedseg client``'s site config and start-up checks, and the pieces that make it fast."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedseg.config import ConfigError
from fedseg.deploy import supernode
from fedseg.deploy.client import preflight, read_client_settings, verify_superlink
from fedseg.deploy.pki import PkiPaths, add_site, init_pki
from fedseg.deploy.processes import SuperNodeSpec, supernode_command


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small harmonised site (the adapters' test site, 3 mm)."""
    from data_adapters.site import harmonise_site
    from tests.unit.test_adapters_site import SPACING, raw_site

    base = tmp_path_factory.mktemp("client")
    out = base / "hospital-a"
    harmonise_site(raw_site(base / "raw" / "hospital-a", 3), out, target_spacing=SPACING,
                   qc=False)  # fmt: skip
    return out


def _write(path: Path, config: dict[str, object]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path


def _config(**connection: object) -> dict[str, object]:
    return {"site": {"name": "hospital-a", "data-path": "data"},
            "consent": {"share-per-case": True}, "connection": connection}  # fmt: skip


def test_site_toml_resolves_paths_and_flattens_the_node_config(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.toml", _config(
        superlink="fl.example.org:9092", **{"root-certificates": "ca.crt",
                                            "auth-private-key": "/keys/a.key"}))  # fmt: skip
    settings = read_client_settings(path)
    assert settings.site.data_path == tmp_path / "data"
    assert settings.root_certificates == tmp_path / "ca.crt"
    assert settings.auth_private_key == Path("/keys/a.key")
    assert settings.node_config == {
        "data-path": str(tmp_path / "data"),
        "share-per-case": True,
        # The egress guard's log sits with the client's other logs unless [site] names one.
        "egress-log": str(tmp_path / ".fedseg-client" / "logs" / "egress.jsonl"),
    }
    assert settings.site.consent.share_per_case and settings.executor == "fedseg"


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ({}, r"\[connection\] superlink is missing"),
        ({"superlink": "h:1"}, "needs root-certificates and auth-private-key"),
        ({"superlink": "h:1", "insecure": True, "executor": "ray"}, "executor 'ray' unknown"),
        ({"superlink": "h:1", "insecure": True, "proxy": "x"}, r"unknown \[connection\] key"),
    ],
)
def test_site_toml_refusals_name_the_file(
    tmp_path: Path, connection: dict[str, object], message: str
) -> None:
    path = _write(tmp_path / "site.toml", _config(**connection))
    with pytest.raises(ConfigError, match=message) as info:
        read_client_settings(path)
    assert str(path) in str(info.value)


def test_insecure_is_refused_for_a_remote_superlink(tmp_path: Path, tiny_site: Path) -> None:
    config = _config(superlink="fl.example.org:9092", insecure=True)
    config["site"] = {"data-path": str(tiny_site)}
    settings = read_client_settings(_write(tmp_path / "site.toml", config))
    with pytest.raises(ConfigError, match="insecure = true is only allowed for a SuperLink on"):
        preflight(settings, say=lambda _: None)


def test_a_site_name_that_is_not_the_datasets_is_refused(tmp_path: Path, tiny_site: Path) -> None:
    config = _config(superlink="127.0.0.1:9092", insecure=True)
    config["site"] = {"name": "hospital-z", "data-path": str(tiny_site)}
    settings = read_client_settings(_write(tmp_path / "site.toml", config))
    with pytest.raises(ConfigError, match=r"name is 'hospital-z' but .* holds site"):
        preflight(settings, say=lambda _: None)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, PkiPaths]]:
    """A TLS listener on loopback with a pilot PKI's server certificate (the SuperLink's)."""
    paths = init_pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, paths
    server.close()


def test_superlink_certificate_checked_against_the_sites_ca(
    tmp_path: Path, tls_server: tuple[int, PkiPaths]
) -> None:
    port, paths = tls_server
    said: list[str] = []
    verify_superlink("127.0.0.1", port, ca=paths.ca_cert, say=said.append)
    assert "certificate verified" in said[0]
    other = init_pki(tmp_path / "other")
    with pytest.raises(ConfigError, match="presents a certificate this CA does not verify") as info:
        verify_superlink("127.0.0.1", port, ca=other.ca_cert, say=said.append)
    assert str(other.ca_cert) in str(info.value)


def test_unreachable_superlink_is_only_a_warning(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    add_site(paths.directory, site="hospital-a")
    said: list[str] = []
    verify_superlink("127.0.0.1", 9, ca=paths.ca_cert, say=said.append)  # discard port: closed
    assert "not reachable yet" in said[0]


def test_supernode_command_for_each_executor(tmp_path: Path) -> None:
    spec = SuperNodeSpec(superlink="fl:9092", runtime_port=9094, node_config=tmp_path / "n.toml",
                         root_certificates=tmp_path / "ca.crt",
                         auth_private_key=tmp_path / "a.key")  # fmt: skip
    fast = supernode_command(spec)
    assert fast[:3] == [sys.executable, "-m", "fedseg.deploy.supernode"]
    assert fast[fast.index("--isolation") :][:2] == ["--isolation", "process"]
    assert "--insecure" not in fast and str(tmp_path / "a.key") in fast
    flower = supernode_command(SuperNodeSpec(**{**spec.__dict__, "executor": "flower"}))
    assert flower[0] == "flower-supernode" and "subprocess" in flower


def test_supernode_idle_poll_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    clock = supernode._capped_time(0.5)
    clock.sleep(3)
    clock.sleep(0.1)
    assert slept == [0.5, 0.1]
    assert clock.monotonic is supernode.time.monotonic


def test_superexec_preload_keeps_libraries_and_drops_the_app() -> None:
    """The warm process holds torch and MONAI but none of fedseg's modules, so each forked
    ClientApp imports the app bundle's own code."""
    code = (
        "import sys; from fedseg.deploy.superexec import preload; preload(); "
        "print('torch' in sys.modules, 'monai' in sys.modules, "
        "any(m.split('.')[0] in ('data_adapters', 'evaluation') or m == 'fedseg.client_app' "
        "for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr[-2000:]


def test_the_pilot_pki_paths_are_what_the_client_reads(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    record = add_site(paths.directory, site="hospital-a")
    assert record.private_key is not None and record.private_key.is_file()
    assert PkiPaths.at(paths.directory).ca_cert == paths.ca_cert


def test_study_config_checks_keys_and_resumes_from_the_run_folder(tmp_path: Path) -> None:
    from fedseg.artifacts import write_json
    from fedseg.config import RunConfig
    from fedseg.deploy.coordinator import StudyRequest, study_config

    preset = tmp_path / "study.toml"
    preset.write_text('num-server-rounds = 4\nstrategy = "fedprox"\nproximal-mu = 0.01\n')
    run, folder = study_config(StudyRequest(connection="c", config=preset,
                                            run_dir=tmp_path / "run",
                                            overrides={"wait-for-sites": 30}))  # fmt: skip
    assert (run.num_server_rounds, run.strategy, run.wait_for_sites) == (4, "fedprox", 30)
    assert folder == tmp_path / "run" and run.run_dir == str(folder) and not run.resume
    preset.write_text("num-server-round = 4\n")
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['num-server-round'\]"):
        study_config(StudyRequest(connection="c", config=preset, run_dir=tmp_path / "r2"))
    with pytest.raises(ConfigError, match="either --config"):
        study_config(StudyRequest(connection="c"))
    write_json(folder / "state.json", {"last_round": 2, "config": run.to_flower()})
    resumed, same = study_config(StudyRequest(connection="c", resume=folder))
    assert same == folder and resumed.resume
    assert resumed == RunConfig(**{**run.__dict__, "resume": True})


def test_a_crash_at_the_site_leaves_its_text_in_the_sites_log(
    tiny_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower would send an exception's text to the server; it may name files or patients,
    so the site declines in general terms instead."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    from fedseg.client_app import _answer
    from fedseg.config import RunConfig
    from fedseg.records import declined

    def crash(*_: object) -> RecordDict:
        raise RuntimeError(f"{tiny_site}/cases/case01/t1c.nii.gz: truncated gzip stream")

    context = Context(run_id=1, node_id=5, node_config={"data-path": str(tiny_site)},
                      state=RecordDict(), run_config=RunConfig().to_flower())  # fmt: skip
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    reply = _answer(msg, context, action="train", work=crash)
    kind, reason = declined(reply) or ("", "")
    assert kind == "invalid-data"
    assert reason == "the site could not complete train; details are in the site's log"
    assert "case01" not in str(reply.content)


def test_a_study_still_running_cannot_be_resumed(tmp_path: Path) -> None:
    from fedseg.artifacts import write_json
    from fedseg.config import RunConfig
    from fedseg.deploy.coordinator import StudyRequest, study_config
    from fedseg.resume import study_lock

    folder = tmp_path / "run"
    write_json(folder / "state.json", {"last_round": 1, "config": RunConfig().to_flower()})
    with study_lock(folder), pytest.raises(ConfigError, match="still running this study"):
        study_config(StudyRequest(connection="c", resume=folder))
    with pytest.raises(ConfigError, match="no --run-dir, no --set resume"):
        study_config(StudyRequest(connection="c", resume=folder, overrides={"resume": False}))
    assert study_config(StudyRequest(connection="c", resume=folder))[0].resume


def test_forking_executor_kills_a_hung_clientapp_and_reaps_it() -> None:
    import os
    import time

    from fedseg.deploy.superexec import ForkingExecutor

    pid = os.fork()
    if pid == 0:  # a ClientApp that hangs
        time.sleep(60)
        os._exit(0)
    executor = ForkingExecutor(task_timeout_s=1)
    executor.children[pid] = (42, time.monotonic() - 5)
    deadline = time.monotonic() + 10
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert executor.children == {}
    assert not Path(f"/proc/{pid}").exists()


def test_runtime_port_secret_is_private_made_once_and_given_to_both_sides(tmp_path: Path) -> None:
    from fedseg.deploy.client import superexec_secret
    from fedseg.deploy.processes import superexec_command

    path = superexec_secret(tmp_path / "work")
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    assert superexec_secret(tmp_path / "work").read_bytes() == path.read_bytes()
    spec = SuperNodeSpec(superlink="fl:9092", runtime_port=9094, node_config=tmp_path / "n",
                         root_certificates=None, auth_private_key=None,
                         superexec_secret=path)  # fmt: skip
    for command in (supernode_command(spec), superexec_command(runtime_port=9094, secret=path)):
        assert command[command.index("--superexec-auth-secret-file") + 1] == str(path)
