"""Secure aggregation at the site: Flower's `secaggplus_mod`, for the train messages that
carry a SecAgg+ stage (the coordinator turned `secure-aggregation` on). The train handler
still sees a plain task and replies as usual; its reply is turned into the legacy FitRes
layout the mod masks, after checking that the protocol can sum it exactly. A failure at any
stage leaves as the site's usual error reply (a code and the exception type)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from common.config import DP_WEIGHT, SECURE_CLIPPING_RANGE, SECURE_MAX_WEIGHT

Handler = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Handler], Message]
ErrorReply = Callable[[Message, Context, Exception], Message]


class SecureBoundsError(ValueError):
    """An adapter value or a weight outside what secure aggregation can sum exactly."""


def masking_mod(error_reply: ErrorReply) -> Mod:
    """The mod; `error_reply` makes the reply for a failure at any protocol stage."""

    def mask_when_asked(msg: Message, context: Context, call_next: Handler) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        try:
            return secaggplus_mod(msg, context, _as_fit_result(call_next))
        except _HandlerFailed as failed:
            return failed.reply
        except Exception as e:
            return error_reply(msg, context, e)

    return mask_when_asked


class _HandlerFailed(Exception):
    """The handler's error reply, carried out through the SecAgg+ mod unchanged."""

    def __init__(self, reply: Message) -> None:
        super().__init__("the train handler replied with an error")
        self.reply = reply


def _as_fit_result(call_next: Handler) -> Handler:
    """The train handler, replying in the legacy FitRes layout the SecAgg+ mod masks: the
    adapter in float64, and the weight (num-examples; 1 under DP) and metrics."""

    def handler(msg: Message, context: Context) -> Message:
        protocol = msg.content.pop(RECORD_KEY_CONFIGS)  # the handler sees a plain train task
        try:
            reply = call_next(msg, context)
        finally:
            msg.content[RECORD_KEY_CONFIGS] = protocol
        if reply.has_error():
            raise _HandlerFailed(reply)
        record, metrics = reply.content["arrays"], reply.content["metrics"]
        assert isinstance(record, ArrayRecord) and isinstance(metrics, MetricRecord)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        values = [record[k].numpy().astype(np.float64) for k in record]
        weight = int(numbers.get(DP_WEIGHT, numbers["num-examples"]))
        _check_bounds(values, weight, msg.content["config"])  # type: ignore[arg-type]
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(values), weight, numbers)
        return Message(compat.fitres_to_recorddict(fit, keep_input=False), reply_to=msg)

    return handler


def _check_bounds(values: list[np.ndarray], weight: int, config: ConfigRecord) -> None:
    """Refuse what the protocol would clip or overflow, naming the setting to change."""
    largest = max(float(np.abs(v).max(initial=0.0)) for v in values)
    bound = float(str(config[SECURE_CLIPPING_RANGE]))
    if not largest <= bound:
        raise SecureBoundsError(
            f"an adapter value of magnitude {largest:.4g} is outside +-{bound:g}, the range "
            "secure aggregation can sum; raise secure-aggregation.clipping-range"
        )
    most = int(str(config[SECURE_MAX_WEIGHT]))
    if weight > most:
        raise SecureBoundsError(
            f"this site's weight (num-examples {weight}) is above "
            f"secure-aggregation.max-weight ({most}); raise it"
        )
