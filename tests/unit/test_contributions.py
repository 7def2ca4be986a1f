"""Leave-one-site-out: each site's effect on the others, through ``run_study``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from evaluation.report import markdown_report
from fedseg.records import WEIGHTS
from fedseg.server_app import run_study
from tests.unit.test_resume import _run, _server_identity, _Sites

__all__ = ["_server_identity"]
STEP = {7: 3.0, 8: 4.0, 9: 0.0}  # what each site's training adds to every weight
NAMES = {7: "hospital-a", 8: "hospital-b", 9: "hospital-c"}


class _Helpful(_Sites):
    """Sites whose training moves the model by their own step, and whose validation Dice
    grows with how far the model moved (so a site's effect on the others is known)."""

    def __init__(self) -> None:
        super().__init__(nodes=NAMES)
        self.start: float | None = None

    def _answer(self, msg: Message, server_round: int) -> Message:
        node = msg.metadata.dst_node_id
        name = self.nodes[node]
        content = RecordDict({"site": ConfigRecord({"site": name, "fingerprint": f"fp-{name}"})})
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        weights = arrays[WEIGHTS].numpy()
        if msg.metadata.message_type == "train":
            content["arrays"] = ArrayRecord({WEIGHTS: Array(weights + STEP[node])})
            content["metrics"] = MetricRecord(
                {"num-examples": 4, "train-loss": 0.5, "local-steps": 2, "train-seconds": 1.0}
            )
            return Message(content, reply_to=msg)
        moved = float(np.mean(weights))
        dice = min(1.0, max(0.0, moved / 20))
        values: dict[str, float | int] = {"num-examples": 3}
        for region in ("WT", "TC", "ET"):
            for stat in ("mean", "median", "std", "p5", "p95"):
                values[f"dice-{region}-{stat}"] = dice
                values[f"hd95-{region}-{stat}"] = 1.0
        content["metrics"] = MetricRecord(values)
        return Message(content, reply_to=msg)


def test_each_sites_effect_on_the_others_is_measured(tmp_path: Path) -> None:
    run = _run(tmp_path, num_server_rounds=2, min_train_sites=2, leave_one_out=True)
    run_dir = Path(run.run_dir)
    sites = _Helpful()
    run_study(run, run_dir, sites)  # type: ignore[arg-type]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    effects = {s: e["effect"] for s, e in metrics["contributions"]["sites"].items()}
    # With all three the mean step is 7/3 per round; without a it is 2, without b 3/2 (b
    # helped most), without c 7/2 (c, adding nothing, held the others back).
    assert effects["hospital-b"] > effects["hospital-a"] > 0 > effects["hospital-c"]
    assert effects["hospital-b"] == pytest.approx(2 * (7 / 3 - 3 / 2) / 20, abs=1e-4)
    assert metrics["contributions"]["sites"]["hospital-a"]["other_sites"] == [
        "hospital-b",
        "hospital-c",
    ]
    # Three reruns of two rounds after the study's own two, each without one site.
    assert sites.rounds_sent.count(1) == 3 + 3 * 2
    audit = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in audit][-2:] == ["contributions", "study-end"]
    text = markdown_report(metrics, title="t")
    assert "Leave-one-site-out" in text and "| hospital-b |" in text
