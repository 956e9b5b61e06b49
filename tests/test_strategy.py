"""Strategies: aggregation matches a NumPy reference; too few updates fail the round loudly."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from common.config import load_config
from server.strategy import STRATEGIES, RoundFailed, build_strategy


def _reply(arrays: dict[str, np.ndarray], num_examples: int, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5 * node}),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"r-{node}",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id=f"m-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def _sites(n: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(0)
    states = [
        {
            "a": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32),
        }
        for _ in range(n)
    ]
    return states, [10, 30, 60][:n]


def test_fedavg_is_the_example_weighted_mean() -> None:
    strategy = build_strategy(load_config({"federation.min-sites": 3}).federation)
    states, weights = _sites(3)
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    for key in ("a", "b"):
        expected = np.average([s[key] for s in states], axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(np.average([0.5, 1.0, 1.5], weights=weights))


def test_too_few_updates_fail_the_round_with_the_reason() -> None:
    strategy = build_strategy(load_config({"federation.min-sites": 3}).federation)
    states, weights = _sites(2)
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    expected = r"round 4: 2 successful updates .*federation.min-sites = 3"
    with pytest.raises(RoundFailed, match=expected):
        strategy.aggregate_train(4, replies)


def test_failed_replies_are_left_out_not_averaged() -> None:
    strategy = build_strategy(load_config({"federation.min-sites": 2}).federation)
    states, weights = _sites(3)
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    failed = replies[2].create_error_reply(error=Error(code=1, reason="site error"))
    arrays, _ = strategy.aggregate_train(1, [*replies[:2], failed])
    assert arrays is not None
    expected = np.average([states[0]["a"], states[1]["a"]], axis=0, weights=weights[:2])
    np.testing.assert_allclose(arrays["a"].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_with_the_guard(name: str) -> None:
    settings = load_config({"federation.strategy": name, "federation.proximal-mu": 0.1})
    strategy = build_strategy(settings.federation)
    assert isinstance(strategy, STRATEGIES[name]) and strategy.min_updates == 2
