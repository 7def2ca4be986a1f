"""Which Flower and Ray processes run on this machine (tests must leave none behind)."""

from __future__ import annotations

from pathlib import Path

MARKERS = (
    "flower-superlink", "flower-superexec", "flower-supernode", "flwr-simulation", "raylet",
    "gcs_server", "fedseg.deploy.supernode", "fedseg.deploy.superexec", "-m fedseg client",
    "-m fedseg superlink",
)  # fmt: skip


def flower_processes() -> set[int]:
    """PIDs of Flower and Ray processes on this machine."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in text for marker in MARKERS):
            pids.add(int(cmdline.parent.name))
    return pids
