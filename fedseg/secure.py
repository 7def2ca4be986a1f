"""Secure aggregation (SecAgg+, Bell et al. 2020) of a FedAvg or FedProx training round.

With ``secure-aggregation = true`` the server never sees one site's model: each site adds
masks to its quantised, case-weighted weights that cancel only in the sum over the sites, and
the server learns the weighted mean and nothing else. The protocol is Flower's own
(``SecAggPlusWorkflow`` at the server, ``secaggplus_mod`` at the sites): four message
exchanges per round (keys, encrypted key shares, masked vectors, unmasking shares), which
survives sites dropping out as long as ``secagg-threshold`` of each one's neighbours answer.

Flower 1.42 runs SecAgg+ only on its legacy workflow API (``LegacyContext``, ``FitIns`` /
``FitRes``); fedseg's round loop uses the message API. This module bridges the two for the
training phase of a round, so the rest of a study (validation, checkpoints, audit,
resume) is unchanged:

- :func:`secure_round` (server) runs the workflow for one round through a relay that uses
  fedseg's bounded :func:`fedseg.exchange.exchange` and keeps each site's training summary,
  which travels beside the masked vector (metrics, never weights);
- :func:`secure_aggregation_mod` (site) runs ``secaggplus_mod`` for the protocol's messages
  and translates its ``fitins`` / ``fitres`` records to and from fedseg's train task.

What it rules out, and fedseg refuses with it: anything that needs one site's update at the
server (the outlier check ``max-update-ratio``, robust aggregators, DP's per-site checks,
FedBN's partial models, the cyclic plan). The mean is exact up to quantisation: each weight is
clipped to ``±secagg-clipping-range`` and quantised to 2^22 levels, so the error on the mean is
at most ``sites x range / 2^22 / (sum of weights / max weight)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from logging import INFO
from typing import cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    bytes_to_ndarray,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedseg.config import RunConfig
from fedseg.exchange import exchange
from fedseg.records import WEIGHTS

# What a site's reply to each protocol message may hold in its SecAgg+ record.
REPLY_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}


@dataclass(frozen=True, kw_only=True)
class SecAggSettings:
    """SecAgg+ parameters (run config ``secagg-*``)."""

    # Each site's secrets are split among this fraction of the round's sites ...
    shares: float
    # ... and this fraction of those shares recovers them (the dropout tolerance).
    threshold: float
    # Weights are clipped to this range before quantisation.
    clipping_range: float
    # The largest weight (training cases) one site's update may carry.
    max_weight: float


# --- the server ---------------------------------------------------------------------------


class _Relay:
    """The grid the workflow sees: fedseg's bounded exchange instead of Flower's unbounded
    wait, and every reply kept for the round's bookkeeping. A reply without the protocol's
    record (a site declining at its training step) reaches the workflow as an error, which
    it treats as a dropout."""

    def __init__(self, grid: Grid, *, timeout_s: float) -> None:
        self.grid, self.timeout_s = grid, timeout_s
        self.replies: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = exchange(self.grid, messages, timeout_s=self.timeout_s)
        self.replies += replies
        return [
            r if r.has_error() or RECORD_KEY_CONFIGS in r.content
            else _did_not_train(by_node[r.metadata.src_node_id])
            for r in replies
        ]  # fmt: skip

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)


def _did_not_train(msg: Message) -> Message:
    """An error reply to ``msg`` from the site it went to."""
    error = Message(Error(code=ErrorCode.UNKNOWN, reason="the site did not train"), reply_to=msg)
    error.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return error


class _OneRound(LegacyStrategy):
    """The legacy strategy the workflow asks: the train messages fedseg's own strategy
    configured, and the unmasked mean as the round's result (no legacy evaluation)."""

    def __init__(self, train: list[Message], proxies: Mapping[int, ClientProxy]) -> None:
        self.train, self.proxies = train, proxies
        self.mean: Parameters | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        fits = []
        for msg in self.train:
            config = msg.content["config"]
            assert isinstance(config, ConfigRecord)
            scalars = cast(dict[str, Scalar], dict(config))
            fits.append((self.proxies[msg.metadata.dst_node_id], FitIns(parameters, scalars)))
        return fits

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:  # fmt: skip
        # The workflow hands every result the same unmasked weighted mean.
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:  # fmt: skip
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


@dataclass(frozen=True)
class SecureRound:
    """What one secure round gave: the new model (None: the protocol halted) and every
    reply the sites sent, for the round's record."""

    mean: ArrayRecord | None
    replies: list[Message]


def secure_round(
    train: list[Message], grid: Grid, *, server_round: int, arrays: ArrayRecord,
    settings: SecAggSettings, timeout_s: float,
) -> SecureRound:  # fmt: skip
    """Run SecAgg+ over the ``train`` messages fedseg's strategy configured; the mean."""
    relay = _Relay(grid, timeout_s=timeout_s)
    proxies = {m.metadata.dst_node_id: GridClientProxy(m.metadata.dst_node_id, relay, 0)  # type: ignore[arg-type]
               for m in train}  # fmt: skip
    legacy = _OneRound(train, proxies)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=server_round), strategy=legacy)
    for proxy in proxies.values():
        context.client_manager.register(proxy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow = SecAggPlusWorkflow(
        num_shares=settings.shares,
        reconstruction_threshold=settings.threshold,
        clipping_range=settings.clipping_range,
        max_weight=settings.max_weight,
        timeout=timeout_s,
    )
    # It halts by itself with fewer than two sites (one cannot hide behind nobody).
    workflow(relay, context)  # type: ignore[arg-type]
    if legacy.mean is None:
        return SecureRound(mean=None, replies=relay.replies)
    (mean,) = compat.parameters_to_arrayrecord(legacy.mean, keep_input=True).values()
    log(INFO, "fedseg: secure aggregation of %d sites completed", len(train))
    weights = mean.numpy().astype(np.float32)
    return SecureRound(mean=ArrayRecord({WEIGHTS: Array(weights)}), replies=relay.replies)


def training_replies(replies: list[Message]) -> list[Message]:
    """The replies that carry a site's training summary (or say why it did not train):
    the masked-vector stage's, and the failures and declines of every stage."""
    kept = []
    for reply in replies:
        record = reply.content.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
        if record is None or Key.MASKED_PARAMETERS in record:
            kept.append(reply)
    return kept


def reply_problems(name: str, record: object, *, weights_size: int) -> list[str] | None:
    """Why a record of a SecAgg+ reply may not leave the site (empty: it may); None for a
    record the protocol does not send. The masked vector is uniform noise to anyone without
    the other sites' masks, so only its size (the model's, plus the weight) is checked."""
    if name == RECORD_KEY_CONFIGS and isinstance(record, ConfigRecord):
        allowed = set().union(*REPLY_KEYS.values())
        problems = [f"SecAgg+ key '{k}' is not allowed" for k in record if k not in allowed]
        masked = record.get(Key.MASKED_PARAMETERS)
        if masked is not None:
            size = sum(int(bytes_to_ndarray(b).size) for b in cast(list[bytes], masked))
            if size != weights_size + 1:
                problems.append(f"masked vector of {size} values; the model sends {weights_size}")
        return problems
    if name in ("arrays", "fitres.parameters") and isinstance(record, ArrayRecord):
        # secaggplus_mod clears every array record once the masked vector is made.
        return [f"record '{name}' holds arrays beside the masked vector"] if len(record) else []
    if name == "fitres.num_examples" and isinstance(record, MetricRecord):
        return [] if list(record) == ["num_examples"] else [f"record '{name}' holds more"]
    if name == "fitres.metrics" and isinstance(record, ConfigRecord):
        return [f"record '{name}' is not empty"] if len(record) else []
    if name == "fitres.status" and isinstance(record, ConfigRecord):
        fine = set(record) == {"code", "message"} and record["message"] == "Success"
        return [] if fine else [f"record '{name}' is not a plain success"]
    return None


# --- the site -----------------------------------------------------------------------------


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a SecAgg+ protocol message goes through Flower's ``secaggplus_mod``,
    whose training step is fedseg's train task; any other message passes."""
    if msg.metadata.message_type != "train" or RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, partial(_train_from_fitins, call_next=call_next))


def _train_from_fitins(msg: Message, context: Context, *, call_next: ClientAppCallable) -> Message:
    """The protocol's training step: fedseg's train message from the ``fitins`` records and
    fedseg's reply with the ``fitres`` records beside it (the mod masks and then clears the
    weights before anything leaves)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    (weights,) = compat.parameters_to_arrayrecord(fitins.parameters, keep_input=True).values()
    ours = RecordDict({
        "arrays": ArrayRecord({WEIGHTS: Array(weights.numpy())}),
        "config": ConfigRecord(dict(fitins.config)),  # type: ignore[arg-type]
    })  # fmt: skip
    msg.content = ours
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content:
        return reply  # a decline: the mod fails this step, the others unmask without it
    trained = reply.content["arrays"]
    metrics = reply.content["metrics"]
    assert isinstance(trained, ArrayRecord) and isinstance(metrics, MetricRecord)
    values = trained[WEIGHTS].numpy()
    limit = RunConfig.from_flower(context.run_config).secagg_clipping_range
    largest = float(np.abs(values).max())
    if largest > limit:
        # Quantisation would clip it silently and the mean would be wrong.
        raise ValueError(f"a weight of magnitude {largest:.3g} is outside "
                         f"secagg-clipping-range {limit:g}")  # fmt: skip
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=compat.arrayrecord_to_parameters(ArrayRecord({"0": Array(values)}), True),
        num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        metrics={},
    )
    for name, record in compat.fitres_to_recorddict(fitres, keep_input=True).items():
        reply.content[name] = record
    return reply
