"""Flower's SuperNode with a shorter idle poll: ``python -m fedseg.deploy.supernode ARGS``.

Takes exactly ``flower-supernode``'s arguments. Flower 1.42's SuperNode sleeps a fixed 3 s
whenever a poll of the SuperLink finds no message (``time.sleep(3)`` in
``flwr.supernode.start_client_internal``, with no option to change it). A round is two
messages per site (train, then validate) and the second always arrives while the SuperNode
sleeps, so that sleep alone adds about 3-6 s to every round. This entry point caps the
module's sleeps at :data:`IDLE_POLL_SECONDS` and then runs Flower's own ``flower_supernode``;
nothing else changes. At 0.5 s a site polls twice a second while idle, a load any SuperLink
takes for hundreds of sites. If Flower's module changes shape, it runs unmodified, with a
warning.
"""

from __future__ import annotations

import time
import types
from logging import WARNING

IDLE_POLL_SECONDS = 0.5


def _capped_time(cap: float) -> types.SimpleNamespace:
    """The ``time`` module as Flower's loop sees it, with ``sleep`` capped at ``cap``."""
    clock = types.SimpleNamespace(
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    )
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return clock


def main() -> None:
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if getattr(loop, "time", None) is time:
        loop.time = _capped_time(IDLE_POLL_SECONDS)  # type: ignore[assignment,attr-defined]
    else:
        log(WARNING, "fedseg: Flower's SuperNode loop changed; running it with its own poll")
    flower_supernode()


if __name__ == "__main__":
    main()
