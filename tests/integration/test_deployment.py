"""The deployment engine end to end on loopback: a TLS SuperLink with SuperNode authentication,
one ``fedseg client`` per site, studies submitted with ``fedseg study``, and the faults a
study must survive (a site killed mid-round, the SuperLink killed and the study resumed).

Marked ``deployment`` / ``faults`` (about 1-2 minutes each): ``pytest -m "deployment or faults"``.
Every process is started through :class:`fedseg.deploy.loopback.LoopbackFederation` and stopped
by PID, also when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from data_adapters.site import harmonise_site
from data_adapters.validate import check_site
from fedseg.artifacts import load_weights
from fedseg.deploy.loopback import CONNECTION, LoopbackFederation, loopback_federation
from fedseg.deploy.pki import add_site, init_pki
from fedseg.synth import generate_federation
from fedseg.task.model import build_model
from fedseg.task.validate import validate_site
from tests.processes import flower_processes

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small harmonised sites, each with two validation cases."""
    root = tmp_path_factory.mktemp("deployment")
    raws = generate_federation(root / "raw", n_sites=3, cases_per_site=(5, 4, 4), seed=11)
    out = {}
    for raw in raws:
        out[raw.name] = root / "sites" / raw.name
        harmonise_site(raw, out[raw.name], target_spacing=(3.0, 3.0, 3.0), qc=False,
                       validation_fraction=0.5)  # fmt: skip
    return out


def _study_config(path: Path, *, rounds: int, min_sites: int, **extra: Any) -> Path:
    config = {"num-server-rounds": rounds, "local-steps": 3, "patch-size": 32,
              "min-train-sites": min_sites, "min-cases-to-report": 1, "wait-for-sites": 120,
              **extra}  # fmt: skip
    path.write_text(tomli_w.dumps(config))
    return path


def _study(federation: LoopbackFederation, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedseg", "study", "--connection", CONNECTION, *args],
        env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _start_sites(federation: LoopbackFederation, sites: dict[str, Path], **consent: Any) -> None:
    for name, data in sites.items():
        toml = federation.site_config(name, data, consent=consent.get(name))
        federation.start_site(name, toml)


def _wait_for(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _last_round(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "state.json").read_text())["last_round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.deployment
def test_tls_study_with_authenticated_supernodes(sites: dict[str, Path], tmp_path: Path) -> None:
    """Two rounds over TLS with three registered sites; every site's final figures are what
    the site gets by validating the saved model itself."""
    # Prepare
    before = flower_processes()
    run_dir = tmp_path / "run"
    with loopback_federation(tmp_path / "fed", tls=True) as federation:
        _start_sites(federation, sites, **{"hospital-c": {"train": False}})
        config = _study_config(tmp_path / "study.toml", rounds=2, min_sites=2,
                               **{"min-available-sites": 3})  # fmt: skip
        # Execute
        out = _finish(_study(federation, "--config", str(config), "--run-dir", str(run_dir)))
    # Assert
    assert "done" in out, out[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert set(record["sites"]) == set(SITES)
        assert set(record["train"]) == {"hospital-a", "hospital-b"}
        assert [a["site"] for a in record["abstained"]] == ["hospital-c"]
        assert record["failures"] == []
    model = build_model("tiny", seed=0)
    model.load_state_dict(load_weights(run_dir / "model.pt"))
    for name, folder in sites.items():
        manifest = check_site(folder)
        entry = metrics["final"]["sites"][name]
        assert entry["fingerprint"] == manifest.fingerprint
        assert entry["n_cases"] == len(manifest.validation_cases)
        local = validate_site(model, manifest, roi_size=32).summary(min_cases=1)
        for region, value in entry["dice"].items():
            assert value == pytest.approx(local[region]["dice"]["mean"], abs=1e-6)
    assert (run_dir / "report.html").is_file()
    assert flower_processes() <= before


@pytest.mark.deployment
def test_fedbn_site_state_and_the_cyclic_roll_call_on_the_deployment_engine(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """FedBN's normalisation lives in Flower's per-run site state: a site validates only when
    its state from training survived into the next message (else it abstains), and it keeps
    it across rounds and into personalisation. The cyclic plan's roll-call names the nodes
    through real SuperNodes."""
    with loopback_federation(tmp_path / "fed", tls=False) as federation:
        _start_sites(federation, sites)
        fedbn = _study_config(tmp_path / "fedbn.toml", rounds=2, min_sites=3, strategy="fedbn",
                              **{"model-preset": "tiny-bn", "personalise-steps": 1})  # fmt: skip
        out_bn = _finish(_study(federation, "--config", str(fedbn), "--run-dir",
                                str(tmp_path / "fedbn")))  # fmt: skip
        order = ["hospital-b", "hospital-c", "hospital-a"]
        cyclic = _study_config(tmp_path / "cyclic.toml", rounds=1, min_sites=3,
                               strategy="cyclic", **{"site-order": ",".join(order)})  # fmt: skip
        out_cy = _finish(_study(federation, "--config", str(cyclic), "--run-dir",
                                str(tmp_path / "cyclic")))  # fmt: skip
    assert "done" in out_bn, out_bn[-3000:]
    metrics = json.loads((tmp_path / "fedbn" / "metrics.json").read_text())
    for record in metrics["rounds"]:
        assert set(record["sites"]) == set(SITES), record["abstained"]
        assert record["failures"] == [] and record["abstained"] == []
    assert set(metrics["personalisation"]["sites"]) == set(SITES)
    assert "done" in out_cy, out_cy[-3000:]
    [record] = json.loads((tmp_path / "cyclic" / "metrics.json").read_text())["rounds"]
    assert list(record["train"]) == order and record["failures"] == []


@pytest.mark.deployment
def test_secure_aggregation_through_real_supernodes(sites: dict[str, Path], tmp_path: Path) -> None:
    """SecAgg+ keeps its keys in Flower's per-run site state across the protocol's four
    messages: on real SuperNodes (a process per message) every site must still train and be
    unmasked, and each guard must log four training replies a round."""
    run_dir = tmp_path / "secure"
    with loopback_federation(tmp_path / "fed", tls=False) as federation:
        _start_sites(federation, sites)
        config = _study_config(tmp_path / "secure.toml", rounds=1, min_sites=3,
                               **{"secure-aggregation": True})  # fmt: skip
        out = _finish(_study(federation, "--config", str(config), "--run-dir", str(run_dir)))
        work = federation.work
    assert "done" in out, out[-3000:]
    [record] = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert set(record["train"]) == set(SITES) and record["failures"] == []
    assert not record.get("not_aggregated")
    for name in sites:
        path = work / "sites" / name / ".fedseg-client" / "logs" / "egress.jsonl"
        log = [json.loads(x) for x in path.read_text().splitlines()]
        train = [
            e for e in log if e["message_type"] == "train" and e["run_id"] == log[-1]["run_id"]
        ]
        assert len(train) == 4 and all(e["verdict"] == "sent" for e in train), name


@pytest.mark.deployment
def test_unregistered_supernode_and_wrong_ca_are_refused(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """A site whose key the coordinator never registered does not join; a site holding another
    study's CA is stopped by ``fedseg client`` before it connects, naming the CA file."""
    # Prepare
    with loopback_federation(tmp_path / "fed", tls=True) as federation:
        stranger = federation.site_config("hospital-a", sites["hospital-a"], registered=False)
        refused = federation.start_site("hospital-a", stranger)
        other = tmp_path / "other-pki"
        init_pki(other)
        add_site(other, site="hospital-b")
        wrong = federation.site_config("hospital-b", sites["hospital-b"])
        text = wrong.read_text().replace(str(federation.pki / "ca.crt"), str(other / "ca.crt"))
        wrong.write_text(text)
        # Execute
        time.sleep(15)  # long enough for a registered node to have joined several times over
        listed = subprocess.run(
            ["flwr", "supernode", "list", CONNECTION, "--format", "json"],
            env=federation.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        checked = subprocess.run(
            [sys.executable, "-m", "fedseg", "client", "--site-config", str(wrong), "--check-only"],
            env=federation.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        _wait_for(lambda: refused.poll() is not None, timeout=60, what="the refused client")
        log = (federation.work / "sites" / "hospital-a" / "client.log").read_text()
    # Assert
    nodes = json.loads(listed.stdout[listed.stdout.index("{") :]).get("nodes", [])
    assert [n for n in nodes if n.get("status") == "online"] == [], listed.stdout
    assert refused.returncode == 1
    assert "does not know this site's key" in log, log[-2000:]
    assert checked.returncode == 1
    assert str(other / "ca.crt") in checked.stderr and "does not verify" in checked.stderr


@pytest.mark.faults
def test_site_killed_mid_round_is_recorded_and_the_study_completes(
    sites: dict[str, Path], tmp_path: Path
) -> None:
    """Three sites, two required: hospital-b loses power while round 2 runs. Round 2 still
    aggregates the two others, names hospital-b's failure, and round 3 goes on without it."""
    # Prepare
    run_dir = tmp_path / "run"
    with loopback_federation(tmp_path / "fed", tls=True) as federation:
        _start_sites(federation, sites)
        config = _study_config(tmp_path / "study.toml", rounds=3, min_sites=2)
        study = _study(federation, "--config", str(config), "--run-dir", str(run_dir))
        try:
            # Execute: the moment round 1 is checkpointed, round 2's training is on its way.
            _wait_for(lambda: _last_round(run_dir) >= 1, timeout=300, what="round 1")
            federation.kill("hospital-b")
            out = _finish(study)
        finally:
            if study.poll() is None:
                study.kill()
                study.wait()
    # Assert
    assert "done" in out, out[-3000:]
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert set(rounds[0]["train"]) == set(SITES)
    assert set(rounds[1]["train"]) == {"hospital-a", "hospital-c"}
    assert "not_aggregated" not in rounds[1]
    assert [f["site"] for f in rounds[1]["failures"]] == ["hospital-b"]
    assert set(rounds[2]["train"]) == {"hospital-a", "hospital-c"}
    assert set(rounds[2]["sites"]) == {"hospital-a", "hospital-c"}


@pytest.mark.faults
def test_superlink_killed_and_the_study_resumed(sites: dict[str, Path], tmp_path: Path) -> None:
    """The SuperLink (and the ServerApp under it) dies after round 1; restarted on the same
    database, ``fedseg study --resume`` continues at round 2 with round 1's record intact."""
    # Prepare
    run_dir = tmp_path / "run"
    two = {k: sites[k] for k in ("hospital-a", "hospital-b")}
    with loopback_federation(tmp_path / "fed", tls=True) as federation:
        _start_sites(federation, two)
        config = _study_config(tmp_path / "study.toml", rounds=3, min_sites=2)
        study = _study(federation, "--config", str(config), "--run-dir", str(run_dir))
        try:
            _wait_for(lambda: _last_round(run_dir) >= 1, timeout=300, what="round 1")
            # Execute
            federation.kill("superlink")
            crashed = _finish(study, timeout=120)
            round_one = json.loads((run_dir / "metrics.json").read_text())["rounds"][0]
            checkpoint = (run_dir / "checkpoints" / "round-001.pt").read_bytes()
            federation.start_superlink()
            resumed = _finish(_study(federation, "--resume", str(run_dir)))
        finally:
            if study.poll() is None:
                study.kill()
                study.wait()
    # Assert
    assert "done" not in crashed
    assert "done" in resumed, resumed[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["rounds"][0] == round_one
    assert (run_dir / "checkpoints" / "round-001.pt").read_bytes() == checkpoint
    assert set(metrics["rounds"][2]["train"]) == set(two)
    assert metrics["config"]["resume"] is True
    assert (run_dir / "model.pt").is_file()
