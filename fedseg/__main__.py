"""``python -m fedseg`` runs the CLI."""

from fedseg.cli import app

app()
