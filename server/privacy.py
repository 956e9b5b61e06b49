"""Client-level differential privacy at the coordinator: Flower's DP wrapper for client-side
fixed clipping around the FedAvg strategy, with its Renyi-DP accountant.

Each site clips its update to `privacy.clipping-norm` (Flower's `fixedclipping_mod`, on the
ClientApp's train handler); the wrapper averages the clipped updates with equal weights and
adds Gaussian noise of standard deviation noise-multiplier x clipping-norm / sites. Every
round is one Gaussian release on which each site had full influence; no amplification by
sampling is claimed. Before a round that would take epsilon past `privacy.max-epsilon`,
the wrapper raises `PrivacyBudgetExhausted` and the run ends there, with its adapter.

The update checks (server/checks.py) run before the wrapper sees any update.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.config import PrivacySettings

ACCOUNTANT_STATE = "privacy-accountant"
"""Key of the accountant's state in a checkpoint's state.json."""


def with_privacy(strategy: FedAvg, settings: PrivacySettings, sites: int) -> FedAvg:
    """`strategy` wrapped for client-level DP with `sites` updates a round; unchanged when
    DP is off. Under DP every round samples exactly `sites` sites, so the noise is
    calibrated to the number of updates averaged."""
    if not settings.enabled:
        return strategy
    # FedAvg samples max(int(connected x fraction), minimum): with a vanishing fraction it
    # samples exactly the minimum, which is `federation.min-sites`.
    strategy.fraction_train = 1e-12
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=settings.delta,
            population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=settings.max_epsilon or None,
        )
    )
    wrapped = DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clipping_norm,
        num_sampled_clients=sites,
        accountant=accountant,
    )
    return wrapped  # type: ignore[return-value]


def privacy_spent(strategy: object) -> dict[str, float]:
    """Epsilon spent so far at the configured delta, and releases; {} without DP."""
    spent = getattr(strategy, "privacy_spent", lambda: None)()
    if spent is None:
        return {}
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}


def accountant_state(strategy: object) -> dict[str, Any]:
    """The accountant's state for a checkpoint ({} without DP)."""
    accountant = getattr(strategy, "accountant", None)
    return {ACCOUNTANT_STATE: accountant.state_dict()} if accountant is not None else {}


def restore_accountant(strategy: object, state: dict[str, Any]) -> None:
    """Put a checkpoint's accountant state back, so a resumed run keeps counting."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and ACCOUNTANT_STATE in state:
        accountant.load_state_dict(state[ACCOUNTANT_STATE])
