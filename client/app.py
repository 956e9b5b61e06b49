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
from flwr.common.constant import ErrorCode

from client.ledger import LEDGER_KEY, record_reply
from client.task import Result, Task, failure_reason
from client.worker import WorkerError, WorkerUnavailable, ask
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


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the new adapter."""
    config = _config_record(msg)
    arrays, received = _received(msg, context)
    task = Task(
        "train",
        dict(context.run_config),
        arrays,
        server_round=int(config.get("server-round", 1)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    result = _carry_out(task, context)
    return _reply(msg, context, received, result.metrics, result.arrays)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this site's validation (or test) split."""
    split = str(_config_record(msg).get("split", "val"))
    arrays, received = _received(msg, context)
    task = Task("evaluate", dict(context.run_config), arrays, split=split)
    return _reply(msg, context, received, _carry_out(task, context).metrics, {})


def _reply(
    msg: Message,
    context: Context,
    received: str,
    metrics: dict[str, int | float],
    arrays: dict[str, np.ndarray],
) -> Message:
    """The reply: the adapter (after training) and numeric metrics, nothing else. It is
    described in the site's ledger (node config `sent-log`) before it leaves."""
    content = RecordDict()
    if arrays:
        record = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()}
        )
        content["arrays"] = record
        metrics = {**metrics, "bytes-up": record.count_bytes()}
    content["metrics"] = MetricRecord(metrics)
    if ledger := context.node_config.get(LEDGER_KEY):
        record_reply(
            Path(str(ledger)),
            run_id=context.run_id,
            server_round=int(str(_config_record(msg).get("server-round", 0))),
            op=msg.metadata.message_type,
            received_sha256=received,
            arrays=arrays,
            metrics=metrics,
            reply_bytes=sum(r.count_bytes() for r in content.values()),
        )
    return Message(content=content, reply_to=msg)


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


def _received(msg: Message, context: Context) -> tuple[dict[str, np.ndarray], str]:
    """The global adapter and its sha256, once its signature verifies against the coordinator
    key this site was given (node config `coordinator-key`; `simulation.verify-key` for
    simulated sites). A site without a key takes the adapter unchecked."""
    record = msg.content["arrays"]
    assert isinstance(record, ArrayRecord)
    arrays = {key: record[key].numpy() for key in record}
    simulated = "partition-id" in context.node_config
    key_path = context.node_config.get("coordinator-key") or (
        context.run_config.get("simulation.verify-key") if simulated else None
    )
    if not key_path:
        return arrays, adapter_digest(arrays)
    config = _config_record(msg)
    server_round = int(str(config.get("server-round", 0)))
    key = _verify_key(str(key_path))
    return arrays, check_seal(key, context.run_id, server_round, arrays, dict(config))


@functools.cache
def _verify_key(path: str) -> Ed25519PublicKey:
    return load_verify_key(Path(path))


def _config_record(msg: Message) -> ConfigRecord:
    record = msg.content.get("config")
    return record if isinstance(record, ConfigRecord) else ConfigRecord()
