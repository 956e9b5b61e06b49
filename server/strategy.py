"""Aggregation strategies: Flower's own, chosen by `federation.strategy`, guarded so that a
round with too few updates fails the run loudly instead of carrying on unchanged."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
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

from common.adapter import WireDtype
from common.config import FederationSettings
from common.wire import from_record, to_record

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
# Sized for LoRA adapters: each moves the adapter about as far per round as FedAvg does
# (measured by replaying one-epoch MiniLM deltas; see simulations/configs/fedadam.toml).
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.03, "fedyogi": 0.02, "fedadagrad": 0.015}


class RoundFailed(RuntimeError):
    """A round ended with fewer successful updates than `federation.min-sites`."""


def build_strategy(settings: FederationSettings) -> FedAvg:
    """The configured Flower strategy, wrapped with the minimum-updates guard."""
    base = STRATEGIES[settings.strategy]
    guarded = type(f"Guarded{base.__name__}", (_MinimumUpdates, base), {})
    common = {
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
    strategy = guarded(**common, **extra)
    strategy.min_updates = settings.min_sites
    strategy.wire_dtype = settings.wire_dtype
    return strategy


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


class _MinimumUpdates:
    """Mixin: refuse to aggregate a round whose successful updates are too few."""

    min_updates: int = 1
    wire_dtype: WireDtype = "fp32"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [r for r in replies if r.has_content() and not r.has_error()]
        failed = len(replies) - len(good)
        if failed:
            log.warning(
                "round %d: %d of %d sites failed to reply", server_round, failed, len(replies)
            )
        if len(good) < self.min_updates:
            raise RoundFailed(
                f"round {server_round}: {len(good)} successful updates of {len(replies)} "
                f"sites asked, fewer than federation.min-sites = {self.min_updates}; the run "
                "stops here rather than continue with an unchanged model"
            )
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if arrays is None:
            return None, metrics
        # Server optimisers compute in float64: the global adapter is kept in the wire dtype,
        # so that it is what the sites receive and what a checkpoint holds, bit for bit, and a
        # resumed run continues from exactly the same numbers.
        return to_record(from_record(arrays), self.wire_dtype), metrics
