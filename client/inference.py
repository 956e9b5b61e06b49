"""Using an adapter at a site: predictions for records without labels, as class probabilities
or generated completions. A prediction holds the record's line and `id`, never its text.

    model = load_adapted_model(Path("adapter"), cfg)
    predictions = predict(model, load_inputs(Path("notes.jsonl"), cfg), cfg)
    write_predictions(Path("predictions.jsonl"), predictions)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from common.batches import batch_order, end_token_id
from common.config import FedtuneConfig
from common.evaluation import BatchCallback, score, tokenize_records
from common.files import write_atomic
from common.model import load_tokenizer, resolve_model_path
from common.precision import autocast, autocast_dtype
from common.records import Extra, Record, load_records

ID_FIELD = "id"
"""A record's field copied to its prediction, to match predictions with records elsewhere."""


@dataclass(frozen=True)
class Sampling:
    """How completions are generated."""

    max_new_tokens: int = 64
    """Most tokens generated per record."""
    temperature: float = 0.0
    """0: greedy (the likeliest token at each step; deterministic); above 0: sampled."""
    top_p: float = 1.0
    """Sample from the likeliest tokens whose probabilities add up to top-p (1: all)."""
    seed: int = 0
    """Seed of the sampling; the same seed, records and batch size give the same text."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or above, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be above 0 and at most 1, got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments of transformers' `generate` for these settings."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,  # no hidden top-k cut on top of top-p
        }


@dataclass(frozen=True)
class ClassPrediction:
    """The likeliest class of one record, and the probability of every class."""

    line: int
    """The record's line in the file (its row in a Parquet file)."""
    label: int | str
    """The class, named as in data.label-names when they are set."""
    probability: float
    """The probability of `label`."""
    probabilities: list[float]
    """Every class's probability, in label order."""
    id: Extra | None = None


@dataclass(frozen=True)
class Completion:
    """The text generated for one record's prompt."""

    line: int
    """The record's line in the file."""
    completion: str
    id: Extra | None = None


Prediction = ClassPrediction | Completion


def load_inputs(path: Path, cfg: FedtuneConfig) -> list[Record]:
    """The records of a file to predict on (no labels needed), each with its `id` if any."""
    return load_records(path, cfg.model, cfg.data, labelled=False, keep=(ID_FIELD,))


def predict(
    model: PeftModel,
    records: Sequence[Record],
    cfg: FedtuneConfig,
    *,
    batch_size: int = 0,
    sampling: Sampling | None = None,
    on_batch: BatchCallback | None = None,
) -> list[Prediction]:
    """One prediction per record, in order: a class (classification) or a completion.
    `batch_size` 0 is twice train.batch-size."""
    if cfg.model.task == "classification":
        return list(classify(model, records, cfg, batch_size=batch_size, on_batch=on_batch))
    return list(
        generate(
            model, records, cfg, sampling or Sampling(), batch_size=batch_size, on_batch=on_batch
        )
    )


def classify(
    model: PeftModel,
    records: Sequence[Record],
    cfg: FedtuneConfig,
    *,
    batch_size: int = 0,
    on_batch: BatchCallback | None = None,
) -> list[ClassPrediction]:
    """The likeliest class of each record and the class probabilities, in order."""
    probs = score(model, tokenize_records(records, cfg), cfg, batch_size, on_batch).probs
    assert probs is not None
    names = cfg.data.label_list
    predictions = []
    for record, p in zip(records, probs, strict=True):
        k = int(p.argmax())
        predictions.append(
            ClassPrediction(
                line=record.row,
                label=names[k] if names else k,
                probability=float(p[k]),
                probabilities=[float(x) for x in p],
                id=record.extra.get(ID_FIELD),
            )
        )
    return predictions


@torch.inference_mode()
def generate(
    model: PeftModel,
    records: Sequence[Record],
    cfg: FedtuneConfig,
    sampling: Sampling,
    *,
    batch_size: int = 0,
    on_batch: BatchCallback | None = None,
) -> list[Completion]:
    """The completion generated for each record's prompt, in order; generation stops at the
    token that closed completions in training (EOS, or SEP)."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    data = tokenize_records(records, cfg)
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.model, device)
    end = end_token_id(tokenizer)
    model.eval()
    texts = [""] * len(data)
    # Records of one length share a batch (batch_order): no padding, so every row's
    # generated tokens start at the same position and do not depend on its batch-mates.
    batches = batch_order(data.lengths, batch_size or cfg.train.batch_size * 2, shuffle=False)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(sampling.seed)
        for indices in batches:
            input_ids = torch.tensor([data.input_ids[i] for i in indices], dtype=torch.long)
            attention = torch.ones_like(input_ids)
            with autocast(device, amp):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    eos_token_id=end,
                    pad_token_id=data.pad_id,
                    **sampling.generate_kwargs(),
                )
            for row, i in zip(out[:, input_ids.shape[1] :].tolist(), indices, strict=True):
                if end is not None and end in row:
                    row = row[: row.index(end)]
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
            if on_batch is not None:
                on_batch(len(indices))
    return [
        Completion(line=r.row, completion=text, id=r.extra.get(ID_FIELD))
        for r, text in zip(records, texts, strict=True)
    ]


def prediction_fields(prediction: Prediction) -> dict[str, Any]:
    """A prediction as one JSON object: line, id (when the record has one), then the rest."""
    fields = asdict(prediction)
    identifier = fields.pop("id")
    head = {"line": fields.pop("line")}
    if identifier is not None:
        head["id"] = identifier
    return {**head, **fields}


def write_predictions(path: Path, predictions: Sequence[Prediction]) -> None:
    """Write one JSON line per prediction, in order; the file is complete or absent."""
    lines = (json.dumps(prediction_fields(p), ensure_ascii=False) + "\n" for p in predictions)
    write_atomic(path, "".join(lines))
