"""A round's training exchange: send the train tasks, take the replies, check them and
aggregate them into the new global adapter.

Mean strategies (server/strategy.MEAN_STRATEGIES) without DP or secure aggregation take each
reply as it arrives, check it and fold it into a running mean (server/intake.py): O(one
adapter) of replies in memory. The others hold every reply of the round and screen them
together (`held_round`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.audit import record_arrays
from server.checks import screen
from server.intake import take_train
from server.lora_mean import exact_lora_mean
from server.replies import (
    Metrics,
    decoded,
    dropped,
    example_weighted,
    in_node_order,
    numbers,
    payload_bytes,
)
from server.secure import secure_train
from server.strategy import MEAN_STRATEGIES, RoundFailed

if TYPE_CHECKING:
    from server.federation import RoundOutcome, RoundPlan


@dataclass(frozen=True)
class Trained:
    """A round's training, however its replies were aggregated."""

    arrays: ArrayRecord
    """The new global adapter, before the cast to the wire dtype."""
    passed: list[Message]
    """The replies aggregated, in node order (with their metrics only when streamed)."""
    norms: dict[int, float]
    """Update norm per node aggregated."""
    metrics: Metrics
    lost: float | None = None
    """Exact LoRA aggregation: the share of the mean products' energy the rank dropped."""


def streams(strategy: FedAvg, plan: RoundPlan) -> bool:
    """Whether the round streams its replies into a running mean (server/intake.py): for a
    strategy whose aggregate is their weighted mean, without DP (Flower's wrapper is not one
    of them) and secure aggregation, which need the replies as they are."""
    return type(strategy) in MEAN_STRATEGIES and plan.secure is None


def streamed_round(
    grid: Grid,
    strategy: FedAvg,
    messages: list[Message],
    arrays: ArrayRecord,
    plan: RoundPlan,
    outcome: RoundOutcome,
) -> Trained:
    """Fold each reply as it arrives, then hand the strategy one stand-in reply holding the
    mean (weight: the total examples), so its own step (FedAvgM, FedAdam...) runs on it."""
    received = take_train(
        grid,
        messages,
        arrays,
        plan.rules,
        plan.round_timeout,
        plan.exact_lora,
        strategy.weighted_by_key,
        plan.compression.up,
    )
    outcome.dropped = received.dropped
    outcome.bytes_down, outcome.bytes_up = received.bytes_down, received.bytes_up
    if len(received.passed) < plan.min_sites:
        raise RoundFailed(_too_few(outcome.round, received.passed, outcome, plan.min_sites))
    stand_in, mean = received.stand_in()
    new_arrays, _ = strategy.aggregate_train(outcome.round, [stand_in])
    if new_arrays is None:
        raise RoundFailed(f"round {outcome.round}: the strategy produced no adapter")
    metrics = example_weighted(received.passed)
    return Trained(new_arrays, received.passed, received.norms, metrics, mean.energy_lost)


def held_round(
    grid: Grid,
    strategy: FedAvg,
    messages: list[Message],
    arrays: ArrayRecord,
    plan: RoundPlan,
    outcome: RoundOutcome,
) -> Trained:
    """Collect every reply, screen them together, and let the strategy aggregate them: the
    path of robust strategies (a median, trimmed coordinates and Krum's distances need
    every update), DP (Flower's wrapper clips and counts the individual replies) and secure
    aggregation (masked shares). The coordinator holds O(sites) replies."""
    server_round = outcome.round
    arrived = _exchange(grid, messages, arrays, plan, outcome)
    screened = screen(arrived, arrays, plan.rules)
    outcome.dropped += screened.dropped
    if len(screened.passed) < plan.min_sites:
        raise RoundFailed(_too_few(server_round, screened.passed, outcome, plan.min_sites))
    new_arrays, metrics = strategy.aggregate_train(server_round, screened.passed)
    if new_arrays is None:  # Flower's DP wrapper refuses a round with a missing site
        raise RoundFailed(
            f"round {server_round}: the strategy produced no adapter from "
            f"{len(screened.passed)} updates of {outcome.asked} sites asked; under "
            "privacy.noise-multiplier every sampled site must send a usable update"
        )
    lost = None
    if plan.exact_lora is not None:
        lora, weight_key = plan.exact_lora, strategy.weighted_by_key
        new_arrays, lost = exact_lora_mean(
            new_arrays, screened.passed, weight_key, lora.rank, lora.alpha
        )
    return Trained(new_arrays, screened.passed, screened.norms, numbers(metrics), lost)


def _exchange(
    grid: Grid, messages: list[Message], arrays: ArrayRecord, plan: RoundPlan, outcome: RoundOutcome
) -> list[Message]:
    """Send the train tasks and collect the usable replies, noting drops and bytes. Under
    secure aggregation the replies are stand-ins that each carry the unmasked aggregate."""
    if plan.secure is not None:
        exchange = secure_train(grid, messages, arrays, plan.secure, plan.round_timeout)
        outcome.dropped = exchange.dropped
        outcome.bytes_down, outcome.bytes_up = exchange.bytes_down, exchange.bytes_up
        return in_node_order(exchange.replies)
    outcome.bytes_down = sum(payload_bytes(m) for m in messages)
    replies = in_node_order(grid.send_and_receive(messages, timeout=plan.round_timeout))
    outcome.dropped = dropped(messages, replies)
    arrived = [r for r in replies if not r.has_error()]
    outcome.bytes_up = sum(payload_bytes(r) for r in arrived)
    if plan.compression.up != "none":
        base = record_arrays(arrays)
        arrived = [decoded(reply, base, plan.compression.up) for reply in arrived]
    return arrived


def _too_few(server_round: int, passed: list[Message], outcome: RoundOutcome, needed: int) -> str:
    reasons: dict[str, int] = {}
    for entry in outcome.dropped:
        reasons[str(entry["reason"])] = reasons.get(str(entry["reason"]), 0) + 1
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none dropped"
    return (
        f"round {server_round}: {len(passed)} usable updates of {outcome.asked} sites asked "
        f"({why}), fewer than federation.min-sites = {needed}; the run stops here rather "
        "than continue with an unchanged model"
    )
