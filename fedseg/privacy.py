"""User-level differential privacy for a study: each site is one "user".

The mechanism is DP-FedAvg with client-side fixed clipping (McMahan et al. 2018; Flower's
``DifferentialPrivacyClientSideFixedClipping``): each site clips its own update (its trained
model minus the global one) to L2 norm ``dp-clipping-norm`` before it leaves (the
:func:`clipping_mod` at the site, with Flower's ``adaptive_clip_inputs_inplace``), the server
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

**Adaptive clipping** (``dp-clipping = "adaptive"``, Andrew et al. 2021, "Differentially
private learning with adaptive clipping"): each site also says whether its update was
clipped; the server noises the count of unclipped updates (stdev ``dp-count-stddev``) and moves
the norm geometrically towards the ``dp-target-quantile`` of the sites' update norms,
``C <- C exp(-lr (unclipped fraction - quantile))``. Releasing the count spends privacy, so
the update noise is raised to ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Flower's
``compute_adaptive_noise_params``) and the pair of releases is accounted as one Gaussian
mechanism of multiplier ``z`` (the paper's Theorem 1). Flower's own adaptive wrappers are not
used: besides the failure handling above, they feed the *clipped* fraction into that update,
which moves the norm away from the quantile (down when most updates are clipped), and calibrate
a round's noise to the norm after the update rather than the one the sites clipped at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
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
    adaptive_clip_inputs_inplace,
    add_gaussian_noise_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
)

# In a training message's config: report whether the update was clipped ("update-clipped").
KEY_REPORT_CLIPPED = "report-clipped"
CLIPPED_METRIC = "update-clipped"


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """How the clipping norm follows the sites' update norms (run config ``dp-*``)."""

    target_quantile: float
    learning_rate: float
    count_stddev: float


@dataclass(frozen=True, kw_only=True)
class DpSettings:
    """The study's DP parameters (run config ``dp-*``)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    min_sites: int
    adaptive: AdaptiveClipping | None = None


class PrivateRelease:
    """Noise on each aggregated model, the clipping norm and the privacy spent so far."""

    def __init__(self, settings: DpSettings) -> None:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.settings = settings
        # The norm the sites clip at this round (it moves only with adaptive clipping).
        self.clipping_norm = settings.clipping_norm
        self.update_noise = settings.noise_multiplier
        if settings.adaptive is not None:
            _, self.update_noise = compute_adaptive_noise_params(
                settings.noise_multiplier, settings.min_sites, settings.adaptive.count_stddev
            )
        config = PrivacyConfig(
            target_delta=settings.delta,
            population_size=settings.min_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        self.accountant = RdpAccountant(config)

    def release(
        self, averaged: ArrayRecord, *, clipped: list[bool] | None = None
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """The averaged model (the round's start plus the mean clipped update) plus noise,
        and the round's privacy record (:meth:`spent`, at the norm the sites clipped at).
        With adaptive clipping, ``clipped`` (one flag per averaged update) then moves the
        norm for the next round (``next_clipping_norm``)."""
        s = self.settings
        stdv = compute_stdv(self.update_noise, self.clipping_norm, s.min_sites)
        out = {}
        for key in averaged:
            values = averaged[key].numpy().astype(np.float32, copy=True)
            # Not seeded from the study's seed: noise anyone can regenerate protects nothing.
            add_gaussian_noise_inplace([values], stdv)
            out[key] = Array(values)
        self.compose(1)
        spent = self.spent()
        if s.adaptive is not None:
            if clipped is None:
                raise ValueError("adaptive clipping needs each averaged update's clipped flag")
            spent["next_clipping_norm"] = self.adapt(clipped)
        log(
            INFO,
            "fedseg DP: noise stdev %.3g added; epsilon %.3f at delta %g",
            stdv,
            spent["epsilon"],
            spent["delta"],
        )
        return ArrayRecord(out), spent

    def adapt(self, clipped: list[bool]) -> float:
        """Move the clipping norm towards the target quantile from a noised count of the
        unclipped updates; the new norm."""
        a = self.settings.adaptive
        assert a is not None and clipped
        unclipped = sum(not c for c in clipped) + float(np.random.normal(0.0, a.count_stddev))
        fraction = unclipped / len(clipped)
        self.clipping_norm *= math.exp(-a.learning_rate * (fraction - a.target_quantile))
        return self.clipping_norm

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Continue after the rounds recorded in ``history`` (each aggregated round's
        :meth:`spent`, in order): their releases are spent, the norm is where it went."""
        self.compose(len(history))
        if history and "next_clipping_norm" in history[-1]:
            self.clipping_norm = float(history[-1]["next_clipping_norm"])

    def compose(self, releases: int) -> None:
        """Account ``releases`` aggregated rounds."""
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
            "clipping_norm": self.clipping_norm,
            "clipping": "fixed" if s.adaptive is None else "adaptive",
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
    start = [sent[k].numpy() for k in sent]
    update = [trained[k].numpy() - s for k, s in zip(trained, start, strict=True)]
    clipped = adaptive_clip_inputs_inplace(update, float(norm))
    reply.content["arrays"] = ArrayRecord(
        {k: Array(s + u) for k, s, u in zip(trained, start, update, strict=True)}
    )
    metrics = reply.content.get("metrics")
    if config.get(KEY_REPORT_CLIPPED) and isinstance(metrics, MetricRecord):
        metrics[CLIPPED_METRIC] = int(clipped)
    return reply
