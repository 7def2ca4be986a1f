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


def test_ctrl_c_during_training_leaves_no_flower_process(tmp_path: Path) -> None:
    # Prepare
    before = flower_processes()
    command = ["demo", "--out", str(tmp_path / "demo"), "--sites", "2", "--rounds", "5", "--quick"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseg", *command],
        env={**os.environ, **FLOWER_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 300
        for line in proc.stderr:
            if "[ROUND 1" in line or time.monotonic() > deadline:
                break
        assert len(flower_processes() - before) > 0, "Flower never started"
        # Execute
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert
    assert proc.returncode != 0
    deadline = time.monotonic() + 20
    while flower_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes() - before == set()
