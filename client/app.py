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
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.ledger import LEDGER_KEY, record_reply
from client.secure import masking_mod
from client.split import train_size
from client.task import Result, Task, failure_reason, site_data_path, site_rank
from client.worker import WorkerError, WorkerUnavailable, ask
from common.compression import decode_global, encode_update
from common.config import (
    DP_WEIGHT,
    FROZEN_SHA256,
    CompressionSettings,
    load_config,
)
from common.payload import content_bytes
from common.signing import adapter_digest, check_seal, load_verify_key
from common.sitename import SITE_KEY, site_name

log = logging.getLogger(__name__)
app = ClientApp()
_FIT_METRICS = "fitres.metrics"
"""Where the legacy FitRes layout (secure aggregation) keeps the metrics."""
RESIDUAL = "compression-residual"
"""Where the site's context keeps what compression left out of its last update."""
Handler = Callable[[Message, Context], Message]


def _guarded(handler: Handler) -> Handler:
    """Turn any failure into an error reply that carries no text from the site's data."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:
            return _error_reply(msg, context, e)

    return run


def _error_reply(msg: Message, context: Context, error: Exception) -> Message:
    """The reply for a failed task: a code and the exception's type; the text is logged."""
    error_type = error.error_type if isinstance(error, WorkerError) else type(error).__name__
    _log_failure(msg, context, error)
    reason = failure_reason(error_type)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


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
    """Outermost mod: describe the reply, exactly as it leaves (after any clipping or
    masking), in the site's ledger (node config `sent-log`)."""
    stage = str(_secure_config(msg).get(Key.STAGE, ""))  # the protocol's mod removes it
    received = adapter_digest(_arrays(msg)) if "arrays" in msg.content else ""
    reply = call_next(msg, context)
    ledger = context.node_config.get(LEDGER_KEY)
    if ledger and not reply.has_error():
        sent = reply.content.get("arrays")
        metrics = reply.content.get("metrics") or reply.content.get(_FIT_METRICS)
        record_reply(
            Path(str(ledger)),
            run_id=context.run_id,
            server_round=_round(msg),
            op=msg.metadata.message_type,
            received_sha256=received,
            arrays={k: sent[k].numpy() for k in sent} if isinstance(sent, ArrayRecord) else {},
            metrics=_numbers(metrics),
            reply_bytes=content_bytes(reply.content),
            secure_stage=stage,
        )
    return reply


_mask_when_asked = masking_mod(_error_reply)


def _clip_when_asked(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's `fixedclipping_mod` when the coordinator runs client-level DP (it then sends
    the clipping norm with the adapter): the update leaves clipped. Otherwise nothing."""
    if KEY_CLIPPING_NORM in _config_record(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[_record_sent, _mask_when_asked, _clip_when_asked])
@_guarded
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the new adapter
    (or, under compression.up, its compressed delta)."""
    config = _config_record(msg)
    compression = _compression(context)
    received = decode_global(_checked(msg, context), compression.down)
    task = Task(
        "train",
        dict(context.run_config),
        received,
        server_round=int(config.get("server-round", 1)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        frozen_sha256=str(config.get(FROZEN_SHA256, "")),
        lora_rank=site_rank(dict(context.node_config), dict(context.run_config)),
    )
    result = _carry_out(task, context)
    # In the order received: the clipping mod pairs the two adapters key by key.
    arrays = {k: np.ascontiguousarray(result.arrays[k]) for k in task.arrays}
    if compression.up != "none":
        arrays, left = encode_update(
            arrays, received, _residual(context), compression.up, compression.topk_fraction
        )
        context.state[RESIDUAL] = ArrayRecord(array_dict={k: Array(a) for k, a in left.items()})
    record = ArrayRecord(array_dict={k: Array(a) for k, a in arrays.items()})
    metrics = {**result.metrics, "bytes-up": record.count_bytes()}
    if KEY_CLIPPING_NORM in config:
        metrics[DP_WEIGHT] = 1  # under DP the coordinator averages with equal weights
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    told = dict(result.compute)
    if name := site_name(context.node_config, context.run_config):
        told["name"] = name
    if told:
        content[SITE_KEY] = ConfigRecord(told)
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[_record_sent])
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global adapter on this site's validation (or test) split."""
    config = _config_record(msg)
    task = Task(
        "evaluate",
        dict(context.run_config),
        decode_global(_checked(msg, context), _compression(context).down),
        split=str(config.get("split", "val")),
        frozen_sha256=str(config.get(FROZEN_SHA256, "")),
        lora_rank=site_rank(dict(context.node_config), dict(context.run_config)),
    )
    metrics = _carry_out(task, context).metrics
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query(mods=[_record_sent])
@_guarded
def query(msg: Message, context: Context) -> Message:
    """Tell the size of this site's training split, a count only, so that the coordinator
    can send the longest training first (server/schedule.py)."""
    cfg = load_config(context.run_config)
    size = train_size(site_data_path(context.node_config, cfg), cfg)  # counted here: no torch
    return Message(
        content=RecordDict({"metrics": MetricRecord({"num-examples": size})}), reply_to=msg
    )


def _carry_out(task: Task, context: Context) -> Result:
    """By the warm worker when there is one, else here (the same code either way)."""
    worker = context.node_config.get("worker-socket")
    if worker:
        try:
            return ask(Path(str(worker)), task)
        except WorkerUnavailable:
            log.warning("no worker on %s; training in the ClientApp process instead", worker)
    from client.rounds import perform

    cfg = load_config(task.run_config)
    return perform(task, site_data_path(context.node_config, cfg))


def _compression(context: Context) -> CompressionSettings:
    return load_config(context.run_config).compression


def _residual(context: Context) -> dict[str, np.ndarray]:
    """What compression left out of this site's last update (error feedback); {} at first."""
    record = context.state.get(RESIDUAL)
    return {k: record[k].numpy() for k in record} if isinstance(record, ArrayRecord) else {}


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


def _secure_config(msg: Message) -> ConfigRecord:
    record = msg.content.get(RECORD_KEY_CONFIGS)
    return record if isinstance(record, ConfigRecord) else ConfigRecord()


def _round(msg: Message) -> int:
    """The round a task belongs to: its config says, or (secure-aggregation key stages,
    which carry no config) its group id."""
    value = _config_record(msg).get("server-round", msg.metadata.group_id)
    return int(str(value)) if str(value).isdigit() else 0


def _numbers(record: object) -> dict[str, int | float]:
    """A metrics record's numbers (a MetricRecord, or the FitRes layout's ConfigRecord)."""
    if not isinstance(record, MetricRecord | ConfigRecord):
        return {}
    return {
        k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
