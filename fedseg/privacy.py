"""User-level differential privacy for a study: each site is one "user".

The mechanism is DP-FedAvg with client-side fixed clipping (McMahan et al. 2018; Flower's
``DifferentialPrivacyClientSideFixedClipping``): each site clips its own update (its trained
model minus the global one) to L2 norm ``dp-clipping-norm`` before it leaves (the
:func:`clipping_mod` at the site, with Flower's ``compute_clip_model_update``), the server
averages the sites' updates with equal weights and adds Gaussian noise of standard deviation
``dp-noise-multiplier x dp-clipping-norm / min-train-sites`` (Flower's ``compute_stdv`` and
``add_gaussian_noise_inplace``). Flower's wrapper itself is not used: it skips a round's
aggregation when any site failed, and fedseg records and averages past failures.

Privacy spent is accounted with Flower's RDP accountant (Google's ``dp-accounting``), one
Gaussian release per aggregated round, no amplification by sampling (every site takes part):
``epsilon`` at ``dp-delta`` after each round, in ``metrics.json`` and the report. Noise is
calibrated to ``min-train-sites``; when more sites contribute, each one's influence on the
mean is smaller, so the reported epsilon is an upper bound. The final model is
post-processing of the noised releases and spends nothing more.
Validation metrics are not covered: they leave through the egress guard's rules instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
)


@dataclass(frozen=True, kw_only=True)
class DpSettings:
    """The study's DP parameters (run config ``dp-*``)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    min_sites: int


class PrivateRelease:
    """Noise on each aggregated model and the privacy spent so far."""

    def __init__(self, settings: DpSettings) -> None:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.settings = settings
        config = PrivacyConfig(
            target_delta=settings.delta,
            population_size=settings.min_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        self.accountant = RdpAccountant(config)

    def release(self, averaged: ArrayRecord) -> ArrayRecord:
        """The averaged model (the round's start plus the mean clipped update) plus noise."""
        s = self.settings
        stdv = compute_stdv(s.noise_multiplier, s.clipping_norm, s.min_sites)
        out = {}
        for key in averaged:
            values = averaged[key].numpy().astype(np.float32, copy=True)
            # Not seeded from the study's seed: noise anyone can regenerate protects nothing.
            add_gaussian_noise_inplace([values], stdv)
            out[key] = Array(values)
        self.compose(1)
        spent = self.spent()
        log(
            INFO,
            "fedseg DP: noise stdev %.3g added; epsilon %.3f at delta %g",
            stdv,
            spent["epsilon"],
            spent["delta"],
        )
        return ArrayRecord(out)

    def compose(self, releases: int) -> None:
        """Account ``releases`` aggregated rounds (a resumed study replays its history)."""
        if releases:
            event = GaussianPrivacyEvent(
                noise_multiplier=self.settings.noise_multiplier,
                sample_size=self.settings.min_sites,
                population_size=self.settings.min_sites,
            )
            self.accountant.compose(event, count=releases)

    def spent(self) -> dict[str, Any]:
        """``epsilon`` at ``delta`` after the releases so far, with the mechanism's settings."""
        s = self.settings
        spent = self.accountant.get_privacy_spent()
        return {
            "epsilon": float(spent.epsilon),
            "delta": float(spent.delta),
            "releases": int(spent.num_releases),
            "noise_multiplier": s.noise_multiplier,
            "clipping_norm": s.clipping_norm,
            "accounting": spent.accounting_method,
        }


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: when the server asks for it (``clipping_norm`` in a training message's
    config), clip this site's update to that L2 norm before it leaves. A decline or error
    reply passes untouched (Flower's ``fixedclipping_mod`` would turn a decline into an
    error)."""
    config = msg.content.get("config") if msg.has_content() else None
    if not isinstance(config, ConfigRecord) or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    sent = msg.content.get("arrays")
    reply = call_next(msg, context)
    trained = reply.content.get("arrays") if reply.has_content() else None
    if (
        reply.has_error()
        or not isinstance(trained, ArrayRecord)
        or not isinstance(sent, ArrayRecord)
        or list(trained) != list(sent)
    ):
        return reply
    norm = config[KEY_CLIPPING_NORM]
    assert isinstance(norm, int | float)
    values = [trained[k].numpy().copy() for k in trained]
    compute_clip_model_update(values, [sent[k].numpy() for k in sent], float(norm))
    reply.content["arrays"] = ArrayRecord(
        {k: Array(v) for k, v in zip(trained, values, strict=True)}
    )
    return reply
