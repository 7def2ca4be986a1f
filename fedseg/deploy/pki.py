"""A pilot PKI for a Flower deployment: TLS for the SuperLink and keys for SuperNode auth.

A federation across hospitals needs two things before the first round: the SuperLink must
speak TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, which SuperNodes verify with
``--root-certificates``), and each SuperNode must prove which hospital it is
(``--enable-supernode-auth``; the SuperNode signs with an EC key in OpenSSH format, whose
public half the coordinator registers with ``flwr supernode register``). Setting that up by
hand with openssl and ssh-keygen is where pilots lose a day, so this module makes a small,
correct PKI (EC P-384, SHA-384) and a registry of the sites' public keys.

Each hospital makes its own key pair (:func:`create_site_key`) and only the public key
travels to the coordinator (:func:`add_site`). Production sites may use the hospital's own
CA instead of the pilot one: the ``check_*`` functions accept any CA and say, naming the file,
why Flower would refuse a certificate or key before a SuperLink or SuperNode is started.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_CURVE = ec.SECP384R1()
_HASH = hashes.SHA384()
_BACKDATE = timedelta(minutes=1)
_OPENSSH_PRIVATE = re.compile(
    rb"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY-----", re.DOTALL
)
_OPENSSH_MAGIC = b"openssh-key-v1\0"
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PkiError(ValueError):
    """A certificate, key or registry that Flower (or this PKI) cannot use; names the file."""


@dataclass(frozen=True)
class PkiPaths:
    """Where :func:`init_pki` writes the pilot CA, the SuperLink's pair and the registry."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    registry: Path

    @classmethod
    def at(cls, directory: Path) -> PkiPaths:
        d = Path(directory)
        return cls(
            d, d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "sites.json"
        )


@dataclass(frozen=True)
class SiteKeyPaths:
    """A site's SuperNode auth key pair in OpenSSH format."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class SiteRecord:
    """One site in ``sites.json``; ``private_key`` is set only for pairs made by the coordinator."""

    name: str
    public_key: Path
    fingerprint: str
    added: str
    revoked: str | None = None
    private_key: Path | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self, directory: Path) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": _relative(self.public_key, directory),
            "fingerprint": self.fingerprint,
            "added": self.added,
            "revoked": self.revoked,
            "private_key": _relative(self.private_key, directory) if self.private_key else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> SiteRecord:
        private = data.get("private_key")
        return cls(
            name=str(data["name"]),
            public_key=directory / str(data["public_key"]),
            fingerprint=str(data["fingerprint"]),
            added=str(data["added"]),
            revoked=data.get("revoked"),
            private_key=directory / str(private) if private else None,
        )


# --------------------------------------------------------------------------- writing files


def _relative(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix()


def _refuse_existing(paths: Sequence[Path], *, overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise PkiError(f"{path}: already exists; pass overwrite (--overwrite) to replace it")


def _write(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start: the content is never readable by others."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_private(path: Path, data: bytes) -> None:
    _write(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, mode=0o644)


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp() -> str:
    return _now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg pilot"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    # A random suffix keeps two pilots' CAs apart in a trust store holding both.
    name = _name(f"fedseg pilot CA {secrets.token_hex(4)}")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH)
    )


def _alt_names(names: Sequence[str], ips: Sequence[str], where: Path) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise PkiError(f"{where}: server name {name!r} is not a DNS name")
        entries.append(x509.DNSName(name))
    for ip in ips:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"{where}: server IP {ip!r} is not an IP address") from None
    if not entries:
        raise PkiError(f"{where}: give at least one server name or IP address")
    return entries


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    alt_names: list[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(str(alt_names[0].value)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, _HASH)
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1",),
    days: int = 825,
    overwrite: bool = False,
) -> PkiPaths:
    """Make a pilot CA, the SuperLink's TLS pair for ``server_names``/``server_ips``, a registry.

    An existing ``sites.json`` is kept even with ``overwrite``: the sites' auth keys do not
    depend on the CA, so re-issuing certificates does not undo any registration.
    """
    paths = PkiPaths.at(directory)
    if days < 1:
        raise PkiError(f"{paths.ca_cert}: validity must be at least one day, got {days}")
    alt_names = _alt_names(server_names, server_ips, paths.server_cert)
    _refuse_existing(
        [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite=overwrite
    )
    start = _now() - _BACKDATE
    end = start + timedelta(days=days)
    ca_key = ec.generate_private_key(_CURVE)
    ca_cert = _ca_certificate(ca_key, not_before=start, not_after=end)
    server_key = ec.generate_private_key(_CURVE)
    server_cert = _server_certificate(
        ca_key, ca_cert, server_key, alt_names=alt_names, not_before=start, not_after=end
    )
    paths.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(paths.ca_key, _pem_private(ca_key))
    _write_public(paths.ca_cert, _pem_cert(ca_cert))
    _write_private(paths.server_key, _pem_private(server_key))
    _write_public(paths.server_cert, _pem_cert(server_cert))
    if not paths.registry.exists():
        _save_registry(paths, [])
    return paths


# --------------------------------------------------------------------------- site keys


def _check_site_name(site: str, where: Path) -> None:
    if not SITE_NAME.fullmatch(site):
        raise PkiError(
            f"{where}: site name {site!r} is not allowed; use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )


def _openssh_public(key: ec.EllipticCurvePublicKey, comment: str) -> bytes:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + b" " + comment.encode() + b"\n"


def fingerprint(public_key_line: bytes) -> str:
    """``SHA256:...`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


def create_site_key(out_dir: Path, *, site: str, overwrite: bool = False) -> SiteKeyPaths:
    """Write ``<site>.key`` (OpenSSH EC P-384, 0600) and ``<site>.pub``; run at the hospital."""
    out_dir = Path(out_dir)
    _check_site_name(site, out_dir)
    paths = SiteKeyPaths(out_dir / f"{site}.key", out_dir / f"{site}.pub")
    _refuse_existing([paths.private_key, paths.public_key], overwrite=overwrite)
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # Flower loads the key without a password
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(paths.private_key, private)
    _write_public(paths.public_key, _openssh_public(key.public_key(), f"fedseg-{site}"))
    return paths


# --------------------------------------------------------------------------- registry


def _load_registry(paths: PkiPaths) -> list[SiteRecord]:
    where = paths.registry
    if not where.is_file():
        raise PkiError(f"{where}: no site registry here; run `fedseg pki init` first")
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
        return [SiteRecord.from_json(item, paths.directory) for item in data["sites"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise PkiError(f"{where}: not a fedseg site registry ({err})") from None


def _save_registry(paths: PkiPaths, records: Sequence[SiteRecord]) -> None:
    data = {"version": 1, "sites": [r.to_json(paths.directory) for r in records]}
    tmp = paths.registry.with_name(paths.registry.name + ".tmp")
    _write_public(tmp, (json.dumps(data, indent=2) + "\n").encode())
    os.replace(tmp, paths.registry)


def list_sites(directory: Path) -> list[SiteRecord]:
    """Every site ever added, revoked ones included, in the order they were added."""
    return _load_registry(PkiPaths.at(directory))


def _refuse_duplicates(paths: PkiPaths, records: Sequence[SiteRecord], site: str) -> None:
    if any(r.name == site and r.active for r in records):
        raise PkiError(
            f"{paths.registry}: site {site!r} is already registered; to rotate its key, "
            "revoke it first (`fedseg pki revoke-site`)"
        )


def _refuse_reused_key(
    paths: PkiPaths, records: Sequence[SiteRecord], fingerprint: str, key_file: Path
) -> None:
    for record in records:
        if record.fingerprint == fingerprint:
            state = "revoked key of" if record.revoked else "key of"
            raise PkiError(
                f"{key_file}: this public key ({fingerprint}) is the {state} site "
                f"{record.name!r} in {paths.registry}; each site needs its own new key"
            )


def add_site(directory: Path, *, site: str, public_key: Path | None = None) -> SiteRecord:
    """Register ``site``'s public key; without one, make the pair here (pilot convenience)."""
    paths = PkiPaths.at(directory)
    _check_site_name(site, paths.registry)
    records = _load_registry(paths)
    _refuse_duplicates(paths, records, site)
    private_key: Path | None = None
    if public_key is None:
        pair = create_site_key(paths.directory / "sites" / site, site=site)
        public_key, private_key = pair.public_key, pair.private_key
    found = check_public_key(public_key)
    _refuse_reused_key(paths, records, found, public_key)
    registered = paths.directory / "sites" / f"{site}.pub"
    registered.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_public(registered, Path(public_key).read_bytes())
    record = SiteRecord(site, registered, found, _timestamp(), private_key=private_key)
    _save_registry(paths, [*records, record])
    return record


def _retire_files(paths: PkiPaths, record: SiteRecord, stamp: datetime) -> SiteRecord:
    """Move a revoked site's files aside so that the name can be added again with a new key."""
    retired = paths.directory / "sites" / "revoked" / f"{record.name}-{stamp:%Y%m%dT%H%M%S%fZ}"
    retired.mkdir(parents=True, mode=0o700)
    public_key = retired / record.public_key.name
    if record.public_key.exists():
        os.replace(record.public_key, public_key)
    private_key = None
    if record.private_key is not None and record.private_key.parent.is_dir():
        os.replace(record.private_key.parent, retired / "generated")
        private_key = retired / "generated" / record.private_key.name
    return SiteRecord(
        record.name,
        public_key,
        record.fingerprint,
        record.added,
        revoked=stamp.isoformat(timespec="seconds"),
        private_key=private_key,
    )


def revoke_site(directory: Path, *, site: str) -> SiteRecord:
    """Mark ``site`` revoked (take it out, or revoke then add again to rotate its key)."""
    paths = PkiPaths.at(directory)
    records = _load_registry(paths)
    index = next((i for i, r in enumerate(records) if r.name == site and r.active), None)
    if index is None:
        raise PkiError(f"{paths.registry}: no active site {site!r} to revoke")
    records[index] = _retire_files(paths, records[index], _now())
    _save_registry(paths, records)
    return records[index]


# --------------------------------------------------------------------------- checks


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"{path}: {what} not found")
    return path.read_bytes()


def _check_validity(cert: x509.Certificate, path: Path, what: str) -> None:
    now = _now()
    if now < cert.not_valid_before_utc:
        raise PkiError(f"{path}: {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"{path}: {what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def _load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise PkiError(f"{path}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
    return certs


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(
            f"{path}: not a CA certificate (no BasicConstraints CA:TRUE); pass the CA that "
            "signed the server certificate, not the server certificate itself"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise PkiError(f"{path}: CA certificate's KeyUsage does not allow signing certificates")


def _ca_bundle(path: Path) -> list[x509.Certificate]:
    certs = _load_certificates(path, "CA certificate")
    for cert in certs:
        _check_is_ca(cert, path)
        _check_validity(cert, path, "CA certificate")
    return certs


def check_ca_certificate(path: Path) -> x509.Certificate:
    """The CA for ``--ssl-ca-certfile`` and ``--root-certificates`` (a bundle: the first)."""
    return _ca_bundle(path)[0]


def _openssh_cipher(data: bytes) -> str | None:
    """The cipher named in an OpenSSH private key's header; None if it isn't one."""
    match = _OPENSSH_PRIVATE.search(data)
    if not match:
        return None
    try:
        raw = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error:
        return None
    if not raw.startswith(_OPENSSH_MAGIC):
        return None
    head = raw[len(_OPENSSH_MAGIC) :]
    size = int.from_bytes(head[:4], "big")
    return head[4 : 4 + size].decode("ascii", errors="replace")


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode
    if os.name == "posix" and mode & 0o077:
        raise PkiError(
            f"{path}: private key is readable by group or others (mode {mode & 0o777:o}); "
            f"run `chmod 600 {path}`"
        )


def _check_nist_ec(key: object, path: Path) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise PkiError(
            f"{path}: {type(key).__name__.removeprefix('_')} is not an EC key; Flower's "
            "SuperNode auth needs EC on a NIST curve (make one with `fedseg pki site-key`)"
        )
    if not isinstance(key.curve, NIST_CURVES):
        raise PkiError(f"{path}: EC curve {key.curve.name} is not a NIST curve (use P-384)")


def check_auth_private_key(path: Path) -> None:
    """A key ``flower-supernode --auth-supernode-private-key`` can load: OpenSSH EC, no password."""
    path = Path(path)
    data = _read(path, "SuperNode private key")
    _check_private_mode(path)
    cipher = _openssh_cipher(data)
    if cipher is None:
        hint = "; convert it with `ssh-keygen -p -f KEY`" if b"PRIVATE KEY-----" in data else ""
        raise PkiError(f"{path}: not an OpenSSH private key{hint}")
    if cipher != "none":
        raise PkiError(
            f"{path}: private key is password-protected ({cipher}); Flower cannot use it. "
            "Remove the password with `ssh-keygen -p -N '' -f KEY`"
        )
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise PkiError(f"{path}: not a usable OpenSSH private key ({err})") from None
    _check_nist_ec(key, path)


def check_public_key(path: Path) -> str:
    """A key ``flwr supernode register`` accepts; returns its ``SHA256:`` fingerprint."""
    path = Path(path)
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise PkiError(f"{path}: this is a private key; register the .pub file, keep this one")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm, IndexError) as err:
        raise PkiError(f"{path}: not an OpenSSH public key ({err})") from None
    _check_nist_ec(key, path)
    return fingerprint(data.strip())


def _load_pem_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "server private key")
    try:
        return serialization.load_pem_private_key(data, None)
    except TypeError:
        msg = f"{path}: server key is password-protected; the SuperLink needs it without one"
        raise PkiError(msg) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{path}: not a PEM private key") from None


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_issued_by(
    cert: x509.Certificate, cert_path: Path, cas: Sequence[x509.Certificate], ca_path: Path
) -> None:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise PkiError(f"{cert_path}: not issued by the CA in {ca_path}")


def _check_host(cert: x509.Certificate, path: Path, host: str) -> None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        msg = f"{path}: certificate has no subjectAltName; TLS clients reject it"
        raise PkiError(msg) from None
    names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    ips: list[Any] = list(san.get_values_for_type(x509.IPAddress))
    try:
        wanted: Any = ipaddress.ip_address(host)
        found = wanted in ips
    except ValueError:
        found = host.lower().rstrip(".") in names
    if not found:
        listed = ", ".join([*names, *map(str, ips)]) or "none"
        raise PkiError(f"{path}: {host!r} is not among the certificate's names ({listed})")


def check_server_pair(cert: Path, key: Path, ca: Path, *, host: str | None = None) -> None:
    """The SuperLink's ``--ssl-certfile``/``--ssl-keyfile`` pair, against ``--ssl-ca-certfile``."""
    cas = _ca_bundle(ca)
    server = _load_certificates(cert, "server certificate")[0]
    _check_issued_by(server, Path(cert), cas, Path(ca))
    _check_validity(server, Path(cert), "server certificate")
    if _public_der(_load_pem_key(Path(key)).public_key()) != _public_der(server.public_key()):
        raise PkiError(f"{key}: private key does not match the certificate {cert}")
    if host is not None:
        _check_host(server, Path(cert), host)
