"""``fedseg pki``: make the pilot CA and SuperLink certificate, site keys and the site registry.

Each command prints what it wrote and the next step. Errors print one line naming the file
and exit 1. Kept apart from ``fedseg.cli`` (which mounts ``pki_app``) so neither imports the
other at module level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedseg.deploy.pki import (
    PkiError,
    SiteRecord,
    add_site,
    create_site_key,
    init_pki,
    list_sites,
    revoke_site,
)

pki_app = typer.Typer(
    help="Pilot PKI for a Flower deployment: TLS for the SuperLink, auth keys for SuperNodes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _pki_errors(func: F) -> F:
    """Turn a refused certificate, key or registry into one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (PkiError, OSError) as err:
            console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _say(message: str) -> None:
    console.print(escape(message), highlight=False)


@pki_app.command()
@_pki_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the CA, server pair, registry.")],
    server_name: Annotated[
        list[str] | None,
        typer.Option(
            help="DNS name sites use to reach the SuperLink (repeatable).", show_default="localhost"
        ),
    ] = None,
    server_ip: Annotated[
        list[str] | None,
        typer.Option(help="IP address of the SuperLink (repeatable).", show_default="127.0.0.1"),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of the certificates.")] = 825,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing CA and server pair.")
    ] = False,
) -> None:
    """Make the pilot CA and the SuperLink's TLS certificate and key (run at the coordinator)."""
    paths = init_pki(
        directory,
        server_names=server_name if server_name is not None else ("localhost",),
        server_ips=server_ip if server_ip is not None else ("127.0.0.1",),
        days=days,
        overwrite=overwrite,
    )
    _say(
        f"wrote {paths.ca_cert}, {paths.ca_key}, {paths.server_cert}, {paths.server_key} "
        f"and {paths.registry}"
    )
    _say(
        f"next: flower-superlink --ssl-ca-certfile {paths.ca_cert} --ssl-certfile "
        f"{paths.server_cert} --ssl-keyfile {paths.server_key} --enable-supernode-auth; "
        f"give {paths.ca_cert} (never {paths.ca_key.name}) to every site"
    )


@pki_app.command("site-key")
@_pki_errors
def site_key(
    out_dir: Annotated[Path, typer.Argument(help="Folder at the site for the key pair.")],
    site: Annotated[str, typer.Option(help="The site's name, as registered.")],
) -> None:
    """Make this site's SuperNode auth key pair (run at the hospital; only .pub leaves it)."""
    pair = create_site_key(out_dir, site=site)
    _say(f"wrote {pair.private_key} (keep it here) and {pair.public_key}")
    _say(
        f"next: send {pair.public_key} to the coordinator (fedseg pki add-site DIR --site {site} "
        f"--public-key {pair.public_key.name}); start the SuperNode with "
        f"--auth-supernode-private-key {pair.private_key} --root-certificates ca.crt"
    )


@pki_app.command("add-site")
@_pki_errors
def add_site_command(
    directory: Annotated[Path, typer.Argument(help="The folder made by `fedseg pki init`.")],
    site: Annotated[str, typer.Option(help="The site's name.")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="The site's .pub file; without it, a pair is made here (pilots only)."),
    ] = None,
) -> None:
    """Record a site's public key in the registry (run at the coordinator)."""
    record = add_site(directory, site=site, public_key=public_key)
    _say(f"registered site {record.name} ({record.fingerprint}) as {record.public_key}")
    hand_over = f"{Path(directory) / 'ca.crt'}"
    if record.private_key is not None:
        hand_over += f" and, securely, {record.private_key} (then delete the copy here)"
    _say(
        f"next: flwr supernode register {record.public_key} <connection> --name {record.name}; "
        f"give the site {hand_over}"
    )


@pki_app.command("revoke-site")
@_pki_errors
def revoke_site_command(
    directory: Annotated[Path, typer.Argument(help="The folder made by `fedseg pki init`.")],
    site: Annotated[str, typer.Option(help="The site to revoke.")],
) -> None:
    """Mark a site revoked: to take it out, or before adding it again with a new key."""
    record = revoke_site(directory, site=site)
    _say(f"revoked site {record.name} ({record.fingerprint}); its key moved to {record.public_key}")
    _say(
        "next: find its node id with `flwr supernode ls <connection>`, then "
        "`flwr supernode unregister <node-id> <connection>`; to rotate, add it again with "
        "its new --public-key"
    )


def _row(record: SiteRecord) -> str:
    state = "active" if record.active else f"revoked {record.revoked}"
    return f"{record.name}\t{state}\t{record.fingerprint}\t{record.public_key}"


@pki_app.command("list")
@_pki_errors
def list_command(
    directory: Annotated[Path, typer.Argument(help="The folder made by `fedseg pki init`.")],
) -> None:
    """List registered sites (name, state, fingerprint, public key), one per line."""
    records = list_sites(directory)
    if not records:
        _say(f"no sites registered in {Path(directory) / 'sites.json'}; add one with add-site")
    for record in records:
        typer.echo(_row(record))
