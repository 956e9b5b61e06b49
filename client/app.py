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

from client.task import Result, Task, failure_reason
from client.worker import WorkerError, WorkerUnavailable, ask
from common.signing import check_seal, load_verify_key

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
    task = Task(
        "train",
        dict(context.run_config),
        _checked_arrays(msg, context),
        server_round=int(config.get("server-round", 1)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    result = _carry_out(task, context)
    arrays = ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(a)) for k, a in result.arrays.items()}
    )
    metrics = {**result.metrics, "bytes-up": arrays.count_bytes()}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this site's validation (or test) split."""
    split = str(_config_record(msg).get("split", "val"))
    task = Task("evaluate", dict(context.run_config), _checked_arrays(msg, context), split=split)
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


def _checked_arrays(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """The global adapter, once its signature verifies against the coordinator key this site
    was given (node config `coordinator-key`; `simulation.verify-key` for simulated sites).
    A site without a key takes the adapter unchecked."""
    record = msg.content["arrays"]
    assert isinstance(record, ArrayRecord)
    arrays = {key: record[key].numpy() for key in record}
    simulated = "partition-id" in context.node_config
    key_path = context.node_config.get("coordinator-key") or (
        context.run_config.get("simulation.verify-key") if simulated else None
    )
    if key_path:
        config = _config_record(msg)
        server_round = int(str(config.get("server-round", 0)))
        key = _verify_key(str(key_path))
        check_seal(key, context.run_id, server_round, arrays, dict(config))
    return arrays


@functools.cache
def _verify_key(path: str) -> Ed25519PublicKey:
    return load_verify_key(Path(path))


def _config_record(msg: Message) -> ConfigRecord:
    record = msg.content.get("config")
    return record if isinstance(record, ConfigRecord) else ConfigRecord()
