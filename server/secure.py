"""Secure aggregation (SecAgg+): the coordinator learns the sites' weighted mean adapter and
nothing about any one site's adapter.

Flower 1.41 has SecAgg+ only as a workflow of its legacy API (`SecAggPlusWorkflow`): it
asks a legacy `Strategy` which sites take part and hands it the unmasked aggregate. This
module runs that workflow for one round of fedtune's round loop:

- a relay strategy names the sites the fedtune strategy sampled and keeps the result;
- the masked-vector stage carries fedtune's own train message to each site (the signed
  adapter and the round's config), where `client/app.py` answers it;
- a recording grid keeps every message of the four stages, for the bytes sent and for the
  sites that dropped out, with the usual reason codes.

The result is one stand-in reply per contributing site: that site's own metrics with the
aggregate as its arrays. The rest of the round (checks, the strategy's mean and server
optimiser, DP noise, signing, audit) then runs as without secure aggregation, and a mean
of identical stand-ins is the aggregate itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.config import SECURE_CLIPPING_RANGE, SECURE_MAX_WEIGHT, SecureAggregationSettings
from server.replies import dropped, payload_bytes
from server.strategy import RoundFailed

log = logging.getLogger(__name__)

MODULUS = 2**32
"""Masks and masked sums live in the integers modulo this (Flower's largest)."""


class SecureAggregationFailed(RoundFailed):
    """The round's sum could not be unmasked: too many sites dropped out."""


@dataclass
class SecureRound:
    """One round's training exchange under secure aggregation."""

    replies: list[Message] = field(default_factory=list)
    """A stand-in per contributing site: its metrics, with the aggregate as its arrays."""
    dropped: list[dict[str, object]] = field(default_factory=list)
    """Sites asked but not in the sum, with a reason code."""
    bytes_up: int = 0
    bytes_down: int = 0
    """Every byte of the protocol's four stages, both ways."""


def quantization_range(sites: int) -> int:
    """The widest integer range each site's values may be quantised to such that the sum of
    `sites` of them cannot wrap around the modulus. Flower rounds in int32, hence 2**30."""
    return min(2**30, (MODULUS - 1) // max(sites, 1))


def secure_train(
    grid: Grid,
    messages: list[Message],
    arrays: ArrayRecord,
    settings: SecureAggregationSettings,
    timeout: float,
) -> SecureRound:
    """Run SecAgg+ over the sites `messages` go to, each message being what that site
    would be sent without secure aggregation; `arrays` is the global adapter they carry."""
    outcome = SecureRound()
    if not messages:
        return outcome
    server_round = int(str(messages[0].content["config"]["server-round"]))
    for message in messages:
        message.content["config"][SECURE_CLIPPING_RANGE] = settings.clipping_range
        message.content["config"][SECURE_MAX_WEIGHT] = settings.max_weight
    wiretap = _RecordingGrid(grid)
    relay = _Relay([m.metadata.dst_node_id for m in messages], grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=relay,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the sites get `arrays`
    workflow = _Workflow(
        {m.metadata.dst_node_id: m.content for m in messages},
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=float(settings.max_weight),
        clipping_range=settings.clipping_range,
        quantization_range=quantization_range(len(messages)),
        modulus_range=MODULUS,
        timeout=timeout,
    )
    workflow(wiretap, context)
    outcome.bytes_down = sum(payload_bytes(m) for m in wiretap.sent)
    outcome.bytes_up = sum(payload_bytes(r) for r in wiretap.received)
    outcome.dropped = _first_reason_per_site(wiretap)
    if relay.aggregate is None:
        raise SecureAggregationFailed(
            f"round {server_round}: secure aggregation could not unmask the sum: "
            f"{len(outcome.dropped)} of {len(messages)} sites dropped out, leaving some site "
            "with fewer live share holders than secure-aggregation.reconstruction-threshold"
        )
    aggregate = _named_like(arrays, relay.aggregate)
    summed = set(relay.contributors)
    for reply in wiretap.masked_replies:
        node = reply.metadata.src_node_id
        if node in summed:
            reply.content = RecordDict(
                {"arrays": aggregate, "metrics": MetricRecord(relay.metrics[node])}  # type: ignore[arg-type]
            )
            outcome.replies.append(reply)
    accounted = summed | {d["node"] for d in outcome.dropped}
    outcome.dropped += [
        {"node": m.metadata.dst_node_id, "reason": "not-in-secure-sum"}
        for m in messages
        if m.metadata.dst_node_id not in accounted
    ]
    return outcome


def _named_like(arrays: ArrayRecord, values: list[np.ndarray]) -> ArrayRecord:
    """The protocol's arrays (float64, in the order sent) under the global adapter's names
    and dtypes."""
    return ArrayRecord(
        array_dict={
            key: Array(np.ascontiguousarray(value, dtype=arrays[key].numpy().dtype))
            for key, value in zip(arrays, values, strict=True)
        }
    )


def _first_reason_per_site(wiretap: _RecordingGrid) -> list[dict[str, object]]:
    """Each site that dropped out, at the first stage it failed or went silent."""
    seen: dict[object, dict[str, object]] = {}
    for sent, received in wiretap.stages:
        for entry in dropped(sent, received):
            seen.setdefault(entry["node"], entry)
    return list(seen.values())


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with fedtune's train message as each site's instruction
    in the masked-vector stage (in place of a legacy FitIns)."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.contents = contents

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        state.nid_to_fitins = {
            node: RecordDict(dict(self.contents[node])) for node in state.active_node_ids
        }
        return super().collect_masked_vectors_stage(grid, context, state)


class _Relay(Strategy):
    """A legacy strategy that samples exactly the given sites and keeps what the protocol
    unmasks: the aggregate, and each contributing site's metrics and weight."""

    def __init__(self, nodes: list[int], grid: Grid) -> None:
        self.proxies = [GridClientProxy(node, grid, run_id=0) for node in nodes]
        self.aggregate: list[np.ndarray] | None = None
        self.contributors: list[int] = []
        self.metrics: dict[int, dict[str, Scalar]] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, {})) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        for proxy, fit in results:
            node = int(proxy.cid)
            self.contributors.append(node)
            self.metrics[node] = {k: v for k, v in fit.metrics.items() if _number(v)}
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _RecordingGrid(Grid):
    """The grid, keeping each stage's messages and replies."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.stages: list[tuple[list[Message], list[Message]]] = []

    @property
    def sent(self) -> list[Message]:
        return [m for sent, _ in self.stages for m in sent]

    @property
    def received(self) -> list[Message]:
        return [r for _, received in self.stages for r in received]

    @property
    def masked_replies(self) -> list[Message]:
        """The replies of the masked-vector stage (the third), which carry the metrics."""
        return [r for r in self.stages[2][1] if not r.has_error()] if len(self.stages) > 2 else []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        received = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.stages.append((sent, received))
        return received

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def create_message(self, *args: object, **kwargs: object) -> Message:
        return self.grid.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run
