"""Compressed wire formats (common/compression.py): int8 blocks, top-k deltas, error feedback,
and a federation that runs on them end to end with the real handlers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from client.app import RESIDUAL
from common.adapter import get_adapter_state
from common.compression import (
    BLOCK,
    MASK,
    SCALE,
    CompressionError,
    decode_global,
    decode_update,
    dequantize,
    dequantize4,
    encode_global,
    encode_update,
    quantize,
    quantize4,
)
from common.config import ConfigError, load_config
from common.model import build_model
from server.checkpoint import read_checkpoint
from tests.test_federation import HandlerGrid, _config, _rows, _run

pytestmark = pytest.mark.usefixtures("task_identity")


def _adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.lora_A.weight": rng.normal(0, 0.05, (4, 37)).astype(np.float32),
        "layer.lora_B.weight": rng.normal(0, 0.01, (37, 4)).astype(np.float32),
        "classifier.bias": rng.normal(0, 0.1, (2,)).astype(np.float32),
    }


@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 5])
def test_int8_blocks_round_to_within_half_a_step(size: int) -> None:
    values = np.random.default_rng(size).normal(0, 1, size).astype(np.float32)
    values[0] = 40.0  # one outlier spoils the precision of its own block only
    q, scale = quantize(values)
    assert q.dtype == np.int8 and q.shape == values.shape
    assert scale.dtype == np.float16 and scale.size == math.ceil(size / BLOCK)
    step = np.repeat(scale.astype(np.float32), BLOCK)[:size]
    assert np.all(np.abs(dequantize(q, scale) - values) <= step / 2 + 1e-7)
    if size > BLOCK:  # blocks after the first keep their own, finer step
        assert step[-1] < step[0] / 10


@pytest.mark.parametrize("size", [1, 2, BLOCK + 1, 3 * BLOCK + 6])
def test_int4_packs_two_values_a_byte_within_half_a_step(size: int) -> None:
    values = np.random.default_rng(size).normal(0, 1, size).astype(np.float32)
    packed, scale = quantize4(values)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(size / 2),)
    step = np.repeat(scale.astype(np.float32), BLOCK)[:size]
    assert np.all(np.abs(dequantize4(packed, scale, size) - values) <= step / 2 + 1e-7)
    with pytest.raises(CompressionError):
        dequantize4(packed, scale, size + 2)


def test_an_all_zero_block_stays_zero() -> None:
    q, scale = quantize(np.zeros(BLOCK + 3, dtype=np.float32))
    assert not q.any() and not scale.any()
    assert not dequantize(q, scale).any()


def test_the_global_adapter_travels_as_int8_and_decodes() -> None:
    adapter = _adapter()
    sent = encode_global(adapter, "int8")
    assert set(sent) == set(adapter) | {k + SCALE for k in adapter}
    assert all(sent[k].dtype == np.int8 for k in adapter)
    received = decode_global(sent, "int8")
    for key, values in adapter.items():
        assert np.abs(received[key] - values).max() <= np.abs(values).max() / 254 + 1e-7
    assert decode_global(adapter, "none") == adapter


@pytest.mark.parametrize("up", ["int8", "int4", "topk"])
def test_error_feedback_delivers_every_delta_in_the_end(up: str) -> None:
    """Over many rounds, what arrives sums to what the site trained, less one residual:
    nothing is dropped, only delayed."""
    received = _adapter(0)
    delta = {k: v * 0.1 for k, v in _adapter(1).items()}
    trained = {k: received[k] + delta[k] for k in received}
    residual: dict[str, np.ndarray] = {}
    arrived = {k: np.zeros_like(v) for k, v in received.items()}
    rounds = 40
    for _ in range(rounds):
        sent, residual = encode_update(trained, received, residual, up, topk_fraction=0.25)
        decoded = decode_update(sent, received, up)
        for key in arrived:
            arrived[key] += decoded[key] - received[key]
    for key, values in delta.items():
        np.testing.assert_allclose(arrived[key] + residual[key], rounds * values, atol=1e-4)
        assert np.abs(residual[key]).max() < 5 * np.abs(values).max()  # bounded, not growing


def test_top_k_sends_the_largest_share_of_each_tensor() -> None:
    received = _adapter(0)
    trained = {
        k: v + np.arange(v.size, dtype=np.float32).reshape(v.shape) for k, v in received.items()
    }
    sent, residual = encode_update(trained, received, {}, "topk", topk_fraction=0.1)
    for key, values in received.items():
        keep = math.ceil(0.1 * values.size)
        assert sent[key].shape == (keep,) and sent[key].dtype == np.int8
        mask = np.unpackbits(sent[key + MASK], count=values.size).astype(bool)
        assert np.flatnonzero(mask).tolist() == list(range(values.size - keep, values.size))
        left = residual[key].ravel()[: values.size - keep]
        np.testing.assert_allclose(left, np.arange(values.size - keep), atol=1e-4)


def test_int8_update_decodes_onto_the_coordinators_adapter() -> None:
    received, base = _adapter(0), _adapter(2)  # what the site got vs. what the server holds
    trained = {k: v + 0.01 for k, v in received.items()}
    sent, _ = encode_update(trained, received, {}, "int8")
    decoded = decode_update(sent, base, "int8")
    for key in base:
        np.testing.assert_allclose(decoded[key], base[key] + 0.01, atol=0.01 / 254 + 1e-6)
        assert decoded[key].dtype == base[key].dtype


@pytest.mark.parametrize(
    "spoil",
    [
        lambda s: s.pop("layer.lora_A.weight" + SCALE),
        lambda s: s.update({"layer.lora_A.weight": s["layer.lora_A.weight"][:1]}),
        lambda s: s.update({"classifier.bias" + MASK: np.zeros(1, np.uint8)}),
        lambda s: s.update({"extra": np.zeros(1, np.int8)}),
        lambda s: s.update({"classifier.bias" + SCALE: np.ones(1, np.float32)}),
    ],
)
def test_a_malformed_update_is_refused(spoil) -> None:
    received = _adapter(0)
    sent, _ = encode_update(_adapter(1), received, {}, "topk", topk_fraction=0.5)
    spoil(sent)
    with pytest.raises(CompressionError):
        decode_update(sent, received, "topk")


@pytest.mark.parametrize(
    "extra",
    [
        {"secure-aggregation.enabled": True},
        {"privacy.noise-multiplier": 1.0, "privacy.clipping-norm": 1.0},
    ],
)
def test_compression_is_refused_where_the_adapter_is_masked_or_clipped(extra: dict) -> None:
    with pytest.raises(ConfigError, match="compression.down and compression.up must be none"):
        load_config({"compression.up": "int8", **extra})


def test_a_federation_runs_on_int8_down_and_top_k_up(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    plain = _config(tiny_bert_dir, tmp_path / "plain")
    _run(HandlerGrid(plain, sites))
    small = _config(
        tiny_bert_dir,
        tmp_path / "small",
        **{"compression.down": "int8", "compression.up": "topk", "compression.topk-fraction": 0.1},
    )
    grid = HandlerGrid(small, sites, record=True)
    _run(grid)
    before, after = _rows(tmp_path / "plain" / "run-1"), _rows(tmp_path / "small" / "run-1")
    assert [r["sites-ok"] for r in after] == [3, 3, 3]
    assert all(r["evaluate"]["num-examples"] > 0 for r in after)
    # A tiny model's arrays are as small as Flower's per-array framing: compare the arrays.
    for was, now in zip(before, after, strict=True):
        assert now["bytes-down"] < was["bytes-down"] and now["bytes-up"] < was["bytes-up"]
    adapter = read_checkpoint(tmp_path / "plain" / "run-1" / "checkpoints" / "round-0001").adapter
    fp32_bytes = sum(v.numel() * 4 for v in adapter.values())
    updates = [r.content["arrays"] for r in grid.received if "arrays" in r.content]
    assert len(updates) == 9
    for sent in updates:
        assert isinstance(sent, ArrayRecord)
        assert {str(sent[k].numpy().dtype) for k in sent} == {"int8", "float16", "uint8"}
        assert sum(sent[k].numpy().nbytes for k in sent) * 10 < fp32_bytes
    for context in grid.contexts.values():  # error feedback: what top-k left, kept at the site
        residual = context.state[RESIDUAL]
        assert isinstance(residual, ArrayRecord)
        assert any(residual[k].numpy().any() for k in residual)


@pytest.mark.parametrize(
    ("strategy", "up", "levels"),
    [("fedavg", "int8", 127), ("fedmedian", "int8", 127), ("fedavg", "int4", 7)],
)  # fedavg streams its round, fedmedian holds it
def test_a_compressed_update_round_is_the_plain_round_within_a_rounding_step(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, strategy: str, up: str, levels: int
) -> None:
    """Same sites, same start: round 1's aggregate differs from the plain one's by at most
    the sites' rounding, half a step each."""
    runs = {}
    for name, extra in [("plain", {}), ("compressed", {"compression.up": up})]:
        keys = {"federation.rounds": 1, "federation.strategy": strategy, **extra}
        config = _config(tiny_bert_dir, tmp_path / name, **keys)
        _run(HandlerGrid(config, sites))
        runs[name] = read_checkpoint(tmp_path / name / "run-1" / "checkpoints" / "round-0001")
    plain, compressed = runs["plain"].adapter, runs["compressed"].adapter
    initial = get_adapter_state(build_model(load_config(_config(tiny_bert_dir, tmp_path))))
    moved = False
    for key in plain:
        difference = (compressed[key] - plain[key]).abs().max().item()
        step = (plain[key] - initial[key]).abs().max().item() / levels
        assert difference <= step + 1e-7, key
        moved = moved or difference > 0
    assert moved, "rounding left every value exactly as plain: was it applied?"
