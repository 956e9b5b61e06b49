"""Bookkeeping on what the sites sent back: which sites answered, which did not and why,
and how many bytes went each way. Reason codes only, never an error's text, which may
quote a site's records."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode

from common.compression import Up, decode_update
from common.payload import content_bytes
from common.precision import DEVICES, PRECISIONS
from common.sitename import NAME, SITE_KEY
from common.wire import numpy_record

Metrics = dict[str, int | float]
_ERROR_REASONS = {ErrorCode.NODE_UNAVAILABLE: "site-offline"}


def in_node_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by site, so that aggregation sums in the same order every time."""
    return sorted(replies, key=lambda r: r.metadata.src_node_id)


def dropped(sent: list[Message], replies: list[Message]) -> list[dict[str, object]]:
    """Sites that sent an error or nothing in time, with a reason code."""
    site = _site_answering(sent)
    answered = {site(r) for r in replies}
    gone: list[dict[str, object]] = [
        {"node": site(r), "reason": _ERROR_REASONS.get(r.error.code, f"site-error-{r.error.code}")}
        for r in replies
        if r.has_error()
    ]
    gone += [
        {"node": m.metadata.dst_node_id, "reason": "no-reply-within-round-timeout"}
        for m in sent
        if m.metadata.dst_node_id not in answered
    ]
    return gone


def _site_answering(sent: list[Message]) -> Callable[[Message], int]:
    """The site a reply stands for: the node its message went to. An error reply for a site
    that went offline comes from the SuperLink itself, not from the site."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return lambda reply: sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def payload_bytes(message: Message) -> int:
    """Bytes of a message's records (arrays, metrics, config), as Flower counts them; 0 for
    an error reply."""
    return content_bytes(message.content) if message.has_content() else 0


def decoded(reply: Message, base: Mapping[str, np.ndarray], up: Up) -> Message:
    """The reply with its compressed update turned back into an adapter (`base`, the global
    adapter the coordinator holds, plus the site's delta), in place. Arrays that do not
    decode are removed, so that the update checks drop the reply as malformed."""
    record = reply.content.get("arrays")
    if not isinstance(record, ArrayRecord):
        return reply
    try:
        adapter = decode_update({key: record[key].numpy() for key in record}, base, up)
    except Exception:  # bytes that do not decode, or not to this adapter
        del reply.content["arrays"]
        return reply
    reply.content["arrays"] = numpy_record(adapter)
    return reply


def example_weighted(replies: list[Message]) -> Metrics:
    """Each metric's mean over the sites, weighted by their num-examples (the sum for
    num-examples itself). The coordinator's own arithmetic, whatever the strategy: robust
    and DP strategies change how adapters are combined, not how a score is averaged."""
    rows = [numbers(r.content.get("metrics")) for r in replies]
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


def told_name(reply: Message) -> str | None:
    """The name a site's reply says it goes by, when it is a well-formed site name (a site
    controls this text: anything else is ignored, so no free text reaches the records)."""
    record = reply.content.get(SITE_KEY) if reply.has_content() else None
    name = record.get("name") if isinstance(record, ConfigRecord) else None
    return name if isinstance(name, str) and NAME.fullmatch(name) else None


def told_compute(reply: Message) -> dict[str, str] | None:
    """The device and precision a site's reply says it trained in, when both are words of
    the fixed vocabulary (common/precision.py); None otherwise."""
    record = reply.content.get(SITE_KEY) if reply.has_content() else None
    if not isinstance(record, ConfigRecord):
        return None
    device, precision = record.get("device"), record.get("precision")
    if device in DEVICES and precision in PRECISIONS:
        return {"device": str(device), "precision": str(precision)}
    return None


def numbers(record: object) -> Metrics:
    """A metrics record's numbers ({} for anything else)."""
    if not isinstance(record, MetricRecord):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, int | float)}
