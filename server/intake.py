"""The training replies taken in as they arrive: each is checked, clipped, folded into the
round's running mean (server/running_mean.py) and let go, keeping only its metrics and
update norm. The coordinator holds O(one adapter) of replies, whatever the number of sites.

This is the round loop's path for strategies whose aggregate is the example-weighted mean
of the replies (server/strategy.MEAN_STRATEGIES): the strategy is then handed one stand-in
reply holding the mean, weighted by the total examples, and its own `aggregate_train`
(FedAvgM's momentum, FedAdam's moments) runs unchanged on it. Robust strategies need every
update at once (a median, trimmed coordinates, Krum's distances), Flower's DP wrapper clips
and counts the individual replies, and secure aggregation's replies are masked shares:
those keep the hold-all path in server/exchange.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.compression import Up
from common.config import LoraSettings
from common.sitename import SITE_KEY
from server.checks import NORM_ABOVE_MEDIAN, NormRatio, UpdateRules, check, clip_to, reference_of
from server.replies import decoded, dropped, in_node_order, payload_bytes
from server.running_mean import Aggregate, RunningMean, RunningProductMean

log = logging.getLogger(__name__)

PULL_CHUNK = 8
"""Message ids asked for per pull: a pull brings every reply that is in for its ids, so
this bounds how many adapters are in memory at once when many sites finish together."""
POLL_SECONDS = 1.0
"""Wait between sweeps that brought nothing new (Flower's own loop waits 3 s)."""


@dataclass
class Intake:
    """One round's training replies, taken in one at a time."""

    reference: dict[str, np.ndarray]
    """The global adapter sent this round, what every update is checked against."""
    rules: UpdateRules
    weighted_by_key: str
    mean: RunningMean
    up: Up = "none"
    """How the sites send their updates (compression.up): decoded before any check."""
    ratio: NormRatio[Message] = field(init=False)
    answers: list[Message] = field(default_factory=list)
    """Every reply, its arrays let go: error replies as they came, the others with their
    metrics only (server/replies.dropped reads who answered, the report their metrics)."""
    kept: list[Message] = field(default_factory=list)
    """The folded replies, metrics only."""
    norms: dict[int, float] = field(default_factory=dict)
    """Update norm per node folded."""
    refused: list[tuple[int, str]] = field(default_factory=list)
    """Replies that failed a check: node and reason code."""
    bytes_up: int = 0

    def __post_init__(self) -> None:
        self.ratio = NormRatio(self.rules.max_norm_ratio)

    def take(self, reply: Message) -> None:
        """One reply as it arrives: its bytes, its own checks, then the median-ratio rule,
        which may hold it until it has enough norms to judge by."""
        self.answers.append(reply if reply.has_error() else _metrics_only(reply))
        if reply.has_error():
            return
        self.bytes_up += payload_bytes(reply)
        if self.up != "none":
            reply = decoded(reply, self.reference, self.up)
        reason, norm = check(reply, self.reference, self.rules)
        if reason is not None:
            self._refuse(reply, reason)
            return
        for judged, judged_norm, keep in self.ratio.judge(reply, norm):
            self._settle(judged, judged_norm, keep)

    def finish(self) -> None:
        """Settle what the median-ratio rule still holds at the end of the round."""
        for judged, judged_norm, keep in self.ratio.release():
            self._settle(judged, judged_norm, keep)

    def _settle(self, reply: Message, norm: float, keep: bool) -> None:
        if not keep:
            self._refuse(reply, NORM_ABOVE_MEDIAN)
            return
        clip_to(reply, self.reference, norm, self.rules)
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)  # checked
        self.mean.fold(
            {key: arrays[key].numpy() for key in arrays}, int(metrics[self.weighted_by_key])
        )
        self.kept.append(_metrics_only(reply))
        self.norms[reply.metadata.src_node_id] = norm

    def _refuse(self, reply: Message, reason: str) -> None:
        node = reply.metadata.src_node_id
        log.warning("update from node %s dropped: %s", node, reason)
        self.refused.append((node, reason))


@dataclass(frozen=True)
class Received:
    """What a round's streamed training exchange left: metrics, norms and one mean."""

    passed: list[Message]
    """The folded replies in node order, with their metrics only."""
    norms: dict[int, float]
    dropped: list[dict[str, object]]
    """Sites asked but not folded (no reply, an error, a failed check), with reason codes."""
    bytes_down: int
    bytes_up: int
    mean: RunningMean
    weighted_by_key: str

    def stand_in(self) -> tuple[Message, Aggregate]:
        """One reply holding the mean of the folded ones, weighted by their total weight,
        for the strategy to aggregate as if it were the only site; and the mean itself."""
        aggregate = self.mean.result()
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in aggregate.arrays.items()})
        metrics = MetricRecord({self.weighted_by_key: aggregate.weight})
        content = RecordDict({"arrays": arrays, "metrics": metrics})
        return Message(content=content, metadata=self.passed[0].metadata), aggregate


def take_train(
    grid: Grid,
    messages: list[Message],
    global_arrays: ArrayRecord,
    rules: UpdateRules,
    timeout: float,
    exact_lora: LoraSettings | None = None,
    weighted_by_key: str = "num-examples",
    up: Up = "none",
) -> Received:
    """Send the train tasks and take the replies as they arrive, until all are in or
    `timeout` seconds have passed (as Flower's `Grid.send_and_receive` waits)."""
    if exact_lora is None:
        mean = RunningMean()
    else:
        mean = RunningProductMean(exact_lora.rank, exact_lora.alpha)
    intake = Intake(reference_of(global_arrays), rules, weighted_by_key, mean, up)
    bytes_down = sum(payload_bytes(m) for m in messages)
    for reply in _arrivals(grid, messages, timeout):
        intake.take(reply)
    intake.finish()
    refused = [{"node": node, "reason": reason} for node, reason in sorted(intake.refused)]
    return Received(
        passed=in_node_order(intake.kept),
        norms=intake.norms,
        dropped=dropped(messages, in_node_order(intake.answers)) + refused,
        bytes_down=bytes_down,
        bytes_up=intake.bytes_up,
        mean=mean,
        weighted_by_key=weighted_by_key,
    )


def _arrivals(grid: Grid, messages: list[Message], timeout: float) -> Iterator[Message]:
    """Push the messages, then yield each reply as a pull brings it in."""
    pending = dict.fromkeys(i for i in grid.push_messages(messages) if i)  # None: not pushed
    deadline = time.monotonic() + timeout
    while pending:
        ids, arrived = list(pending), 0
        for start in range(0, len(ids), PULL_CHUNK):
            for reply in grid.pull_messages(ids[start : start + PULL_CHUNK]):
                arrived += 1
                pending.pop(reply.metadata.reply_to_message_id, None)
                yield reply
        if not pending or time.monotonic() >= deadline:
            return
        if not arrived:
            time.sleep(POLL_SECONDS)


def _metrics_only(reply: Message) -> Message:
    """The reply without its arrays: who sent it, its metrics and the name it goes by, for
    the round's report."""
    kept = RecordDict()
    if reply.has_content():
        if isinstance(metrics := reply.content.get("metrics"), MetricRecord):
            kept["metrics"] = metrics
        if isinstance(site := reply.content.get(SITE_KEY), ConfigRecord):
            kept[SITE_KEY] = site
    return Message(content=kept, metadata=reply.metadata)
