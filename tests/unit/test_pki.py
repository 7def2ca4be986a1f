"""Pilot PKI: certificates a TLS client accepts, keys Flower loads, and refusals naming the file."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedseg.deploy import pki
from fedseg.deploy.pki import (
    PkiError,
    PkiPaths,
    add_site,
    check_auth_private_key,
    check_ca_certificate,
    check_public_key,
    check_server_pair,
    create_site_key,
    init_pki,
    list_sites,
    revoke_site,
)
from fedseg.deploy.pki_cli import pki_app


@pytest.fixture(scope="module")
def pilot(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pilot"))


@pytest.fixture(scope="module")
def other_pilot(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("other"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- what init writes


def test_server_certificate_chains_to_ca_with_localhost_names(pilot: PkiPaths) -> None:
    ca, server = _cert(pilot.ca_cert), _cert(pilot.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the chain is broken
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert datetime.now(UTC) - server.not_valid_before_utc >= timedelta(seconds=55)


def test_ca_is_p384_sha384_with_critical_path_length_zero(pilot: PkiPaths) -> None:
    ca = check_ca_certificate(pilot.ca_cert)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA384)
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"


def test_init_writes_empty_registry_and_passes_its_own_checks(pilot: PkiPaths) -> None:
    assert json.loads(pilot.registry.read_text())["sites"] == []
    check_server_pair(pilot.server_cert, pilot.server_key, pilot.ca_cert, host="localhost")
    check_server_pair(pilot.server_cert, pilot.server_key, pilot.ca_cert, host="127.0.0.1")


def test_private_keys_are_owner_only(pilot: PkiPaths, tmp_path: Path) -> None:
    pair = create_site_key(tmp_path, site="h1")
    for key in (pilot.ca_key, pilot.server_key, pair.private_key):
        assert key.stat().st_mode & 0o777 == 0o600, key


def test_custom_server_names_and_ips_land_in_the_san(tmp_path: Path) -> None:
    paths = init_pki(
        tmp_path, server_names=["link.hospital.example"], server_ips=["10.0.0.5", "::1"]
    )
    check_server_pair(paths.server_cert, paths.server_key, paths.ca_cert, host="10.0.0.5")
    check_server_pair(paths.server_cert, paths.server_key, paths.ca_cert, host="::1")
    with pytest.raises(PkiError, match=r"server\.crt.*'localhost' is not among"):
        check_server_pair(paths.server_cert, paths.server_key, paths.ca_cert, host="localhost")


# --------------------------------------------------------------------------- a real handshake


def _handshake(pilot: PkiPaths, cafile: Path, server_hostname: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pilot.server_cert, pilot.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_client_trusting_the_ca_completes_a_handshake(pilot: PkiPaths, hostname: str) -> None:
    _handshake(pilot, pilot.ca_cert, hostname)


def test_tls_client_trusting_another_pilots_ca_refuses(
    pilot: PkiPaths, other_pilot: PkiPaths
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pilot, other_pilot.ca_cert, "localhost")


def test_tls_client_refuses_a_name_not_in_the_certificate(pilot: PkiPaths) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pilot, pilot.ca_cert, "superlink.example")


# --------------------------------------------------------------------------- site keys


def test_flower_loaders_accept_the_site_key_pair(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pair = create_site_key(tmp_path, site="hospital-a")
    assert pair.public_key.read_text().rstrip().endswith(" fedseg-hospital-a")
    registered = try_load_public_key(pair.public_key)  # exits on a key Flower refuses
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert registered  # the bytes Flower sends to the SuperLink
    check_auth_private_key(pair.private_key)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    pair = create_site_key(tmp_path, site="h1")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pair.public_key)], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[1] == check_public_key(pair.public_key)
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", check_public_key(pair.public_key))


def test_add_site_records_a_sites_own_public_key(tmp_path: Path) -> None:
    pilot = init_pki(tmp_path / "pki")
    pair = create_site_key(tmp_path / "at-hospital", site="clinic-b")
    record = add_site(pilot.directory, site="clinic-b", public_key=pair.public_key)
    assert record.public_key == pilot.directory / "sites" / "clinic-b.pub"
    assert record.public_key.read_bytes() == pair.public_key.read_bytes()
    assert record.private_key is None and record.active
    assert record.fingerprint == check_public_key(pair.public_key)
    assert datetime.fromisoformat(record.added).utcoffset() == timedelta(0)
    stored = json.loads(pilot.registry.read_text())["sites"]
    assert [s["name"] for s in stored] == ["clinic-b"]
    assert stored[0]["public_key"] == "sites/clinic-b.pub"
    assert list_sites(pilot.directory) == [record]


def test_add_site_without_a_key_generates_an_owner_only_pair(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    record = add_site(paths.directory, site="pilot1")
    assert record.private_key == paths.directory / "sites" / "pilot1" / "pilot1.key"
    assert record.private_key.stat().st_mode & 0o777 == 0o600
    check_auth_private_key(record.private_key)


def test_revoke_then_add_again_rotates_the_key(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    old = add_site(paths.directory, site="h1")
    revoked = revoke_site(paths.directory, site="h1")
    assert revoked.revoked is not None and not revoked.active
    assert revoked.public_key.is_file() and not old.public_key.exists()
    with pytest.raises(PkiError, match=r"h1\.pub.*revoked key of site 'h1'"):
        add_site(paths.directory, site="h1", public_key=revoked.public_key)
    new = add_site(paths.directory, site="h1")
    assert new.fingerprint != old.fingerprint
    assert [(r.name, r.active) for r in list_sites(paths.directory)] == [
        ("h1", False),
        ("h1", True),
    ]
    with pytest.raises(PkiError, match=r"sites\.json: no active site 'h2'"):
        revoke_site(paths.directory, site="h2")


# --------------------------------------------------------------------------- refusals


def _write_key(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_refuses_an_expired_or_not_yet_valid_ca(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    windows = {
        "old.crt": (now - timedelta(days=10), now - timedelta(days=1), "expired"),
        "future.crt": (now + timedelta(days=1), now + timedelta(days=10), "not valid before"),
    }
    for name, (start, end, problem) in windows.items():
        path = tmp_path / name
        cert = pki._ca_certificate(key, not_before=start, not_after=end)
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        with pytest.raises(PkiError, match=rf"{re.escape(name)}: CA certificate.*{problem}"):
            check_ca_certificate(path)


def test_refuses_a_server_certificate_passed_as_ca(pilot: PkiPaths) -> None:
    with pytest.raises(PkiError, match=r"server\.crt: not a CA certificate"):
        check_ca_certificate(pilot.server_cert)


def test_refuses_missing_or_non_pem_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"nothere\.crt: CA certificate not found"):
        check_ca_certificate(tmp_path / "nothere.crt")
    (tmp_path / "junk.crt").write_text("hello")
    with pytest.raises(PkiError, match=r"junk\.crt: not a PEM certificate"):
        check_ca_certificate(tmp_path / "junk.crt")


def test_refuses_a_world_readable_private_key(tmp_path: Path) -> None:
    pair = create_site_key(tmp_path, site="h1")
    pair.private_key.chmod(0o644)
    with pytest.raises(PkiError, match=r"h1\.key: .*readable by group or others.*chmod 600"):
        check_auth_private_key(pair.private_key)


def _sshstr(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _claim_encrypted(key_file: Path, out: Path) -> Path:
    """The same key with an OpenSSH header saying aes256-ctr/bcrypt, as ssh-keygen -N writes."""
    lines = key_file.read_bytes().splitlines()
    raw = base64.b64decode(b"".join(lines[1:-1]))
    rest = raw[len(b"openssh-key-v1\0") :]
    for _ in range(3):  # ciphername, kdfname, kdfoptions
        rest = rest[4 + int.from_bytes(rest[:4], "big") :]
    kdf = _sshstr(_sshstr(os.urandom(16)) + (16).to_bytes(4, "big"))
    raw = b"openssh-key-v1\0" + _sshstr(b"aes256-ctr") + _sshstr(b"bcrypt") + kdf + rest
    body = base64.b64encode(raw)
    wrapped = b"\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    pem = lines[0] + b"\n" + wrapped + b"\n" + lines[-1] + b"\n"
    return _write_key(out, pem)


def test_refuses_a_password_protected_key(tmp_path: Path) -> None:
    pair = create_site_key(tmp_path, site="h1")
    locked = _claim_encrypted(pair.private_key, tmp_path / "locked.key")
    with pytest.raises(PkiError, match=r"locked\.key: private key is password-protected"):
        check_auth_private_key(locked)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_refuses_a_key_ssh_keygen_protected_with_a_password(tmp_path: Path) -> None:
    key = tmp_path / "real.key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(key)],
        check=True,
    )
    with pytest.raises(PkiError, match=r"real\.key: private key is password-protected"):
        check_auth_private_key(key)


def test_refuses_rsa_keys(pilot: PkiPaths, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = _write_key(
        tmp_path / "rsa.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(PkiError, match=r"rsa\.key: .*not an EC key"):
        check_auth_private_key(private)
    with pytest.raises(PkiError, match=r"rsa\.pub: .*not an EC key"):
        check_public_key(public)
    with pytest.raises(PkiError, match=r"rsa\.pub: .*not an EC key"):
        add_site(pilot.directory, site="rsa-site", public_key=public)
    assert "rsa-site" not in {r.name for r in list_sites(pilot.directory)}


def test_refuses_pem_keys_where_openssh_is_needed(pilot: PkiPaths) -> None:
    with pytest.raises(PkiError, match=r"server\.key: not an OpenSSH private key"):
        check_auth_private_key(pilot.server_key)
    with pytest.raises(PkiError, match=r"ca\.crt: not an OpenSSH public key"):
        check_public_key(pilot.ca_cert)
    with pytest.raises(PkiError, match=r"server\.key: this is a private key"):
        check_public_key(pilot.server_key)


def test_refuses_a_duplicate_site(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    add_site(paths.directory, site="h1")
    with pytest.raises(PkiError, match=r"sites\.json: site 'h1' is already registered"):
        add_site(paths.directory, site="h1")


@pytest.mark.parametrize("name", ["", "../evil", "-h1", "a b", "x" * 65, "h/1"])
def test_refuses_a_bad_site_name(pilot: PkiPaths, tmp_path: Path, name: str) -> None:
    with pytest.raises(PkiError, match=r"sites\.json: site name .* is not allowed"):
        add_site(pilot.directory, site=name)
    with pytest.raises(PkiError, match=rf"{re.escape(tmp_path.name)}: site name"):
        create_site_key(tmp_path, site=name)


def test_refuses_a_public_key_already_used_by_another_site(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "pki")
    pair = create_site_key(tmp_path / "site", site="h1")
    add_site(paths.directory, site="h1", public_key=pair.public_key)
    with pytest.raises(PkiError, match=r"h1\.pub: this public key .* key of site 'h1'"):
        add_site(paths.directory, site="h2", public_key=pair.public_key)


def test_refuses_to_overwrite_without_overwrite(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    add_site(paths.directory, site="h1")
    before = paths.ca_cert.read_bytes()
    with pytest.raises(PkiError, match=r"ca\.crt: already exists"):
        init_pki(tmp_path)
    assert paths.ca_cert.read_bytes() == before
    init_pki(tmp_path, overwrite=True)
    assert paths.ca_cert.read_bytes() != before
    assert paths.ca_key.stat().st_mode & 0o777 == 0o600
    assert [r.name for r in list_sites(tmp_path)] == ["h1"]  # registrations survive a new CA
    with pytest.raises(PkiError, match=r"h1\.key: already exists"):
        create_site_key(tmp_path / "sites" / "h1", site="h1")


def test_server_pair_refusals_name_the_file(pilot: PkiPaths, other_pilot: PkiPaths) -> None:
    with pytest.raises(PkiError, match=r"server\.crt: not issued by the CA in .*ca\.crt"):
        check_server_pair(pilot.server_cert, pilot.server_key, other_pilot.ca_cert)
    with pytest.raises(PkiError, match=r"server\.key: private key does not match"):
        check_server_pair(pilot.server_cert, other_pilot.server_key, pilot.ca_cert)


def test_refuses_an_unknown_registry(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"sites\.json: no site registry here"):
        add_site(tmp_path, site="h1")
    (tmp_path / "sites.json").write_text("{not json")
    with pytest.raises(PkiError, match=r"sites\.json: not a fedseg site registry"):
        list_sites(tmp_path)


# --------------------------------------------------------------------------- command line


def test_cli_init_add_site_list(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "pki"
    result = runner.invoke(pki_app, ["init", str(directory), "--server-name", "link.example"])
    assert result.exit_code == 0, result.output
    assert "flower-superlink --ssl-ca-certfile" in result.output
    san = _cert(directory / "server.crt").extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]

    result = runner.invoke(pki_app, ["add-site", str(directory), "--site", "h1"])
    assert result.exit_code == 0, result.output
    assert "flwr supernode register" in result.output and "--name h1" in result.output
    assert "h1.key" in result.output  # the generated private key to hand over

    result = runner.invoke(pki_app, ["list", str(directory)])
    assert result.exit_code == 0, result.output
    name, state, found, _ = result.stdout.strip().split("\t")
    assert (name, state) == ("h1", "active")
    assert found == check_public_key(directory / "sites" / "h1.pub")

    result = runner.invoke(pki_app, ["add-site", str(directory), "--site", "h1"])
    assert result.exit_code == 1
    assert "error:" in result.output and "sites.json" in result.output
