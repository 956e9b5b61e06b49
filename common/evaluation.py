"""Scoring an adapter on labelled records, the same way at a site and on the coordinator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from common.batches import IGNORE, Tokenized, iter_batches, tokenize
from common.config import FedtuneConfig
from common.metrics import classification_metrics, lm_metrics
from common.model import autocast, autocast_dtype, load_tokenizer, resolve_model_path
from common.records import load_records


def load_eval_file(path: Path, cfg: FedtuneConfig) -> Tokenized:
    """Tokenise a whole file as one evaluation split (for example a held-out test file)."""
    records = load_records(Path(path), cfg.model, cfg.data)
    return tokenize(
        records, load_tokenizer(resolve_model_path(cfg.model.path)), cfg.data.max_length
    )


def balanced_class_weights(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """Weights n / (K x n_c) per class c, so that every class weighs the same in the loss
    (classes absent from `labels` get weight 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    present = counts > 0
    weights = np.zeros(num_labels, dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


@torch.inference_mode()
def evaluate(model: PeftModel, data: Tokenized, cfg: FedtuneConfig) -> dict[str, float]:
    """Metrics on a split: classification scores and loss, or causal-LM loss and perplexity."""
    if len(data) == 0:
        raise ValueError("no records to evaluate: the split is empty")
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.model, device)
    model.eval()
    loss_sum, counted = 0.0, 0
    probs, labels = [], []
    for batch in iter_batches(data, cfg.train.batch_size * 2, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp):
            if cfg.model.task == "classification":
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits.float()
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                counted += len(logits)
                probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
                labels.append(batch["labels"].cpu().numpy())
            else:
                loss_sum += batch_loss(model, batch, "causal-lm", reduction="sum").item()
                counted += int((batch["labels"][:, 1:] != IGNORE).sum())
    if cfg.model.task != "classification":
        return lm_metrics(loss_sum, counted)
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(probs))
    return {**metrics, "loss": loss_sum / counted}


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
