"""Records to token ids once, then to padded batches: dynamic padding, length-grouped order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from common.records import InstructRecord, Record, TextRecord

IGNORE = -100  # label of tokens that carry no loss (prompt and padding)
MEGABATCH = 32  # batches per length-sorted group: enough to pair similar lengths, still random


@dataclass(frozen=True)
class Tokenized:
    """A split as token ids; `targets` are class indices (IGNORE: unlabelled) or per-token
    labels."""

    input_ids: list[list[int]]
    targets: list[int] | list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64)


TRUNCATIONS = ("head", "head-tail")
HEAD_SHARE = 4
"""head-tail keeps the first 1/HEAD_SHARE of the budget from a long text's start and the
rest from its end (the split Sun et al. 2019 found best for long-document BERT classifiers)."""


def tokenize(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str = "head",
) -> Tokenized:
    """Tokenise a split, each record cut to `max_length` tokens; no padding yet.

    A text longer than that keeps its first tokens (`head`), or its first quarter and its
    last three quarters (`head-tail`: the end of a discharge note holds the disposition and
    the follow-up). An instruction keeps the end of its prompt and its response either way.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    pad_id = int(tokenizer.pad_token_id)
    if records and isinstance(records[0], TextRecord):
        texts = [r.text for r in records if isinstance(r, TextRecord)]
        if truncation == "head":
            encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        else:
            full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
            encoded = [head_and_tail(ids, max_length) for ids in full]
        labels = [
            IGNORE if r.label is None else r.label for r in records if isinstance(r, TextRecord)
        ]
        return Tokenized(encoded, labels, pad_id)
    pairs = [
        _instruct_ids(r, tokenizer, max_length) for r in records if isinstance(r, InstructRecord)
    ]
    return Tokenized([ids for ids, _ in pairs], [labels for _, labels in pairs], pad_id)


def head_and_tail(ids: list[int], max_length: int) -> list[int]:
    """`ids` cut to `max_length`: the first max_length/HEAD_SHARE tokens and the last rest,
    so both the start token and the end token of the model's template stay."""
    if len(ids) <= max_length:
        return list(ids)
    head = max(max_length // HEAD_SHARE, 1)
    return [*ids[:head], *ids[len(ids) - (max_length - head) :]]


def token_lengths(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Each record's length in tokens as `tokenize` would make it without truncation."""
    texts = [r.text for r in records if isinstance(r, TextRecord)]
    if texts:
        # verbose=False: no warning for texts beyond the model's own limit; we only count
        encoded = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(texts))
    unlimited = 1 << 30
    return np.fromiter(
        (
            len(_instruct_ids(r, tokenizer, unlimited)[0])
            for r in records
            if isinstance(r, InstructRecord)
        ),
        dtype=np.int64,
    )


def _instruct_ids(
    record: InstructRecord, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels; only completion segments carry loss, each closed by EOS."""
    eos = end_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in record.segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained and eos is not None:
            piece = [*piece, eos]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    budget = max_length - len(bos)
    if len(ids) > budget:
        # Keep the end: the question and the answer sit at the end of a prompt.
        ids, labels = ids[-budget:], labels[-budget:]
    return bos + ids, [IGNORE] * len(bos) + labels


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that closes a completion: EOS, or SEP for tokenizers without one (BERT's)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return None if eos is None else int(eos)


def batch_order(
    lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0
) -> list[np.ndarray]:
    """Indices per batch. Training: shuffled, then sorted by length within groups of
    MEGABATCH batches so that a batch holds similar lengths. Evaluation (no shuffle): only
    records of one length share a batch, longest first: nothing is padded, no attention mask
    is needed, and a record's scores do not depend on which records it is batched with (in
    bf16, a batch with padding goes through masked attention kernels that changed logits by
    up to 2e-3 against the same record scored alone; fp32 by 1e-7)."""
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        ends = np.flatnonzero(np.diff(lengths[order])) + 1  # where the length changes
        return [
            run[i : i + batch_size]
            for run in np.split(order, ends)
            for i in range(0, len(run), batch_size)
        ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    group = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), group):
        chunk = order[start : start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def collate(data: Tokenized, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest among them."""
    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, ids in enumerate(rows):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        attention[j, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    first = data.targets[indices[0]] if len(indices) else 0
    if isinstance(first, list):
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for j, i in enumerate(indices):
            target = data.targets[i]
            assert isinstance(target, list)
            labels[j, : len(target)] = torch.tensor(target)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([data.targets[i] for i in indices], dtype=torch.long)
    return batch


def iter_batches(
    data: Tokenized, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches over a split."""
    for indices in batch_order(data.lengths, batch_size, shuffle=shuffle, seed=seed):
        yield collate(data, indices)
