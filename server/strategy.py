"""Aggregation strategies: Flower's own, chosen by `federation.strategy`, guarded so that a
round with too few updates fails the run loudly instead of carrying on unchanged."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from common.config import FederationSettings

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
}
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.1}


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
    extra: dict[str, float] = {}
    if settings.strategy == "fedprox":
        extra = {"proximal_mu": settings.proximal_mu}
    elif settings.strategy == "fedavgm":
        extra = {"server_learning_rate": lr, "server_momentum": settings.server_momentum}
    elif settings.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        extra = {"eta": lr}
    strategy = guarded(**common, **extra)
    strategy.min_updates = settings.min_sites
    return strategy


class _MinimumUpdates:
    """Mixin: refuse to aggregate a round whose successful updates are too few."""

    min_updates: int = 1
    last_train: dict[str, float] = {}  # noqa: RUF012 - replaced per instance each round
    last_evaluate: dict[str, float] = {}  # noqa: RUF012

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
        self.last_train = {
            "sites": len(good),
            "asked": len(replies),
            **(dict(metrics) if metrics else {}),
        }
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self.last_evaluate = dict(metrics) if metrics else {}
        return metrics
