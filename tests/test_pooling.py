"""`model.pooling`: the classifier's head reads the [CLS] pooler or the mean of the last
hidden states over a record's tokens, checked against that mean computed directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from client.train import train_local
from common.adapter import get_adapter_state
from common.config import ConfigError, FedtuneConfig, load_config
from common.evaluation import load_eval_file, tokenize_records
from common.model import ModelError, build_model
from common.records import TextRecord
from server.export import ExportError, export_run


def _cfg(model_dir: Path, **extra: object) -> FedtuneConfig:
    return load_config({"model.path": str(model_dir), "lora.rank": 4, **extra})


def _inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """A short record padded to a longer one's length, and the longer one."""
    texts = ["stable", "patient discharged home with clinic follow up next week"]
    records = [TextRecord(row=i + 1, text=t, label=0) for i, t in enumerate(texts)]
    data = tokenize_records(records, _cfg(model_dir))
    width = max(data.lengths)
    ids = torch.full((2, width), data.pad_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, tokens in enumerate(data.input_ids):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def test_mean_pooling_feeds_the_head_the_masked_mean_of_the_last_hidden_states(
    tiny_bert_dir: Path,
) -> None:
    model = build_model(_cfg(tiny_bert_dir, **{"model.pooling": "mean"})).eval()
    inputs = _inputs(tiny_bert_dir)
    logits = model(**inputs).logits
    classifier = model.base_model.model
    hidden = classifier.bert(**inputs).last_hidden_state
    keep = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * keep).sum(dim=1) / keep.sum(dim=1)
    torch.testing.assert_close(logits, classifier.classifier(mean))
    # the padded short record scores as it does alone: padding is not averaged in
    short = {k: v[:1, : int(inputs["attention_mask"][0].sum())] for k, v in inputs.items()}
    torch.testing.assert_close(model(**short).logits, logits[:1], atol=1e-5, rtol=0)

    cls = build_model(_cfg(tiny_bert_dir)).eval()
    assert not torch.allclose(cls(**inputs).logits, logits)  # another vector reaches the head


def test_a_mean_pooled_model_trains_its_adapter_and_head(
    tiny_bert_dir: Path, text_file: Path
) -> None:
    cfg = _cfg(tiny_bert_dir, **{"model.pooling": "mean", "train.local-steps": 3})
    model = build_model(cfg)
    before = get_adapter_state(model)
    result = train_local(model, load_eval_file(text_file, cfg), cfg)
    after = get_adapter_state(model)
    assert math.isfinite(result.loss) and set(after) == set(before)
    assert any("classifier" in k and not torch.equal(after[k], before[k]) for k in after)


def test_mean_pooling_is_refused_where_it_cannot_apply(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelError, match='model.pooling "mean" needs an encoder with a pooler'):
        build_model(_cfg(tiny_llama_dir, **{"model.pooling": "mean"}))
    with pytest.raises(ConfigError, match='model.pooling "mean" is for classification'):
        load_config({"model.pooling": "mean", "model.task": "causal-lm"})


def test_a_mean_pooled_run_is_not_exported_for_classes_that_pool_otherwise(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run-1"
    run.mkdir()
    config = _cfg(tiny_bert_dir, **{"model.pooling": "mean"}).flat()
    (run / "run.json").write_text(json.dumps({"config": config, "status": "completed"}))
    with pytest.raises(ExportError, match="model.pooling mean") as caught:
        export_run(run, tmp_path / "export")
    assert "fedtune-site predict" in str(caught.value)
    assert not (tmp_path / "export").exists()
