"""Strategies: aggregation matches a NumPy reference; too few updates fail the round loudly."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from common.adapter import WIRE_NUMPY
from common.config import load_config
from server.federation import in_wire_dtype
from server.strategy import STRATEGIES, build_strategy


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


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds(name: str) -> None:
    settings = load_config({"federation.strategy": name, "federation.proximal-mu": 0.1})
    strategy = build_strategy(settings.federation)
    assert type(strategy) is STRATEGIES[name] and strategy.min_train_nodes == 2


# Server optimisers over two rounds, against the published update rules written in NumPy.
#
# Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2 (FedAdagrad, FedYogi,
# FedAdam), for round t = 0, 1, ... with server adapter x_t and client deltas D_i = x_i - x_t:
#   D_t = mean_i D_i
#   m_t = b1 m_{t-1} + (1 - b1) D_t                                  m_{-1} = 0
#   v_t = v_{t-1} + D_t^2                                            (Adagrad)
#   v_t = v_{t-1} - (1 - b2) D_t^2 sign(v_{t-1} - D_t^2)             (Yogi)
#   v_t = b2 v_{t-1} + (1 - b2) D_t^2                                (Adam)
#   x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)                      v_{-1} >= tau^2
# Hsu et al. 2019 (FedAvgM), in the server-learning-rate form of Reddi et al. and PyTorch SGD:
#   g_t = x_t - sum_i n_i x_i / sum_i n_i,  u_t = beta u_{t-1} + g_t (u_{-1} = 0),
#   x_{t+1} = x_t - eta u_t
#
# Where Flower 1.41 departs from Algorithm 2, the tests say so and give the reference Flower's
# choice explicitly (each is a parameter below, never Flower's code):
#   1. D_t is weighted by num-examples (as in FedAvg); Algorithm 2 writes the uniform 1/|S|.
#   2. v starts at 0, not at v_{-1} >= tau^2.
#   3. FedAdam scales eta by sqrt(1 - b2^(r+1)) / (1 - b1^(r+1)) in server round r = 1, 2, ...
#      Algorithm 2 has no bias correction, and Adam's (Kingma & Ba) would use exponent r.
#   4. FedAdagrad fixes b1 = 0 (no server momentum).

TAU = 1e-3
ADAM_BETAS = (0.9, 0.99)  # Flower's defaults for FedAdam and FedYogi, which build_strategy keeps


class _Grid:
    """Stands in for Flower's Grid: configure_train only asks it which nodes are connected."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Message() needs the run id that Flower sets in each app process; set one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _rounds() -> tuple[dict[str, np.ndarray], list[list[dict[str, np.ndarray]]], list[int]]:
    """A start adapter and two rounds of site deltas at the scale of LoRA updates (about 1e-2);
    every third coordinate barely moves in round 2, so Yogi's sign term takes both signs."""
    rng = np.random.default_rng(3)
    start = {"a": rng.normal(0, 0.02, (8, 6)), "b": rng.normal(0, 0.02, (6,))}
    quiet = {
        k: np.where(np.arange(v.size).reshape(v.shape) % 3 == 0, 0.002, 1.0)
        for k, v in start.items()
    }
    first = [{k: rng.normal(0.004, 0.01, v.shape) for k, v in start.items()} for _ in range(3)]
    second = [
        {k: rng.normal(0, 0.01, v.shape) * quiet[k] for k, v in start.items()} for _ in range(3)
    ]
    return start, [first, second], [10, 30, 60]


def _flower(
    settings: dict[str, object],
    start: dict[str, np.ndarray],
    rounds: list[list[dict[str, np.ndarray]]],
    weights: list[int],
) -> list[dict[str, np.ndarray]]:
    """The global adapter after each round, as build_strategy's strategy computes it."""
    strategy = build_strategy(load_config({"federation.min-sites": 3, **settings}).federation)
    arrays = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in start.items()})
    results = []
    for server_round, deltas in enumerate(rounds, start=1):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
        assert len(sent) == 3
        current = {k: a.numpy() for k, a in arrays.items()}
        replies = [
            _reply({k: (current[k] + d[k]).astype(np.float32) for k in d}, n, i + 1)
            for i, (d, n) in enumerate(zip(deltas, weights, strict=True))
        ]
        new, _ = strategy.aggregate_train(server_round, replies)
        assert new is not None
        arrays = new
        results.append({k: a.numpy().astype(np.float64) for k, a in new.items()})
    return results


def _mean_delta(
    deltas: list[dict[str, np.ndarray]], weights: list[int] | None, key: str
) -> np.ndarray:
    return np.average([d[key] for d in deltas], axis=0, weights=weights)


def _reddi(
    rule: str,
    start: dict[str, np.ndarray],
    rounds: list[list[dict[str, np.ndarray]]],
    *,
    eta: list[float],
    beta_1: float,
    beta_2: float,
    tau: float,
    v_init: float,
    weights: list[int] | None,
) -> list[dict[str, np.ndarray]]:
    """Algorithm 2 of Reddi et al.; eta is given per round, weights=None is the uniform mean.

    The site deltas are taken against the reference's own x_t, so a reference that drifts from
    Flower's trajectory shows up instead of being re-anchored each round.
    """
    x = {k: v.astype(np.float64) for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, v_init) for k, val in x.items()}
    results = []
    for t, deltas in enumerate(rounds):
        for key in x:
            d = _mean_delta(deltas, weights, key)
            m[key] = beta_1 * m[key] + (1 - beta_1) * d
            if rule == "adagrad":
                v[key] = v[key] + d**2
            elif rule == "yogi":
                v[key] = v[key] - (1 - beta_2) * d**2 * np.sign(v[key] - d**2)
            else:
                v[key] = beta_2 * v[key] + (1 - beta_2) * d**2
            x[key] = x[key] + eta[t] * m[key] / (np.sqrt(v[key]) + tau)
        results.append({k: val.copy() for k, val in x.items()})
    return results


def _assert_same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    for got_round, want_round in zip(got, want, strict=True):
        for key, value in want_round.items():
            # float32 on the wire: agree to float32 precision of adapter-sized values
            np.testing.assert_allclose(got_round[key], value, rtol=1e-5, atol=1e-6)


def _differs(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> float:
    return max(float(np.abs(g[k] - w[k]).max()) for g, w in zip(got, want, strict=True) for k in w)


def test_fedprox_aggregates_like_fedavg_and_sends_mu(flower_task: None) -> None:
    start, rounds, weights = _rounds()
    got = _flower(
        {"federation.strategy": "fedprox", "federation.proximal-mu": 0.01}, start, rounds, weights
    )
    x = dict(start)
    for deltas, result in zip(rounds, got, strict=True):
        x = {k: x[k] + _mean_delta(deltas, weights, k) for k in x}
        _assert_same([result], [x])
    strategy = build_strategy(
        load_config({"federation.strategy": "fedprox", "federation.proximal-mu": 0.01}).federation
    )
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    (message, *_) = strategy.configure_train(1, arrays, ConfigRecord(), _Grid())
    assert message.content["config"]["proximal-mu"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("name", "rule", "beta_1", "beta_2"),
    [
        ("fedadam", "adam", *ADAM_BETAS),
        ("fedyogi", "yogi", *ADAM_BETAS),
        ("fedadagrad", "adagrad", 0.0, 0.0),  # deviation 4: beta_1 = 0
    ],
)
def test_adaptive_strategies_follow_reddi_et_al(
    flower_task: None, name: str, rule: str, beta_1: float, beta_2: float
) -> None:
    start, rounds, weights = _rounds()
    eta = 0.02
    settings = {"federation.strategy": name, "federation.server-learning-rate": eta}
    strategy = build_strategy(load_config(settings).federation)
    assert (strategy.eta, strategy.beta_1, strategy.tau) == (eta, beta_1, TAU)
    if rule != "adagrad":
        assert strategy.beta_2 == beta_2
    etas = [eta, eta]
    if rule == "adam":  # deviation 3: Flower's bias correction, exponent r + 1 in round r
        etas = [eta * np.sqrt(1 - beta_2 ** (r + 1)) / (1 - beta_1 ** (r + 1)) for r in (1, 2)]
    flower = dict(beta_1=beta_1, beta_2=beta_2, tau=TAU, v_init=0.0, weights=weights)  # 1, 2
    got = _flower(settings, start, rounds, weights)
    _assert_same(got, _reddi(rule, start, rounds, eta=etas, **flower))
    # Each deviation alone moves the trajectory by far more than rounding: undo one at a time.
    undone = {
        "uniform mean (1)": (etas, {**flower, "weights": None}),
        "v_{-1} = tau^2 (2)": (etas, {**flower, "v_init": TAU**2}),
    }
    if rule == "adam":
        undone["no bias correction (3)"] = ([eta, eta], flower)
    for what, (round_etas, kwargs) in undone.items():
        other = _reddi(rule, start, rounds, eta=round_etas, **kwargs)
        assert _differs(got, other) > 1e-3, what


def test_yogi_sign_term_took_both_branches() -> None:
    """Guards the data of the test above: Yogi's v must both grow and shrink in round 2."""
    start, rounds, weights = _rounds()
    for key in start:
        d1, d2 = (_mean_delta(deltas, weights, key) for deltas in rounds)
        v1 = (1 - ADAM_BETAS[1]) * d1**2
        signs = np.sign(v1 - d2**2)
        assert (signs > 0).any() and (signs < 0).any()


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.9), (0.5, 0.7)])
def test_fedavgm_is_sgd_with_server_momentum(flower_task: None, lr: float, momentum: float) -> None:
    start, rounds, weights = _rounds()
    settings = {
        "federation.strategy": "fedavgm",
        "federation.server-learning-rate": lr,
        "federation.server-momentum": momentum,
    }
    got = _flower(settings, start, rounds, weights)
    x = {k: v.astype(np.float64) for k, v in start.items()}
    u = {k: np.zeros_like(v) for k, v in x.items()}
    want = []
    for deltas in rounds:
        for key in x:
            g = -_mean_delta(deltas, weights, key)  # x_t minus the weighted mean of the sites
            u[key] = momentum * u[key] + g
            x[key] = x[key] - lr * u[key]
        want.append({k: v.copy() for k, v in x.items()})
    _assert_same(got, want)


# Flower's FedAdam multiplies by its bias correction as a NumPy float64, which NumPy 2
# promotes: without the round loop's cast a float32 adapter would come back float64, twice
# the bytes down, and every honest update would then fail the dtype check.
@pytest.mark.parametrize(("name", "wire"), [(n, w) for n in sorted(STRATEGIES) for w in WIRE_NUMPY])
def test_aggregation_keeps_the_adapter_dtype(flower_task: None, name: str, wire: str) -> None:
    strategy = build_strategy(
        load_config({"federation.strategy": name, "federation.min-sites": 3}).federation
    )
    states, weights = _sites(3)
    start = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in states[0].items()})
    list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    kept = in_wire_dtype(arrays, wire)  # type: ignore[arg-type]
    dtype = np.dtype(WIRE_NUMPY[wire]).name
    assert {k: a.dtype for k, a in kept.items()} == {"a": dtype, "b": dtype}
    for key in kept:
        np.testing.assert_array_equal(kept[key].numpy(), arrays[key].numpy().astype(dtype))


def _robust(strategy: str, n: int = 5, **keys: object):
    cfg = load_config({"federation.strategy": strategy, "federation.min-sites": n, **keys})
    rng = np.random.default_rng(3)
    states = [
        {
            "a": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32),
        }
        for _ in range(n)
    ]
    weights = [10, 20, 30, 40, 50][:n]
    replies = [_reply(s, w, i + 1) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    arrays, _ = build_strategy(cfg.federation).aggregate_train(1, replies)
    assert arrays is not None
    return arrays, states, weights


def test_fedmedian_is_the_coordinate_wise_median() -> None:
    arrays, states, _ = _robust("fedmedian")
    for key in ("a", "b"):
        expected = np.median([s[key] for s in states], axis=0)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_fedtrimmedavg_drops_the_extremes_of_each_coordinate() -> None:
    arrays, states, _ = _robust("fedtrimmedavg", **{"federation.trim-fraction": 0.2})
    for key in ("a", "b"):
        stacked = np.sort(np.stack([s[key] for s in states]), axis=0)
        expected = stacked[1:-1].mean(axis=0)  # 20% of 5 sites: one off each end
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5)


def _krum_scores(states: list[dict[str, np.ndarray]], f: int) -> list[float]:
    flat = [np.concatenate([s[k].ravel() for k in ("a", "b")]) for s in states]
    scores = []
    for i, x in enumerate(flat):
        distances = sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(flat) if j != i)
        scores.append(sum(distances[: len(flat) - f - 2]))
    return scores


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    arrays, states, _ = _robust("krum", **{"federation.byzantine-sites": 1})
    chosen = states[int(np.argmin(_krum_scores(states, 1)))]
    for key in ("a", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(), chosen[key])


def test_multikrum_averages_the_most_central_updates() -> None:
    keys = {"federation.byzantine-sites": 1, "federation.krum-select": 3}
    arrays, states, weights = _robust("multikrum", **keys)
    picked = np.argsort(_krum_scores(states, 1))[:3]
    for key in ("a", "b"):
        expected = np.average(
            [states[i][key] for i in picked], axis=0, weights=[weights[i] for i in picked]
        )
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5)
