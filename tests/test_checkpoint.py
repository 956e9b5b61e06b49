"""Checkpoints: atomic, verified by sha256 manifest, tampering refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from server.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.q.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.q.lora_B.weight": torch.randn(8, 2, generator=g),
    }


def test_round_trip_and_latest(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, 1, _adapter(1), CONFIG, {"config-digest": "abc"})
    second = write_checkpoint(tmp_path, 2, _adapter(2), CONFIG, {"metrics": [1, 2]})
    assert latest_checkpoint(tmp_path) == second
    loaded = read_checkpoint(second)
    assert loaded.round == 2 and loaded.state["metrics"] == [1, 2]
    assert all(torch.equal(loaded.adapter[k], v) for k, v in _adapter(2).items())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "round-0001", "round-0002"], "no staging directories left"


@pytest.mark.parametrize("damage", ["flip-weights", "edit-state", "extra-file", "drop-file"])
def test_tampered_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    path = write_checkpoint(tmp_path, 3, _adapter(3), CONFIG, {"round-metric": 0.5})
    weights = path / "adapter_model.safetensors"
    if damage == "flip-weights":
        raw = bytearray(weights.read_bytes())
        raw[-1] ^= 0x01
        weights.write_bytes(bytes(raw))
    elif damage == "edit-state":
        state = json.loads((path / "state.json").read_text())
        state["round-metric"] = 0.9
        (path / "state.json").write_text(json.dumps(state))
    elif damage == "extra-file":
        (path / "payload.py").write_text("print('hi')")
    else:
        (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="will not be loaded"):
        read_checkpoint(path)


def test_a_failed_write_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    good = write_checkpoint(tmp_path, 1, _adapter(1), CONFIG, {})
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path, 2, _adapter(2), CONFIG, {"bad": object()})
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "round-0001"]
