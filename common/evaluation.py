"""Scoring an adapter on labelled records, the same way at a site and on the coordinator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from common.batches import IGNORE, Tokenized, batch_order, collate, tokenize
from common.config import FedtuneConfig
from common.metrics import classification_metrics, lm_metrics
from common.model import load_tokenizer, resolve_model_path
from common.precision import autocast, autocast_dtype
from common.records import Record, load_records


def load_eval_file(path: Path, cfg: FedtuneConfig) -> Tokenized:
    """Tokenise a whole file as one evaluation split (for example a held-out test file)."""
    return tokenize_records(load_records(Path(path), cfg.model, cfg.data), cfg)


def tokenize_records(records: Sequence[Record], cfg: FedtuneConfig) -> Tokenized:
    """Records as token ids, with the model's tokenizer and data.max-length."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    return tokenize(records, tokenizer, cfg.data.max_length, cfg.data.truncation)


def balanced_class_weights(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """Weights n / (K x n_c) per class c, so that every class weighs the same in the loss
    (classes absent from `labels` get weight 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    present = counts > 0
    weights = np.zeros(num_labels, dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


BatchCallback = Callable[[int], None]
"""Called after each batch with the number of records it held (a progress bar)."""


@dataclass(frozen=True)
class Scores:
    """A model's outputs on a split, one entry per record in the split's order; the metrics
    of any subset of records are those of evaluating that subset alone."""

    loss: np.ndarray
    """Each record's summed loss: over its class, or over its completion tokens."""
    counted: np.ndarray
    """Targets each record's loss sums over: 1 per labelled class record, completion tokens."""
    labels: np.ndarray | None = None
    """Classification: each record's class (IGNORE where unlabelled)."""
    probs: np.ndarray | None = None
    """Classification: class probabilities, shape (records, classes)."""

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Scores:
        """The scores of the records at `indices`."""
        index = np.asarray(indices, dtype=np.int64)
        return Scores(
            loss=self.loss[index],
            counted=self.counted[index],
            labels=None if self.labels is None else self.labels[index],
            probs=None if self.probs is None else self.probs[index],
        )

    def metrics(self) -> dict[str, float]:
        """Classification scores and loss, or causal-LM loss and perplexity."""
        if self.probs is None or self.labels is None:
            return lm_metrics(float(self.loss.sum()), int(self.counted.sum()))
        metrics = classification_metrics(self.labels, self.probs)
        return {**metrics, "loss": float(self.loss.sum()) / int(self.counted.sum())}


def evaluate(model: PeftModel, data: Tokenized, cfg: FedtuneConfig) -> dict[str, float]:
    """Metrics on a split: classification scores and loss, or causal-LM loss and perplexity."""
    return score(model, data, cfg).metrics()


@torch.inference_mode()
def score(
    model: PeftModel,
    data: Tokenized,
    cfg: FedtuneConfig,
    batch_size: int = 0,
    on_batch: BatchCallback | None = None,
) -> Scores:
    """Each record's loss (and class probabilities), in batches of `batch_size` records
    (0: twice train.batch-size)."""
    if len(data) == 0:
        raise ValueError("no records to evaluate: the split is empty")
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.model, device)
    model.eval()
    classify = cfg.model.task == "classification"
    loss = np.zeros(len(data), dtype=np.float64)
    counted = np.zeros(len(data), dtype=np.int64)
    probs = np.zeros((len(data), cfg.model.num_labels), dtype=np.float64) if classify else None
    size = batch_size or cfg.train.batch_size * 2
    for indices in batch_order(data.lengths, size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate(data, indices).items()}
        with autocast(device, amp):
            if classify:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits.float()
                losses = F.cross_entropy(logits, batch["labels"], reduction="none")
                targets = batch["labels"] != IGNORE
                assert probs is not None
                probs[indices] = torch.softmax(logits, dim=-1).cpu().numpy()
            else:
                per_token = batch_loss(model, batch, "causal-lm", reduction="none")
                losses = per_token.view(len(indices), -1).sum(dim=1)
                targets = batch["labels"][:, 1:] != IGNORE
        loss[indices] = losses.cpu().numpy()
        counted[indices] = targets.view(len(indices), -1).sum(dim=1).cpu().numpy()
        if on_batch is not None:
            on_batch(len(indices))
    labels = np.asarray(data.targets, dtype=np.int64) if classify else None
    return Scores(loss=loss, counted=counted, labels=labels, probs=probs)


def batch_loss(
    model: PeftModel,
    batch: dict[str, torch.Tensor],
    task: str,
    reduction: str,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of a batch: over classes, or over completion tokens for causal LMs.
    `class_weights` (classification only) weighs each example by its true class."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "classification":
        return F.cross_entropy(
            logits.float(), batch["labels"], weight=class_weights, reduction=reduction
        )
    # Next-token prediction: position t predicts token t+1; prompt and padding are IGNORE.
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )
