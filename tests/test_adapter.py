"""Adapter state: LoRA tensors and head only; exact round trips in memory, on the wire, on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from common.adapter import (
    AdapterError,
    from_wire,
    get_adapter_state,
    load_adapter,
    save_adapter,
    set_adapter_state,
    to_wire,
)
from common.config import load_config
from common.model import build_model


@pytest.fixture
def cfg(tiny_bert_dir: Path):
    return load_config({"model.path": str(tiny_bert_dir), "lora.rank": 4})


def _perturbed(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_state_holds_only_lora_and_head(cfg) -> None:
    state = get_adapter_state(build_model(cfg))
    assert state, "adapter must not be empty"
    for key in state:
        assert "lora_A" in key or "lora_B" in key or ".classifier." in key, key
        assert "embeddings" not in key
    assert sum("classifier" in k for k in state) == 2  # weight and bias
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())


def test_set_then_get_is_exact(cfg) -> None:
    model = build_model(cfg)
    new = _perturbed(get_adapter_state(model))
    set_adapter_state(model, new)
    back = get_adapter_state(model)
    assert all(torch.equal(new[k], back[k]) for k in new)


def test_set_rejects_missing_and_misshaped_tensors(cfg) -> None:
    model = build_model(cfg)
    state = get_adapter_state(model)
    key = next(k for k in state if "lora_A" in k)
    with pytest.raises(AdapterError, match="1 missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterError, match="shape"):
        set_adapter_state(model, {**state, key: torch.zeros(3, 3)})


def test_wire_round_trip_fp32_exact_and_fp16_close(cfg) -> None:
    state = _perturbed(get_adapter_state(build_model(cfg)))
    wire = to_wire(state, "fp32")
    assert all(a.dtype == np.float32 for a in wire.values())
    back = from_wire(wire)
    assert all(torch.equal(state[k], back[k]) for k in state)
    half = to_wire(state, "fp16")
    assert all(a.dtype == np.float16 for a in half.values())
    assert all(torch.allclose(state[k], from_wire(half)[k], rtol=1e-3, atol=1e-3) for k in state)
    with pytest.raises(AdapterError, match="wire dtype"):
        to_wire(state, "bf16")  # type: ignore[arg-type]


def test_peft_layout_round_trip_loads_with_peft(cfg, tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = build_model(cfg)
    set_adapter_state(model, _perturbed(get_adapter_state(model)))
    state = get_adapter_state(model)
    out = tmp_path / "adapter"
    save_adapter(state, model.peft_config["default"], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded, config = load_adapter(out)
    assert all(torch.equal(state[k], loaded[k]) for k in state) and set(loaded) == set(state)
    assert config.r == 4

    # An independent load with plain peft gives the same outputs as our model.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference = PeftModel.from_pretrained(base, out).eval()
    model.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_save_replaces_atomically_and_leaves_no_staging(cfg, tmp_path: Path) -> None:
    model = build_model(cfg)
    out = tmp_path / "adapter"
    first = get_adapter_state(model)
    save_adapter(first, model.peft_config["default"], out)
    second = _perturbed(first)
    save_adapter(second, model.peft_config["default"], out)
    loaded, _ = load_adapter(out)
    assert all(torch.equal(second[k], loaded[k]) for k in second)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_load_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        load_adapter(tmp_path)
