"""Every site's update checked before any aggregation: the adapter's exact keys, shapes and
dtype, finite values only, an update norm within bounds, and a sane `num-examples`.

Flower's aggregation checks only that reply keys match: it averages NaN and Inf, lets one
scaled update or one inflated `num-examples` take over the model, and a single reply with a
missing key ends the run. Here a failing update is dropped with a reason code (never the
site's words) and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from common.config import FederationSettings

log = logging.getLogger(__name__)

# Reason codes, as they appear in a round's `dropped` list.
MALFORMED = "update-malformed"
MISSING_KEY = "update-missing-key"
EXTRA_KEY = "update-extra-key"
WRONG_SHAPE = "update-wrong-shape"
WRONG_DTYPE = "update-wrong-dtype"
NOT_FINITE = "update-not-finite"
ALL_ZERO = "update-all-zero"
NORM_ABOVE_BOUND = "update-norm-above-bound"
NORM_ABOVE_MEDIAN = "update-norm-above-median-ratio"
BAD_EXAMPLES = "num-examples-invalid"
MIN_UPDATES_FOR_RATIO = 3


@dataclass(frozen=True)
class UpdateRules:
    """The bounds an update must respect (from `federation.*`)."""

    max_norm: float = 0.0
    max_norm_ratio: float = 10.0
    max_examples: int = 10_000_000
    clip_norm: float = 0.0
    """Updates that pass are scaled down to at most this distance from the global adapter."""

    @classmethod
    def of(cls, settings: FederationSettings) -> UpdateRules:
        return cls(
            settings.max_update_norm,
            settings.max_update_norm_ratio,
            settings.max_examples,
            settings.clip_update_norm,
        )


@dataclass(frozen=True)
class Screened:
    """The replies that passed, and the ones dropped with their reason code."""

    passed: list[Message]
    dropped: list[dict[str, object]]
    norms: dict[int, float]
    """Update norm (L2 distance from the global adapter) per node that passed."""


def screen(replies: list[Message], global_arrays: ArrayRecord, rules: UpdateRules) -> Screened:
    """Check each successful reply against the global adapter and `rules`."""
    reference = {key: global_arrays[key].numpy() for key in global_arrays}
    passed: list[tuple[Message, float]] = []
    dropped: list[dict[str, object]] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        reason, norm = _check(reply, reference, rules)
        if reason is None:
            passed.append((reply, norm))
        else:
            dropped.append({"node": node, "reason": reason})
    if rules.max_norm_ratio > 0 and len(passed) >= MIN_UPDATES_FOR_RATIO:
        median = float(np.median([norm for _, norm in passed]))
        limit = rules.max_norm_ratio * median
        if median > 0:
            keep = [(r, n) for r, n in passed if n <= limit]
            dropped += [
                {"node": r.metadata.src_node_id, "reason": NORM_ABOVE_MEDIAN}
                for r, n in passed
                if n > limit
            ]
            passed = keep
    for entry in dropped:
        log.warning("update from node %s dropped: %s", entry["node"], entry["reason"])
    if rules.clip_norm > 0:
        for reply, norm in passed:
            if norm > rules.clip_norm:
                clip(reply, reference, rules.clip_norm / norm)
    return Screened(
        [r for r, _ in passed],
        dropped,
        {r.metadata.src_node_id: n for r, n in passed},
    )


def clip(reply: Message, reference: dict[str, np.ndarray], scale: float) -> None:
    """Shrink the reply's update (its difference from `reference`) by `scale`, in place."""
    arrays = reply.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    clipped = {}
    for key, base in reference.items():
        value = arrays[key].numpy()
        shrunk = base.astype(np.float64) + scale * (value.astype(np.float64) - base)
        clipped[key] = Array(np.ascontiguousarray(shrunk.astype(base.dtype)))
    reply.content["arrays"] = ArrayRecord(array_dict=clipped)


def _check(
    reply: Message, reference: dict[str, np.ndarray], rules: UpdateRules
) -> tuple[str | None, float]:
    """The reason to drop this reply (None: keep it) and its update norm."""
    records = dict(reply.content.items()) if reply.has_content() else {}
    arrays, metrics = records.get("arrays"), records.get("metrics")
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return MALFORMED, math.nan
    examples = metrics.get("num-examples")
    if (
        not isinstance(examples, int)
        or isinstance(examples, bool)
        or not 1 <= examples <= rules.max_examples
    ):
        return BAD_EXAMPLES, math.nan
    keys = set(arrays.keys())
    if keys - reference.keys():
        return EXTRA_KEY, math.nan
    if reference.keys() - keys:
        return MISSING_KEY, math.nan
    squared, nonzero = 0.0, False
    for key, expected in reference.items():
        try:
            value = arrays[key].numpy()
        except Exception:  # bytes that do not decode to the array they claim to be
            return MALFORMED, math.nan
        if value.shape != expected.shape:
            return WRONG_SHAPE, math.nan
        if value.dtype != expected.dtype:
            return WRONG_DTYPE, math.nan
        if not np.isfinite(value).all():
            return NOT_FINITE, math.nan
        nonzero = nonzero or bool(value.any())
        delta = value.astype(np.float64) - expected.astype(np.float64)
        squared += float(np.dot(delta.ravel(), delta.ravel()))
    if not nonzero:  # LoRA's A starts random: an all-zero adapter was never trained
        return ALL_ZERO, math.nan
    norm = math.sqrt(squared)
    if not math.isfinite(norm):
        return NOT_FINITE, norm
    if rules.max_norm > 0 and norm > rules.max_norm:
        return NORM_ABOVE_BOUND, norm
    return None, norm
