"""The round loop: train, aggregate, evaluate, report; from round 1 or from a checkpoint.

Flower's `Strategy.start` always begins at round 1 and offers no hook that can resume, so
this loop drives the strategy's own `configure_*` and `aggregate_*` methods itself. Each
round: wait (with a limit) for enough sites, sample them (seeded per round), send the
global adapter, aggregate the replies, evaluate on the sites every N rounds, and hand a
`RoundOutcome` to the caller, which checkpoints it.

Mean strategies (server/strategy.MEAN_STRATEGIES) without DP or secure aggregation take
each reply as it arrives, check it and fold it into a running mean (server/intake.py):
O(one adapter) of replies in memory. The others hold every reply of the round and screen
them together (`_held_round`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

from common.adapter import WIRE_NUMPY, WireDtype
from common.config import LoraSettings, SecureAggregationSettings
from server.checks import UpdateRules, screen
from server.intake import take_train
from server.lora_mean import exact_lora_mean
from server.privacy import privacy_spent
from server.replies import dropped, in_node_order, payload_bytes
from server.secure import secure_train
from server.strategy import MEAN_STRATEGIES, RoundFailed

log = logging.getLogger(__name__)

Metrics = dict[str, int | float]
CentralEvaluation = Callable[[int, ArrayRecord], Metrics]
Seal = Callable[[int, ArrayRecord], dict[str, str | bytes]]
"""Config entries that let a site check an adapter came from the coordinator (signing)."""


class SitesMissing(RuntimeError):
    """Too few sites connected within the time limit."""


@dataclass(frozen=True)
class RoundPlan:
    """When and how long the rounds run."""

    first_round: int
    """1 for a new run; the checkpoint's round + 1 when resuming."""
    last_round: int
    min_sites: int
    round_timeout: float
    connect_timeout: float
    evaluate_every: int
    """Federated evaluation every N rounds and after the last; 0: never."""
    seed: int
    """Seeds the sampling of sites, per round, so a resumed run samples as the original."""
    rules: UpdateRules = field(default_factory=UpdateRules)
    """What every update is checked against before aggregation (server/checks.py)."""
    wire_dtype: WireDtype = "fp32"
    """The global adapter's dtype: what the sites receive and what a checkpoint holds."""
    secure: SecureAggregationSettings | None = None
    """Secure aggregation's settings when it is on (server/secure.py); None: off."""
    exact_lora: LoraSettings | None = None
    """The global LoRA shape when the sites' products are averaged (server/lora_mean.py);
    None: the strategy's mean of each factor."""

    def evaluates(self, server_round: int) -> bool:
        """Whether the sites evaluate the global adapter after this round."""
        every = self.evaluate_every
        return every > 0 and (server_round % every == 0 or server_round == self.last_round)


@dataclass
class RoundOutcome:
    """What one round did, in numbers only."""

    round: int
    arrays: ArrayRecord
    """The new global adapter."""
    train: Metrics
    """Example-weighted means of the sites' training metrics; num-examples is their sum."""
    evaluate: Metrics = field(default_factory=dict)
    """Example-weighted means of the sites' evaluation metrics ({} when not evaluated)."""
    central: Metrics = field(default_factory=dict)
    """Metrics on the coordinator's own evaluation file ({} when none is configured)."""
    sites: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    """Per site (node id): its `train` and `evaluate` metrics."""
    dropped: list[dict[str, object]] = field(default_factory=list)
    """Sites asked but not aggregated: node id and reason code."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Under DP: epsilon spent so far, at delta, and the number of releases."""
    asked: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0

    def row(self) -> dict[str, object]:
        """The round as one metrics.jsonl line."""
        return {
            "round": self.round,
            "round-seconds": round(self.seconds, 3),
            "sites-asked": self.asked,
            "sites-ok": self.asked - len(self.dropped),
            "dropped": self.dropped,
            "bytes-up": self.bytes_up,
            "bytes-down": self.bytes_down,
            "train": self.train,
            "evaluate": self.evaluate,
            "central": self.central,
            **({"privacy": self.privacy} if self.privacy else {}),
            "sites": self.sites,
        }


@dataclass(frozen=True)
class Finished:
    """How the rounds ended."""

    arrays: ArrayRecord
    """The final global adapter."""
    rounds: int
    """The last round completed."""
    stopped: str = ""
    """Why the run ended before `federation.rounds`, or "" when it did not."""


def run_rounds(
    grid: Grid,
    strategy: FedAvg,
    arrays: ArrayRecord,
    plan: RoundPlan,
    on_round: Callable[[RoundOutcome], None],
    central: CentralEvaluation | None = None,
    seal: Seal | None = None,
) -> Finished:
    """Run rounds `plan.first_round..plan.last_round`, or until the privacy budget would be
    exceeded; returns the final global adapter. With `seal`, every adapter sent carries its
    signature in the message's config."""
    sealed = seal or (lambda server_round, arrays: {})
    for server_round in range(plan.first_round, plan.last_round + 1):
        started = time.monotonic()
        wait_for_sites(grid, plan.min_sites, plan.connect_timeout)
        random.seed(f"{plan.seed}-{server_round}")  # Flower samples sites with `random`
        outcome = RoundOutcome(round=server_round, arrays=arrays, train={})
        config = ConfigRecord(sealed(server_round, arrays))
        try:
            messages = list(strategy.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as e:
            log.warning("round %d would exceed privacy.max-epsilon: stopping (%s)", server_round, e)
            return Finished(arrays, server_round - 1, "privacy budget (privacy.max-epsilon)")
        outcome.asked = len(messages)
        train = _streamed_round if streams(strategy, plan) else _held_round
        trained = train(grid, strategy, messages, arrays, plan, outcome)
        arrays = outcome.arrays = in_wire_dtype(trained.arrays, plan.wire_dtype)
        outcome.train = dict(trained.metrics)
        if trained.lost is not None:
            outcome.train["lora-energy-lost"] = trained.lost
        for reply in trained.passed:
            site = _site(outcome, reply)
            site["train"] = _numbers(reply.content.get("metrics"))
            if plan.secure is None:  # under it each reply holds the aggregate, not an update
                site["train"]["update-norm"] = trained.norms[reply.metadata.src_node_id]
        outcome.privacy = privacy_spent(strategy)
        outcome.train["num-examples"] = sum(
            int(site["train"].get("num-examples", 0)) for site in outcome.sites.values()
        )
        if plan.evaluates(server_round):
            config = ConfigRecord({"split": "val", **sealed(server_round, arrays)})
            outcome.evaluate = _evaluate(grid, strategy, config, arrays, plan, outcome)
        if central is not None:
            outcome.central = central(server_round, arrays)
        outcome.seconds = time.monotonic() - started
        on_round(outcome)
    return Finished(arrays, plan.last_round)


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


def _streamed_round(
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


def _held_round(
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
    return Trained(new_arrays, screened.passed, screened.norms, _numbers(metrics), lost)


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
    return arrived


def _evaluate(
    grid: Grid,
    strategy: FedAvg,
    config: ConfigRecord,
    arrays: ArrayRecord,
    plan: RoundPlan,
    outcome: RoundOutcome,
) -> Metrics:
    server_round = outcome.round
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    outcome.bytes_down += sum(payload_bytes(m) for m in messages)
    replies = in_node_order(grid.send_and_receive(messages, timeout=plan.round_timeout))
    for reply in replies:
        if not reply.has_error():
            _site(outcome, reply)["evaluate"] = _numbers(reply.content.get("metrics"))
    failed = len(messages) - sum(not r.has_error() for r in replies)
    if failed:
        log.warning(
            "round %d: %d of %d sites failed to evaluate", server_round, failed, len(messages)
        )
    return example_weighted([r for r in replies if not r.has_error()])


def example_weighted(replies: list[Message]) -> Metrics:
    """Each metric's mean over the sites, weighted by their num-examples (the sum for
    num-examples itself). The coordinator's own arithmetic, whatever the strategy: robust
    and DP strategies change how adapters are combined, not how a score is averaged."""
    rows = [_numbers(r.content.get("metrics")) for r in replies]
    rows = [row for row in rows if row.get("num-examples", 0) > 0]
    total = sum(row["num-examples"] for row in rows)
    if not total:
        return {}
    means: Metrics = {"num-examples": total}
    for key in sorted({k for row in rows for k in row} - {"num-examples"}):
        weighted = [(row[key], row["num-examples"]) for row in rows if key in row]
        weight = sum(n for _, n in weighted)
        means[key] = sum(value * n for value, n in weighted) / weight
    return means


def wait_for_sites(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> int:
    """Block until `needed` sites are connected, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() >= deadline:
            raise SitesMissing(
                f"only {connected} of the {needed} sites needed (federation.min-sites) "
                f"connected within {timeout:.0f} s (federation.connect-timeout); check that "
                "the sites' SuperNodes are running and can reach the SuperLink"
            )
        time.sleep(poll)


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


def in_wire_dtype(arrays: ArrayRecord, dtype: WireDtype) -> ArrayRecord:
    """The aggregate in the wire dtype. Server optimisers compute in float64; keeping the
    global adapter in the dtype the sites receive makes a checkpoint hold exactly what was
    sent, and a resumed run continue from exactly the same numbers."""
    target = WIRE_NUMPY[dtype]
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(arrays[k].numpy(), dtype=target)) for k in arrays}
    )


def _site(outcome: RoundOutcome, reply: Message) -> dict[str, Metrics]:
    return outcome.sites.setdefault(str(reply.metadata.src_node_id), {})


def _numbers(record: object) -> Metrics:
    if not isinstance(record, MetricRecord):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, int | float)}
