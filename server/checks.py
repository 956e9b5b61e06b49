"""Every site's update checked before any aggregation: the adapter's exact keys, shapes and
dtype, finite values only, an update norm within bounds, and a sane `num-examples`.

Flower's aggregation checks only that reply keys match: it averages NaN and Inf, lets one
scaled update or one inflated `num-examples` take over the model, and a single reply with a
missing key ends the run. Here a failing update is dropped with a reason code (never the
site's words) and the round goes on with the others.

`check` judges one reply on its own. The median-ratio rule judges a norm against the
others': `screen` (the hold-all path) uses the median of all the round's norms;
`NormRatio` (the streaming path, where the norms arrive one at a time) holds the first
MIN_UPDATES_FOR_RATIO updates and judges them against their median, then each later update
against the median of every norm seen so far in the round, its own included.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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

T = TypeVar("T")


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
    """Check each successful reply against the global adapter and `rules`, all at once."""
    reference = reference_of(global_arrays)
    passed: list[tuple[Message, float]] = []
    dropped: list[dict[str, object]] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        reason, norm = check(reply, reference, rules)
        if reason is None:
            passed.append((reply, norm))
        else:
            dropped.append({"node": node, "reason": reason})
    limit = norm_limit([norm for _, norm in passed], rules.max_norm_ratio)
    dropped += [
        {"node": r.metadata.src_node_id, "reason": NORM_ABOVE_MEDIAN}
        for r, n in passed
        if n > limit
    ]
    passed = [(r, n) for r, n in passed if n <= limit]
    for entry in dropped:
        log.warning("update from node %s dropped: %s", entry["node"], entry["reason"])
    for reply, norm in passed:
        clip_to(reply, reference, norm, rules)
    return Screened(
        [r for r, _ in passed],
        dropped,
        {r.metadata.src_node_id: n for r, n in passed},
    )


def reference_of(global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global adapter as NumPy arrays, what every update is checked against."""
    return {key: global_arrays[key].numpy() for key in global_arrays}


def norm_limit(norms: Sequence[float], ratio: float) -> float:
    """The largest norm the median-ratio rule keeps, judged against `norms` (inf: the rule
    does not apply: off, fewer than MIN_UPDATES_FOR_RATIO norms, or a zero median)."""
    if ratio <= 0 or len(norms) < MIN_UPDATES_FOR_RATIO:
        return math.inf
    median = float(np.median(norms))
    return ratio * median if median > 0 else math.inf


@dataclass
class NormRatio(Generic[T]):
    """The median-ratio rule for updates that arrive one at a time.

    The first MIN_UPDATES_FOR_RATIO passing updates are held (the caller's items, so at
    most two adapters) and judged together against their median, as `screen` would judge
    them; each later update is judged on arrival against the median of every norm seen so
    far this round, its own and those of updates the rule dropped included. A scaled update
    is caught wherever it arrives; an honest one is judged against fewer norms than at the
    end of the round, so the rule is a little noisier early in a round."""

    ratio: float
    norms: list[float] = field(default_factory=list)
    """Every norm seen so far this round, sorted."""
    held: list[tuple[T, float]] = field(default_factory=list)

    def judge(self, item: T, norm: float) -> list[tuple[T, float, bool]]:
        """Items judged now, with their norm and whether they are kept (may be none)."""
        if self.ratio <= 0:
            return [(item, norm, True)]
        bisect.insort(self.norms, norm)
        self.held.append((item, norm))
        if len(self.norms) < MIN_UPDATES_FOR_RATIO:
            return []
        limit = norm_limit(self.norms, self.ratio)
        judged, self.held = self.held, []
        return [(i, n, n <= limit) for i, n in judged]

    def release(self) -> list[tuple[T, float, bool]]:
        """At the end of the round: what is still held (fewer norms than the rule needs)
        is kept, as `screen` keeps every update of a round that small."""
        held, self.held = self.held, []
        return [(i, n, True) for i, n in held]


def clip_to(
    reply: Message, reference: dict[str, np.ndarray], norm: float, rules: UpdateRules
) -> None:
    """Scale a passing update with norm `norm` down to `rules.clip_norm`, in place (if on)."""
    if rules.clip_norm > 0 and norm > rules.clip_norm:
        clip(reply, reference, rules.clip_norm / norm)


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


def check(
    reply: Message, reference: dict[str, np.ndarray], rules: UpdateRules
) -> tuple[str | None, float]:
    """The reason to drop this reply on its own (None: it passes) and its update norm."""
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
