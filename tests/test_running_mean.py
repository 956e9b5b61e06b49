"""The streamed aggregate: replies folded one at a time give Flower's weighted mean (and the
all-replies exact LoRA mean), whatever order they arrive in; the streaming median-ratio rule
drops a scaled update wherever it arrives; memory does not grow with the number of sites."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from test_strategy import _Grid, _reply

from common.config import load_config
from server import checks
from server.intake import Intake, Received
from server.lora_mean import exact_lora_mean
from server.running_mean import RunningMean, RunningProductMean
from server.strategy import MEAN_STRATEGIES, STRATEGIES, build_strategy

RNG = np.random.default_rng(7)
LAYER = "base_model.model.encoder.layer.0.attention.self.query"
HEAD = "base_model.model.classifier.weight"
A, B = f"{LAYER}.lora_A.weight", f"{LAYER}.lora_B.weight"


def _adapters(n: int, ranks: tuple[int, ...] = (4,)) -> Iterator[dict[str, np.ndarray]]:
    """Adapters with one LoRA layer (16 x 12) at the given ranks, cycled, and a head; built
    one at a time."""
    for rank in itertools.islice(itertools.cycle(ranks), n):
        yield {
            f"{LAYER}.lora_A.weight": RNG.normal(0, 0.3, (rank, 12)).astype(np.float32),
            f"{LAYER}.lora_B.weight": RNG.normal(0, 0.1, (16, rank)).astype(np.float32),
            HEAD: RNG.normal(size=(2, 16)).astype(np.float32),
        }


def _states(n: int, ranks: tuple[int, ...] = (4,)) -> list[dict[str, np.ndarray]]:
    return list(_adapters(n, ranks))


def _weights(n: int) -> list[int]:
    return [int(w) for w in RNG.integers(1, 5000, n)]


def test_the_running_mean_is_flowers_weighted_mean_in_any_arrival_order() -> None:
    states, weights = _states(7), _weights(7)
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    flower = aggregate_arrayrecords([r.content for r in replies], "num-examples")
    results = []
    for order in (range(7), reversed(range(7)), [3, 0, 6, 1, 5, 2, 4]):
        mean = RunningMean()
        for i in order:
            mean.fold(states[i], weights[i])
        results.append(mean.result())
    for key in states[0]:
        expected = np.average([s[key] for s in states], axis=0, weights=weights)
        got = results[0].arrays[key]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got, flower[key].numpy(), rtol=1e-5, atol=1e-7)
        for other in results[1:]:  # compensated sums: the same bits in every order
            np.testing.assert_array_equal(other.arrays[key], got)
    assert results[0].weight == sum(weights)


@pytest.mark.parametrize("ranks", [(4,), (2, 4, 8)])
def test_the_running_product_mean_is_the_exact_lora_mean_of_the_same_replies(
    ranks: tuple[int, ...],
) -> None:
    states, weights = _states(6, ranks), _weights(6)
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    head = np.average([s[HEAD] for s in states], axis=0, weights=weights).astype(np.float32)
    # exact_lora_mean takes the strategy's mean for the head and the factors' dtype only
    flower = ArrayRecord({HEAD: Array(head), A: Array(states[0][A]), B: Array(states[0][B])})
    held, held_lost = exact_lora_mean(flower, replies, "num-examples", rank=4, alpha=8.0)
    mean = RunningProductMean(rank=4, alpha=8.0)
    for state, weight in zip(states, weights, strict=True):
        mean.fold(state, weight)
    streamed = mean.result()
    assert list(streamed.arrays) == list(states[0])
    got = 2.0 * streamed.arrays[B].astype(float) @ streamed.arrays[A].astype(float)
    want = 2.0 * held[B].numpy().astype(float) @ held[A].numpy().astype(float)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the same A rows (singular vectors, each up to its sign), at the same RMS row size
    mine, theirs = streamed.arrays[A], held[A].numpy()
    signs = np.sign(np.sum(mine * theirs, axis=1, keepdims=True))
    np.testing.assert_allclose(mine, signs * theirs, atol=1e-5)
    np.testing.assert_allclose(streamed.arrays[HEAD], held[HEAD].numpy(), rtol=1e-5, atol=1e-7)
    assert 0 < streamed.energy_lost == pytest.approx(held_lost, rel=1e-6)


def _intake(rules: checks.UpdateRules, start: dict[str, np.ndarray]) -> Intake:
    return Intake(start, rules, "num-examples", RunningMean())


@pytest.mark.parametrize("position", [0, 3, 5])
def test_the_streaming_median_rule_drops_a_scaled_update_wherever_it_arrives(
    position: int,
) -> None:
    start = {"a": np.zeros((4, 3), np.float32), "b": np.ones(3, np.float32)}
    updates = [{k: v + RNG.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}]
    updates += [
        {k: v + RNG.normal(0, 0.1, v.shape).astype(np.float32) for k, v in start.items()}
        for _ in range(5)
    ]
    updates[position] = {k: start[k] + 1e3 * (v - start[k]) for k, v in updates[position].items()}
    weights = [10, 20, 30, 40, 50, 60]
    intake = _intake(checks.UpdateRules(max_norm_ratio=10.0), start)
    for node, (update, weight) in enumerate(zip(updates, weights, strict=True), start=1):
        intake.take(_reply(update, weight, node))
    intake.finish()
    assert intake.refused == [(position + 1, checks.NORM_ABOVE_MEDIAN)]
    assert sorted(intake.norms) == [n for n in range(1, 7) if n != position + 1]
    honest = [i for i in range(6) if i != position]
    mean = intake.mean.result().arrays
    for key in start:
        expected = np.average(
            [updates[i][key] for i in honest], axis=0, weights=[weights[i] for i in honest]
        )
        np.testing.assert_allclose(mean[key], expected, rtol=1e-6)


def test_fewer_updates_than_the_rule_needs_are_all_kept_and_clipped() -> None:
    start = {"a": np.zeros(4, np.float32)}
    intake = _intake(checks.UpdateRules(clip_norm=1.0), start)
    intake.take(_reply({"a": np.full(4, 2.0, np.float32)}, 10, 1))  # norm 4: clipped to 1
    intake.take(_reply({"a": np.full(4, 0.1, np.float32)}, 30, 2))
    assert intake.kept == [] and intake.norms == {}  # held until the round ends
    intake.finish()
    assert intake.norms == pytest.approx({1: 4.0, 2: 0.2})
    np.testing.assert_allclose(intake.mean.result().arrays["a"], (10 * 0.5 + 30 * 0.1) / 40)


@pytest.mark.parametrize("name", [n for n, s in STRATEGIES.items() if s in MEAN_STRATEGIES])
def test_a_strategy_given_the_stand_in_steps_as_from_the_replies(
    flower_task: None, name: str
) -> None:
    settings = load_config({"federation.strategy": name, "federation.min-sites": 3}).federation
    held, streamed = build_strategy(settings), build_strategy(settings)
    start = _states(1)[0]
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    for strategy in (held, streamed):
        list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))
    states, weights = _states(3), [10, 30, 60]
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    want, _ = held.aggregate_train(1, replies)
    intake = _intake(checks.UpdateRules(), start)
    for reply in replies:
        intake.take(reply)
    intake.finish()
    received = Received(intake.kept, intake.norms, [], 0, 0, intake.mean, "num-examples")
    stand_in, _ = received.stand_in()
    got, _ = streamed.aggregate_train(1, [stand_in])
    assert want is not None and got is not None
    for key in start:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-6)


def _replies(n: int, size: int) -> Iterator[Message]:
    """n synthetic replies of `size` float32 values each, built one at a time."""
    for node in range(1, n + 1):
        rng = np.random.default_rng(node)
        yield _reply({"x": rng.normal(0, 0.1, size).astype(np.float32)}, 10 + node, node)


def _peak(n: int, size: int) -> int:
    intake = _intake(checks.UpdateRules(), {"x": np.zeros(size, np.float32)})
    tracemalloc.start()
    try:
        for reply in _replies(n, size):
            intake.take(reply)
        intake.finish()
        intake.mean.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_sites() -> None:
    size = 250_000  # 1 MB a reply
    few, many = _peak(5, size), _peak(50, size)
    # Holding the replies would add 45 MB; each site leaves only its metrics and norm.
    assert many - few < 0.25 * 4 * size, (few, many)


def _product_peak(n: int) -> int:
    mean = RunningProductMean(rank=4, alpha=8.0)
    tracemalloc.start()
    try:
        for state in _adapters(n):
            mean.fold(state, 10)
        mean.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_exact_lora_memory_is_one_product_per_layer_whatever_the_sites() -> None:
    # past the first batch of sites (PRODUCT_BATCH) nothing grows: 200 sites as 20
    few, many = _product_peak(20), _product_peak(200)
    assert many - few < 4096, (few, many)


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Message() needs the run id that Flower sets in each app process; set one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
