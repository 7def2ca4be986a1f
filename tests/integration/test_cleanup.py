"""Ctrl-C during federated training stops everything Flower started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedseg.simulation import FLOWER_ENV
from tests.processes import flower_processes


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_training_leaves_no_flower_process(tmp_path: Path) -> None:
    # Prepare
    before = flower_processes()
    command = ["demo", "--out", str(tmp_path / "demo"), "--sites", "2", "--rounds", "5", "--quick"]
    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseg", *command],
        env={**os.environ, **FLOWER_ENV},
        stdout=subprocess.DEVNULL,
        stderr=log,
        # As in a terminal: a test runner started in the background (``cmd &``) passes SIGINT
        # on as ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=_default_sigint,
    )
    # The ServerApp's first audit record: the study is under way inside Flower. (Waiting for
    # a line on a pipe instead hung on the pipe, or missed a line Flower had not streamed.)
    started = tmp_path / "demo" / "run" / "audit.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not started.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the demo ended before training started"
        assert len(flower_processes() - before) > 0, "Flower never started"
        # Execute
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # Assert
    assert proc.returncode != 0, (tmp_path / "demo.log").read_text()[-2000:]
    deadline = time.monotonic() + 20
    while flower_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes() - before == set()
