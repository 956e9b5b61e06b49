"""The Flower ClientApp (`[tool.flwr.app.components] clientapp`): glue only.

Each handler unpacks the message into a `Task`, has it carried out, and packs a reply
holding the adapter and numeric metrics, nothing else; server/app.py drives it. A failure
leaves the site as an error reply with a code and the exception's type only: Flower would
otherwise send the exception's text, which may quote a record, and the coordinator would
store it. The work is
done by the site's warm worker when the node config names one (`worker-socket`, set by
`fedtune-site start`), otherwise in this process (simulation, or a site without a worker).
This module imports no torch, so a ClientApp process that forwards to the worker starts in
the time it takes to import Flower.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.ledger import LEDGER_KEY, record_reply
from client.task import Result, Task, failure_reason
from client.worker import WorkerError, WorkerUnavailable, ask
from common.config import DP_WEIGHT
from common.signing import adapter_digest, check_seal, load_verify_key

log = logging.getLogger(__name__)
app = ClientApp()
Handler = Callable[[Message, Context], Message]


def _guarded(handler: Handler) -> Handler:
    """Turn any failure into an error reply that carries no text from the site's data."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:
            error_type = e.error_type if isinstance(e, WorkerError) else type(e).__name__
            _log_failure(msg, context, e)
            error = Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=failure_reason(error_type)
            )
            return Message(error, reply_to=msg)

    return run


def _log_failure(msg: Message, context: Context, error: Exception) -> None:
    """The full text goes to the site's own log. A simulation's ClientApps log into the
    stream the researcher's `flwr run` shows beside the ServerApp's, so there only the
    type and the frames are logged."""
    what = f"{msg.metadata.message_type} task failed"
    if "partition-id" in context.node_config:
        frames = "".join(traceback.format_tb(error.__traceback__))
        log.error("%s: %s (message withheld in simulation)\n%s", what, type(error).__name__, frames)
    else:
        log.error(what, exc_info=error)


def _record_sent(msg: Message, context: Context, call_next: Handler) -> Message:
    """Outermost mod: describe the reply, exactly as it leaves (after any clipping), in the
    site's ledger (node config `sent-log`)."""
    reply = call_next(msg, context)
    ledger = context.node_config.get(LEDGER_KEY)
    if ledger and not reply.has_error():
        sent = reply.content.get("arrays")
        metrics = reply.content.get("metrics")
        record_reply(
            Path(str(ledger)),
            run_id=context.run_id,
            server_round=int(str(_config_record(msg).get("server-round", 0))),
            op=msg.metadata.message_type,
            received_sha256=adapter_digest(_arrays(msg)),
            arrays={k: sent[k].numpy() for k in sent} if isinstance(sent, ArrayRecord) else {},
            metrics=dict(metrics) if isinstance(metrics, MetricRecord) else {},
            reply_bytes=sum(r.count_bytes() for r in reply.content.values()),
        )
    return reply


def _clip_when_asked(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's `fixedclipping_mod` when the coordinator runs client-level DP (it then sends
    the clipping norm with the adapter): the update leaves clipped. Otherwise nothing."""
    if KEY_CLIPPING_NORM in _config_record(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[_record_sent, _clip_when_asked])
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the new adapter."""
    config = _config_record(msg)
    task = Task(
        "train",
        dict(context.run_config),
        _checked(msg, context),
        server_round=int(config.get("server-round", 1)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    result = _carry_out(task, context)
    # In the order received: the clipping mod pairs the two adapters key by key.
    arrays = {k: np.ascontiguousarray(result.arrays[k]) for k in task.arrays}
    record = ArrayRecord(array_dict={k: Array(a) for k, a in arrays.items()})
    metrics = {**result.metrics, "bytes-up": record.count_bytes()}
    if KEY_CLIPPING_NORM in config:
        metrics[DP_WEIGHT] = 1  # under DP the coordinator averages with equal weights
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[_record_sent])
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this site's validation (or test) split."""
    split = str(_config_record(msg).get("split", "val"))
    task = Task("evaluate", dict(context.run_config), _checked(msg, context), split=split)
    metrics = _carry_out(task, context).metrics
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _carry_out(task: Task, context: Context) -> Result:
    """By the warm worker when there is one, else here (the same code either way)."""
    worker = context.node_config.get("worker-socket")
    if worker:
        try:
            return ask(Path(str(worker)), task)
        except WorkerUnavailable:
            log.warning("no worker on %s; training in the ClientApp process instead", worker)
    from client.rounds import perform, site_data_path
    from common.config import load_config

    cfg = load_config(task.run_config)
    return perform(task, site_data_path(context.node_config, cfg))


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    record = msg.content["arrays"]
    assert isinstance(record, ArrayRecord)
    return {key: record[key].numpy() for key in record}


def _checked(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """The global adapter, once its signature verifies against the coordinator key this site
    was given (node config `coordinator-key`; `simulation.verify-key` for simulated sites).
    A site without a key takes the adapter unchecked."""
    arrays = _arrays(msg)
    simulated = "partition-id" in context.node_config
    key_path = context.node_config.get("coordinator-key") or (
        context.run_config.get("simulation.verify-key") if simulated else None
    )
    if key_path:
        config = _config_record(msg)
        server_round = int(str(config.get("server-round", 0)))
        check_seal(_verify_key(str(key_path)), context.run_id, server_round, arrays, dict(config))
    return arrays


@functools.cache
def _verify_key(path: str) -> Ed25519PublicKey:
    return load_verify_key(Path(path))


def _config_record(msg: Message) -> ConfigRecord:
    record = msg.content.get("config")
    return record if isinstance(record, ConfigRecord) else ConfigRecord()
