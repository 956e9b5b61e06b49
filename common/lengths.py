"""How long a site's records are in the model's tokens, against `data.max-length`: what
truncation hides from training, as counts and lengths only (never text), for `check` and
`train` to say before anyone trains on notes cut short."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from common.batches import HEAD_SHARE, token_lengths
from common.records import InstructRecord, Record


@dataclass(frozen=True)
class Lengths:
    """Record lengths in tokens (special tokens included) and how many exceed the limit."""

    records: int
    max_length: int
    over: int
    """Records longer than max_length: training sees only part of them."""
    median: int
    p90: int
    longest: int
    kept: str
    """Which part of a cut record is used: its start or start and end (notes), or its end
    (instructions)."""
    advice: str = "Raise data.max-length to use more of them (slower)"

    @property
    def share_over(self) -> float:
        return self.over / self.records if self.records else 0.0

    def summary(self) -> str:
        """One line for people: the share cut and by how much."""
        lengths = f"median {self.median}, 90th percentile {self.p90}, longest {self.longest}"
        if not self.over:
            return (
                f"lengths: every record within data.max-length {self.max_length} tokens ({lengths})"
            )
        return (
            f"lengths: {self.over} of {self.records} records ({self.share_over:.0%}) are longer "
            f"than data.max-length {self.max_length} tokens ({lengths}); training and scoring "
            f"use {self.kept} of each. {self.advice}"
        )


HEAD_ONLY_ADVICE = (
    "Raise data.max-length to use more of them (slower), or set data.truncation = "
    '"head-tail" to keep their ends'
)


def measure_lengths(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str = "head",
) -> Lengths:
    """The lengths of `records` under `tokenizer`, against `max_length` (and which part of a
    longer record `truncation` keeps)."""
    lengths = token_lengths(records, tokenizer)
    if not len(lengths):
        lengths = np.zeros(1, dtype=np.int64)
    instruct = bool(records) and isinstance(records[0], InstructRecord)
    return Lengths(
        records=len(records),
        max_length=max_length,
        over=int((lengths > max_length).sum()),
        median=int(np.median(lengths)),
        p90=int(np.percentile(lengths, 90)),
        longest=int(lengths.max()),
        kept=_kept(max_length, truncation, instruct),
        **({"advice": HEAD_ONLY_ADVICE} if truncation == "head" and not instruct else {}),
    )


def _kept(max_length: int, truncation: str, instruct: bool) -> str:
    if instruct:
        return f"the last {max_length} tokens"
    if truncation == "head-tail":
        head = max(max_length // HEAD_SHARE, 1)
        return f"the first {head} and the last {max_length - head} tokens"
    return f"the first {max_length} tokens"
