"""The round loop: train, aggregate, evaluate, report; from round 1 or from a checkpoint.

Flower's `Strategy.start` always begins at round 1 and offers no hook that can resume, so
this loop drives the strategy's own `configure_*` and `aggregate_*` methods itself. Each
round: wait (with a limit) for enough sites, sample them (seeded per round), send the
global adapter, longest expected training first (server/schedule.py), aggregate the
replies, evaluate on the sites every N rounds, and hand a `RoundOutcome` to the caller,
which checkpoints it.

How the train replies are taken in and aggregated (streamed or held) is server/exchange.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

from common.adapter import WIRE_NUMPY, WireDtype
from common.compression import encode_global
from common.config import CompressionSettings, LoraSettings, SecureAggregationSettings
from common.wire import numpy_record
from server.audit import record_arrays
from server.checks import UpdateRules
from server.exchange import held_round, streamed_round, streams
from server.privacy import privacy_spent
from server.replies import (
    Metrics,
    example_weighted,
    in_node_order,
    numbers,
    payload_bytes,
    told_compute,
    told_name,
)
from server.schedule import Durations, ask_sizes, longest_first

log = logging.getLogger(__name__)

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
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    """How the adapter travels each way beyond `wire_dtype` (common/compression.py)."""
    size_query: bool = False
    """Ask sites not seen training yet for their size, to send the longest work first
    (server/schedule.py)."""

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
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per site (node id): its `train` and `evaluate` metrics, the `name` it goes by and the
    `compute` (device and precision) it trained in, when it told them (common/sitename.py)."""
    dropped: list[dict[str, object]] = field(default_factory=list)
    """Sites asked but not aggregated: node id and reason code."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Under DP: epsilon spent so far, at delta, and the number of releases."""
    asked: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per part of the round: waiting for sites, asking new sites their size,
    training (tasks out, replies in, checked and aggregated: a streamed round folds each
    reply as it arrives), federated and central evaluation."""

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
            "phase-seconds": {k: round(v, 3) for k, v in self.phases.items()},
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
    durations = Durations()
    for server_round in range(plan.first_round, plan.last_round + 1):
        started = time.monotonic()
        wait_for_sites(grid, plan.min_sites, plan.connect_timeout)
        lap = _Laps(started)
        random.seed(f"{plan.seed}-{server_round}")  # Flower samples sites with `random`
        outcome = RoundOutcome(round=server_round, arrays=arrays, train={})
        sent = on_the_wire(arrays, plan.compression)
        config = ConfigRecord(sealed(server_round, sent))
        try:
            messages = list(strategy.configure_train(server_round, arrays, config, grid))
            nodes = durations.unknown(m.metadata.dst_node_id for m in messages)
            if plan.size_query and nodes:
                lap(outcome, "wait")
                durations.examples.update(ask_sizes(grid, nodes, server_round))
                lap(outcome, "size-query")
            messages = longest_first(messages, durations)
            carrying(messages, sent)
        except PrivacyBudgetExhausted as e:
            log.warning("round %d would exceed privacy.max-epsilon: stopping (%s)", server_round, e)
            return Finished(arrays, server_round - 1, "privacy budget (privacy.max-epsilon)")
        outcome.asked = len(messages)
        lap(outcome, "wait")
        train = streamed_round if streams(strategy, plan) else held_round
        trained = train(grid, strategy, messages, arrays, plan, outcome)
        lap(outcome, "train")
        arrays = outcome.arrays = in_wire_dtype(trained.arrays, plan.wire_dtype)
        outcome.train = dict(trained.metrics)
        if trained.lost is not None:
            outcome.train["lora-energy-lost"] = trained.lost
        for reply in trained.passed:
            site = _site(outcome, reply)
            site["train"] = numbers(reply.content.get("metrics"))
            if name := told_name(reply):
                site["name"] = name
            if compute := told_compute(reply):
                site["compute"] = compute
            if plan.secure is None:  # under it each reply holds the aggregate, not an update
                site["train"]["update-norm"] = trained.norms[reply.metadata.src_node_id]
            durations.trained(reply.metadata.src_node_id, site["train"])
        outcome.privacy = privacy_spent(strategy)
        outcome.train["num-examples"] = sum(
            int(site["train"].get("num-examples", 0)) for site in outcome.sites.values()
        )
        if plan.evaluates(server_round):
            sent = on_the_wire(arrays, plan.compression)
            config = ConfigRecord({"split": "val", **sealed(server_round, sent)})
            outcome.evaluate = _evaluate(grid, strategy, config, arrays, sent, plan, outcome)
            lap(outcome, "evaluate")
        if central is not None:
            outcome.central = central(server_round, arrays)
            lap(outcome, "central-evaluate")
        outcome.seconds = time.monotonic() - started
        on_round(outcome)
    return Finished(arrays, plan.last_round)


class _Laps:
    """Records the seconds since the last lap under a phase name."""

    def __init__(self, started: float) -> None:
        self.last = started

    def __call__(self, outcome: RoundOutcome, phase: str) -> None:
        now = time.monotonic()
        outcome.phases[phase] = outcome.phases.get(phase, 0.0) + now - self.last
        self.last = now


def on_the_wire(arrays: ArrayRecord, compression: CompressionSettings) -> ArrayRecord:
    """The global adapter as the sites receive it (and as it is signed)."""
    if compression.down == "none":
        return arrays
    return numpy_record(encode_global(record_arrays(arrays), compression.down))


def carrying(messages: list[Message], sent: ArrayRecord) -> None:
    """Put the adapter as it travels into tasks the strategy built around the full-precision
    one (which the server optimisers keep as their reference)."""
    for message in messages:
        message.content["arrays"] = sent


def _evaluate(
    grid: Grid,
    strategy: FedAvg,
    config: ConfigRecord,
    arrays: ArrayRecord,
    sent: ArrayRecord,
    plan: RoundPlan,
    outcome: RoundOutcome,
) -> Metrics:
    server_round = outcome.round
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    carrying(messages, sent)
    outcome.bytes_down += sum(payload_bytes(m) for m in messages)
    replies = in_node_order(grid.send_and_receive(messages, timeout=plan.round_timeout))
    for reply in replies:
        if not reply.has_error():
            _site(outcome, reply)["evaluate"] = numbers(reply.content.get("metrics"))
    failed = len(messages) - sum(not r.has_error() for r in replies)
    if failed:
        log.warning(
            "round %d: %d of %d sites failed to evaluate", server_round, failed, len(messages)
        )
    return example_weighted([r for r in replies if not r.has_error()])


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


def in_wire_dtype(arrays: ArrayRecord, dtype: WireDtype) -> ArrayRecord:
    """The aggregate in the wire dtype. Server optimisers compute in float64; keeping the
    global adapter in the dtype the sites receive makes a checkpoint hold exactly what was
    sent, and a resumed run continue from exactly the same numbers."""
    target = WIRE_NUMPY[dtype]
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(arrays[k].numpy(), dtype=target)) for k in arrays}
    )


def _site(outcome: RoundOutcome, reply: Message) -> dict[str, Any]:
    return outcome.sites.setdefault(str(reply.metadata.src_node_id), {})
