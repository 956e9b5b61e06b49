"""Local LoRA training on tiny models and on the real MiniLM: the loss falls, metrics add up."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.train import is_head_weight, lr_at, steps_per_call, train_local
from common.adapter import get_adapter_state
from common.batches import tokenize
from common.config import FedtuneConfig, load_config
from common.evaluation import balanced_class_weights, evaluate
from common.model import build_model, load_tokenizer, resolve_model_path
from common.records import load_records


def _config(model_dir: Path, task: str = "classification", **keys: object) -> FedtuneConfig:
    base = {
        "model.path": str(model_dir),
        "model.task": task,
        "lora.rank": 4,
        "lora.target-modules": "query,value" if task == "classification" else "q_proj,v_proj",
        "data.max-length": 64,
        "train.batch-size": 8,
        "train.learning-rate": 5e-3,
        "train.warmup-steps": 2,
        "train.local-steps": 30,
    }
    return load_config({**base, **keys})


def _tokenized(cfg: FedtuneConfig, path: Path):
    records = load_records(path, cfg.model, cfg.data)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    return tokenize(records, tokenizer, cfg.data.max_length)


def test_tiny_bert_classification_learns(tiny_bert_dir: Path, text_file: Path) -> None:
    cfg = _config(tiny_bert_dir, **{"train.learning-rate": 2e-2, "train.local-steps": 60})
    model = build_model(cfg)
    data = _tokenized(cfg, text_file)
    before = evaluate(model, data, cfg)
    losses: list[float] = []
    result = train_local(model, data, cfg, on_step=lambda step, loss: losses.append(loss))
    after = evaluate(model, data, cfg)
    assert result.steps == 60 and len(losses) == 60
    assert result.examples == 60 * 8
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) * 0.8
    assert after["loss"] < before["loss"] * 0.8
    assert after["accuracy"] > before["accuracy"]
    assert set(after) >= {"accuracy", "precision", "recall", "f1", "auroc", "loss"}


def test_tiny_llama_instruction_learns(tiny_llama_dir: Path, instruct_file: Path) -> None:
    cfg = _config(tiny_llama_dir, task="causal-lm", **{"train.learning-rate": 2e-2})
    model = build_model(cfg)
    data = _tokenized(cfg, instruct_file)
    before = evaluate(model, data, cfg)
    train_local(model, data, cfg)
    after = evaluate(model, data, cfg)
    assert after["loss"] < before["loss"] * 0.8
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))


def test_training_is_seeded_and_rebuild_resets_the_adapter(
    tiny_bert_dir: Path, text_file: Path
) -> None:
    cfg = _config(tiny_bert_dir, **{"train.local-steps": 5})
    data = _tokenized(cfg, text_file)
    model = build_model(cfg)
    initial = get_adapter_state(model)
    first = train_local(model, data, cfg)
    model = build_model(cfg)
    reset = get_adapter_state(model)
    assert all(torch.equal(initial[k], reset[k]) for k in initial), "rebuild must reset"
    second = train_local(model, data, cfg)
    assert first.loss == second.loss
    other = train_local(build_model(cfg), data, cfg, start_step=5)
    assert other.loss != first.loss, "a later call on the schedule sees other batches"


def test_schedule_warms_up_then_decays_to_zero() -> None:
    rates = [lr_at(s, 1.0, warmup=10, total=100) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)


def test_steps_per_call_counts_accumulation_and_epochs() -> None:
    cfg = load_config({"train.batch-size": 8, "train.grad-accum-steps": 2, "train.local-epochs": 3})
    assert steps_per_call(100, cfg.train) == math.ceil(13 / 2) * 3
    cfg = load_config({"train.local-steps": 7})
    assert steps_per_call(100, cfg.train) == 7


def test_real_minilm_loads_offline_and_trains(text_file: Path) -> None:
    cfg = load_config({"train.local-steps": 3, "train.batch-size": 4, "data.max-length": 32})
    model = build_model(cfg)
    assert model.get_nb_trainable_parameters()[0] == 74_498  # LoRA r=8 on query,value + head
    before = get_adapter_state(model)
    result = train_local(model, _tokenized(cfg, text_file), cfg)
    after = get_adapter_state(model)
    assert math.isfinite(result.loss) and result.steps == 3
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)


def test_gradient_checkpointing_gives_the_same_training(
    tiny_bert_dir: Path, text_file: Path
) -> None:
    plain = _config(tiny_bert_dir, **{"train.local-steps": 6})
    checkpointed = _config(
        tiny_bert_dir, **{"train.local-steps": 6, "model.gradient-checkpointing": True}
    )
    data = _tokenized(plain, text_file)
    first, second = build_model(plain), build_model(checkpointed)
    assert first is not second and second.is_gradient_checkpointing
    a, b = train_local(first, data, plain), train_local(second, data, checkpointed)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    sa, sb = get_adapter_state(first), get_adapter_state(second)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_bf16_autocast_trains_on_cpu(tiny_bert_dir: Path, text_file: Path) -> None:
    cfg = _config(tiny_bert_dir, **{"train.local-steps": 3, "model.precision": "bf16"})
    model = build_model(cfg)
    result = train_local(model, _tokenized(cfg, text_file), cfg)
    assert math.isfinite(result.loss)
    assert all(v.dtype == torch.float32 for v in get_adapter_state(model).values())


def test_balanced_class_weights_equalise_the_classes() -> None:
    weights = balanced_class_weights([0, 0, 0, 1], num_labels=3)
    # 4 records, 2 classes present: 4 / (2 x 3) for class 0, 4 / (2 x 1) for class 1, 0 absent
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2.0, 0.0]))
    counts = torch.tensor([3.0, 1.0, 0.0])
    assert torch.allclose(weights * counts, torch.tensor([2.0, 2.0, 0.0]))


def test_balanced_weights_lift_a_rare_class(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """With 1 positive in 8, plain cross-entropy pushes every prediction towards "negative";
    balanced weights keep the rare class in play."""
    rows = [{"text": f"note patient {i % 5}", "label": int(i % 8 == 0)} for i in range(160)]
    path = tmp_path / "rare.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    positive = {}
    for mode in ("none", "balanced"):
        cfg = _config(tiny_bert_dir, **{"train.class-weights": mode, "train.learning-rate": 0.05})
        data = _tokenized(cfg, path)
        model = build_model(cfg)
        train_local(model, data, cfg)
        with torch.no_grad():
            batch = torch.tensor(data.input_ids[:32])
            probs = torch.softmax(model(input_ids=batch).logits, dim=-1)[:, 1]
        positive[mode] = float(probs.mean())
    # the plain loss settles near the 1-in-8 prior; the balanced one moves towards 1/2
    assert positive["none"] < 0.15 and positive["balanced"] > 2 * positive["none"]


def test_the_head_trains_at_its_own_learning_rate_when_one_is_set(
    tiny_bert_dir: Path, text_file: Path
) -> None:
    def moved(**keys: object) -> tuple[float, float]:
        """How far the head and the LoRA factors moved in a few steps (warmup off)."""
        cfg = _config(tiny_bert_dir, **{"train.local-steps": 4, "train.warmup-steps": 0, **keys})
        model = build_model(cfg)
        before = get_adapter_state(model)
        train_local(model, _tokenized(cfg, text_file), cfg)
        after = get_adapter_state(model)
        head = [k for k in after if is_head_weight(k)]
        lora = [k for k in after if "lora_" in k]
        assert head and lora and not set(head) & set(lora)

        def distance(keys: list[str]) -> float:
            return sum(float((after[k] - before[k]).norm()) for k in keys)

        return distance(head), distance(lora)

    slow = {"train.learning-rate": 1e-5}
    same_head, same_lora = moved(**slow)
    fast_head, fast_lora = moved(**slow, **{"train.head-learning-rate": 1e-2})
    assert fast_head > 50 * same_head  # the head at 1e-2, the rest still at 1e-5
    assert fast_lora == pytest.approx(same_lora, rel=0.5)
