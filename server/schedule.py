"""The order a round's train tasks go out in: the longest expected training first.

Where sites share workers (a simulation runs more sites than it has workers), a long site
that queues behind a short one stretches the round by the short one's time. Tasks are
therefore sent longest first. A site's expected time is its last train-seconds; a site not
seen training yet is estimated from the size of its training split, which it reports when
asked (a `query` message, answered with that one count, the same `num-examples` every
train reply carries), times the seconds per example the sites seen so far took. Deployed
sites train in parallel, each on its own machine, where the order costs nothing.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.replies import numbers

log = logging.getLogger(__name__)
SIZE_QUERY_TIMEOUT = 60.0
"""Seconds a round waits for the sites' sizes at most; a site that has not answered by
then is treated as the longest (sent first), as before any size is known."""


@dataclass
class Durations:
    """What the coordinator knows of each site's training time, in numbers only."""

    seconds: dict[int, float] = field(default_factory=dict)
    """Train-seconds per node, from the last round it trained in."""
    examples: dict[int, int] = field(default_factory=dict)
    """Training examples per node, from its train replies or a size query."""

    def trained(self, node: int, metrics: Mapping[str, float]) -> None:
        """Note a site's train metrics (train-seconds, num-examples)."""
        if "train-seconds" in metrics:
            self.seconds[node] = float(metrics["train-seconds"])
        if "num-examples" in metrics:
            self.examples[node] = int(metrics["num-examples"])

    def unknown(self, nodes: Iterable[int]) -> list[int]:
        """The nodes with neither a training time nor a size."""
        return [n for n in nodes if n not in self.seconds and n not in self.examples]

    def expected(self, node: int) -> float:
        """Expected train-seconds (or, before any site has trained, examples); infinite
        when nothing is known, so that such a site goes first."""
        if node in self.seconds:
            return self.seconds[node]
        if node not in self.examples:
            return math.inf
        rates = [self.seconds[n] / self.examples[n] for n in self.seconds if self.examples.get(n)]
        return self.examples[node] * (statistics.median(rates) if rates else 1.0)


def longest_first(messages: list[Message], durations: Durations) -> list[Message]:
    """The tasks ordered by expected training time, longest (or unknown) first."""
    return sorted(messages, key=lambda m: -durations.expected(m.metadata.dst_node_id))


def ask_sizes(
    grid: Grid, nodes: list[int], server_round: int, timeout: float = SIZE_QUERY_TIMEOUT
) -> dict[int, int]:
    """Each node's training-split size, for the nodes that answer within `timeout`."""
    if not nodes:
        return {}
    config = ConfigRecord({"server-round": server_round})
    queries = [
        Message(
            RecordDict({"config": config}),
            dst_node_id=node,
            message_type="query",
            group_id=str(server_round),
        )
        for node in nodes
    ]
    sizes = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        size = (
            numbers(reply.content.get("metrics")).get("num-examples")
            if reply.has_content()
            else None
        )
        if size is not None:
            sizes[reply.metadata.src_node_id] = int(size)
    if len(sizes) < len(nodes):
        log.info("round %d: %d of %d sites told their size", server_round, len(sizes), len(nodes))
    return sizes
