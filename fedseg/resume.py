"""A study's restart point: what the server needs to continue after a crash or restart.

Flower keeps no checkpoint of a ServerApp. After every completed round the server writes
``state.json`` beside the round's checkpoint: the round, the checkpoint and its sha256, the
node-to-site names, the strategy, and the run config. ``fedseg study --resume
RUN_DIR`` submits the same config with ``resume = true``; the server then continues with the
next round, so at most the round in flight is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_adapters.sources import sha256_file
from fedseg.artifacts import load_weights
from fedseg.config import ConfigError, RunConfig, Scalar
from fedseg.strategies import MetricsBook

STATE_NAME = "state.json"
# Keys a resumed study may change: where it waits and how long, and how many rounds in all.
MAY_CHANGE = frozenset({
    "resume", "run-dir", "wait-for-sites", "round-timeout", "num-server-rounds",
    "min-available-sites", "personalise-steps", "leave-one-out",
})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    """Everything needed to go on with the round after ``last_round``."""

    last_round: int
    weights: dict[str, Any]
    book: MetricsBook
    # The strategy's saved state (checked against its sha256), or None.
    strategy_state: Path | None = None


def save_strategy_state(strategy: object, checkpoint: Path) -> dict[str, str] | None:
    """A strategy's server-side state (FedAdam/FedYogi moments) beside the round's
    checkpoint; ``None`` for strategies whose only state is their configuration."""
    if not hasattr(strategy, "state_arrays"):
        return None
    path = checkpoint.with_suffix(".strategy.npz")
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **strategy.state_arrays())
    os.replace(tmp, path)
    return {"file": path.name, "sha256": sha256_file(path)}


def load_strategy_state(strategy: object, path: Path) -> None:
    """Give a resumed strategy the state :func:`save_strategy_state` wrote."""
    if not hasattr(strategy, "load_state_arrays"):
        raise ConfigError(f"{path}: holds strategy state, but the strategy keeps none")
    with np.load(path) as arrays:
        strategy.load_state_arrays({k: arrays[k] for k in arrays.files})


def state_payload(
    *, run: RunConfig, last_round: int, checkpoint: Path, sha256: str, book: MetricsBook,
    strategy_state: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The content of ``state.json`` after ``last_round``. Strategies other than the FedOpt
    family keep no state beyond their configuration, which the resume check compares."""
    return {
        "last_round": last_round,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256,
        "node_sites": {str(k): v for k, v in book.node_sites.items()},
        "strategy": run.strategy,
        "strategy_state": strategy_state,
        "config": run.to_flower(),
    }


@contextmanager
def study_lock(run_dir: Path) -> Iterator[None]:
    """Held by the ServerApp for the whole study: a second ServerApp on the same run folder
    (a resume while the first still runs, its stream only lost) is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir}: a ServerApp is still running this study (check `flwr ls`); "
                "resume only once it has stopped"
            ) from None
        yield


def read_state(run_dir: Path) -> dict[str, Any]:
    """``state.json`` of a run folder, with a clear error when there is none."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; the run completed no round, nothing to resume")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or "last_round" not in state:
        raise ConfigError(f"{path}: not a fedseg study state (no last_round)")
    return state


def changed_keys(saved: dict[str, Scalar], now: dict[str, Scalar]) -> list[str]:
    """Run-config keys that differ between the interrupted study and its resumption, other
    than those a resumption may change."""
    keys = (set(saved) | set(now)) - MAY_CHANGE
    return sorted(k for k in keys if saved.get(k) != now.get(k))


def load_resume_point(run_dir: Path, run: RunConfig, *, weights_size: int = 0) -> ResumePoint:
    """Check that ``run`` continues the study in ``run_dir`` and load where it stopped.

    A study that died after its last round but before writing ``model.pt`` resumes with no
    round left to run: the final model is written from the last checkpoint.
    """
    where = run_dir / STATE_NAME
    state = read_state(run_dir)
    try:
        changed = changed_keys(state["config"], run.to_flower())
        last, name = int(state["last_round"]), str(state["checkpoint"])
        digest, names = str(state["checkpoint_sha256"]), dict(state["node_sites"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{where}: incomplete study state ({err!r} missing or malformed)"
        ) from None
    if changed:
        raise ConfigError(
            f"{where}: the resumed run config differs in {changed}; a resumed study must be "
            "the same study"
        )
    if last >= run.num_server_rounds and (run_dir / "model.pt").is_file():
        raise ConfigError(f"{where}: all {run.num_server_rounds} rounds are done already")
    checkpoint = run_dir / "checkpoints" / name
    if not checkpoint.is_file():
        raise ConfigError(f"{checkpoint}: missing (state.json names it as round {last}'s)")
    if sha256_file(checkpoint) != digest:
        raise ConfigError(f"{checkpoint}: sha256 differs from the one state.json recorded")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        rounds = list(metrics["rounds"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{run_dir / 'metrics.json'}: unreadable ({err})") from None
    book = MetricsBook.restore(rounds, node_sites={int(k): str(v) for k, v in names.items()},
                               up_to=last, weights_size=weights_size)  # fmt: skip
    strategy_state = _strategy_file(run_dir, state.get("strategy_state"))
    return ResumePoint(last_round=last, weights=load_weights(checkpoint), book=book,
                       strategy_state=strategy_state)  # fmt: skip


def _strategy_file(run_dir: Path, entry: object) -> Path | None:
    if not entry:
        return None
    assert isinstance(entry, dict)
    path = run_dir / "checkpoints" / str(entry["file"])
    if not path.is_file() or sha256_file(path) != entry.get("sha256"):
        raise ConfigError(f"{path}: missing or not the strategy state state.json recorded")
    return path
