"""Aggregation strategies: Flower's own, chosen by `federation.strategy`. The round loop
(server/federation.py) checks every update and the number left before it calls one."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.config import FederationSettings

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
MEAN_STRATEGIES: tuple[type[FedAvg], ...] = (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
"""Strategies whose aggregate is the example-weighted mean of the replies (the server
optimisers then step from it): the round loop streams their replies into a running mean
(server/intake.py). The robust ones need every update at once and hold them all."""
# Sized for LoRA adapters: each moves the adapter about as far per round as FedAvg does
# (measured by replaying one-epoch MiniLM deltas; see simulations/configs/fedadam.toml).
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.03, "fedyogi": 0.02, "fedadagrad": 0.015}


class RoundFailed(RuntimeError):
    """A round ended with fewer usable updates than `federation.min-sites`."""


def build_strategy(settings: FederationSettings, weighted_by_key: str = "num-examples") -> FedAvg:
    """The configured Flower strategy."""
    common: dict[str, float | int | str] = {
        "weighted_by_key": weighted_by_key,
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_train,
        "min_train_nodes": settings.min_sites,
        "min_evaluate_nodes": settings.min_sites,
        "min_available_nodes": settings.min_sites,
    }
    lr = settings.server_learning_rate or DEFAULT_SERVER_LR.get(settings.strategy, 1.0)
    extra: dict[str, float | int] = {}
    if settings.strategy == "fedprox":
        extra = {"proximal_mu": settings.proximal_mu}
    elif settings.strategy == "fedavgm":
        extra = {"server_learning_rate": lr, "server_momentum": settings.server_momentum}
    elif settings.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        extra = {"eta": lr}
    elif settings.strategy == "fedtrimmedavg":
        extra = {"beta": settings.trim_fraction}
    elif settings.strategy == "krum":
        extra = {"num_malicious_nodes": settings.byzantine_sites}
    elif settings.strategy == "multikrum":
        extra = {
            "num_malicious_nodes": settings.byzantine_sites,
            "num_nodes_to_select": settings.krum_select,
        }
    return STRATEGIES[settings.strategy](**common, **extra)  # type: ignore[arg-type]


def server_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """The server optimiser's state (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum),
    as named arrays for a checkpoint; empty for stateless strategies."""
    state: dict[str, np.ndarray] = {}
    for moment in ("m_t", "v_t"):
        for key, value in (getattr(strategy, moment, None) or {}).items():
            state[f"{moment}/{key}"] = np.asarray(value)
    momentum = getattr(strategy, "momentum_vector", None)
    current = getattr(strategy, "current_arrays", None)
    if momentum is not None and isinstance(current, ArrayRecord):
        # FedAvgM keeps its momentum as a list in the order of the adapter's keys
        for key, value in zip(current.keys(), momentum, strict=True):
            state[f"momentum/{key}"] = np.asarray(value)
    return state


def restore_server_state(
    strategy: FedAvg, state: Mapping[str, np.ndarray], keys: Sequence[str]
) -> None:
    """Put a checkpoint's server optimiser state back; `keys` is the adapter's key order."""
    for moment in ("m_t", "v_t"):
        prefix = f"{moment}/"
        values = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if values:
            setattr(strategy, moment, values)
    momentum = [state.get(f"momentum/{key}") for key in keys]
    if any(m is not None for m in momentum):
        if any(m is None for m in momentum):
            raise ValueError("checkpoint holds FedAvgM momentum for only some adapter tensors")
        strategy.momentum_vector = momentum  # type: ignore[attr-defined]
