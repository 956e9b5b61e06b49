"""Bad and hostile updates, end to end: one of three sites sends each of them through the
real ServerApp and ClientApp handlers; the update is dropped with its reason code, the
round goes on with the other two, and the run ends with a finite model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from test_federation import HandlerGrid, _config, _run

from common.adapter import get_adapter_state, load_adapter
from common.config import load_config
from common.model import build_model
from server import checks
from server.strategy import RoundFailed

pytestmark = pytest.mark.usefixtures("task_identity")
ATTACKER = 42
Arrays = dict[str, np.ndarray]


def _sent(
    change_arrays: Callable[[Arrays, Arrays], Arrays] | None = None,
    change_metrics: Callable[[dict], dict] | None = None,
) -> Callable[[Message, Message], RecordDict]:
    """What the attacker sends: its honest reply with arrays and/or metrics changed."""

    def tamper(message: Message, reply: Message) -> RecordDict:
        sent = {k: message.content["arrays"][k].numpy() for k in message.content["arrays"]}
        honest = {k: reply.content["arrays"][k].numpy() for k in reply.content["arrays"]}
        arrays = change_arrays(honest, sent) if change_arrays else honest
        metrics = dict(reply.content["metrics"])
        metrics = change_metrics(metrics) if change_metrics else metrics
        record = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
        return RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})

    return tamper


def _first(arrays: Arrays, value: float) -> Arrays:
    out = {k: v.copy() for k, v in arrays.items()}
    next(iter(out.values())).flat[0] = value
    return out


ATTACKS: dict[str, tuple[Callable[[Message, Message], RecordDict], str]] = {
    "nan": (_sent(lambda a, g: _first(a, np.nan)), checks.NOT_FINITE),
    "inf": (_sent(lambda a, g: _first(a, np.inf)), checks.NOT_FINITE),
    "scaled-1e6": (
        _sent(lambda a, g: {k: g[k] + 1e6 * (a[k] - g[k]) for k in a}),
        checks.NORM_ABOVE_MEDIAN,
    ),
    "wrong-shape": (
        _sent(lambda a, g: {k: (v[:-1] if i == 0 else v) for i, (k, v) in enumerate(a.items())}),
        checks.WRONG_SHAPE,
    ),
    "wrong-dtype": (
        _sent(lambda a, g: {k: v.astype(np.float64) for k, v in a.items()}),
        checks.WRONG_DTYPE,
    ),
    "missing-key": (_sent(lambda a, g: dict(list(a.items())[1:])), checks.MISSING_KEY),
    "extra-key": (
        _sent(lambda a, g: {**a, "base_model.model.smuggled": np.ones(4, np.float32)}),
        checks.EXTRA_KEY,
    ),
    "negative-num-examples": (
        _sent(change_metrics=lambda m: {**m, "num-examples": -5}),
        checks.BAD_EXAMPLES,
    ),
    "huge-num-examples": (
        _sent(change_metrics=lambda m: {**m, "num-examples": 10**12}),
        checks.BAD_EXAMPLES,
    ),
    "float-num-examples": (
        _sent(change_metrics=lambda m: {**m, "num-examples": 12.5}),
        checks.BAD_EXAMPLES,
    ),
    "all-zero": (_sent(lambda a, g: {k: np.zeros_like(v) for k, v in a.items()}), checks.ALL_ZERO),
    "no-metrics": (
        lambda message, reply: RecordDict({"arrays": reply.content["arrays"]}),
        checks.MALFORMED,
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_bad_update_is_dropped_with_its_reason_and_the_run_finishes(
    attack: str,
    tiny_bert_dir: Path,
    sites: dict[int, Path],
    tmp_path: Path,
) -> None:
    tamper, reason = ATTACKS[attack]
    config = _config(tiny_bert_dir, tmp_path, **{"federation.rounds": 2})
    _run(HandlerGrid(config, sites, tamper={ATTACKER: tamper}))
    run_dir = tmp_path / "run-1"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["dropped"] == [{"node": ATTACKER, "reason": reason}]
        assert row["sites-ok"] == 2 and "train" not in row["sites"].get(str(ATTACKER), {})
        norms = [s["train"]["update-norm"] for s in row["sites"].values() if "train" in s]
        assert len(norms) == 2 and all(np.isfinite(norms))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    adapter, _ = load_adapter(run_dir / "adapter")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_honest_updates_all_pass_and_carry_their_norm(
    tiny_bert_dir: Path,
    sites: dict[int, Path],
    tmp_path: Path,
) -> None:
    _run(HandlerGrid(_config(tiny_bert_dir, tmp_path, **{"federation.rounds": 1}), sites))
    (row,) = [json.loads(line) for line in (tmp_path / "run-1" / "metrics.jsonl").open()]
    assert row["dropped"] == [] and row["sites-ok"] == 3
    norms = [site["train"]["update-norm"] for site in row["sites"].values()]
    assert all(0 < n < 10 * np.median(norms) for n in norms)


def test_an_absolute_norm_bound_drops_every_update_above_it(
    tiny_bert_dir: Path,
    sites: dict[int, Path],
    tmp_path: Path,
) -> None:
    config = _config(
        tiny_bert_dir,
        tmp_path,
        **{"federation.rounds": 1, "federation.max-update-norm": 1e-9},
    )
    expected = r"0 usable updates of 3 sites asked \(3 update-norm-above-bound\)"
    with pytest.raises(RoundFailed, match=expected):
        _run(HandlerGrid(config, sites))


def test_clipping_scales_a_large_update_to_the_bound_and_leaves_small_ones(
    task_identity: None,
) -> None:
    from test_strategy import _reply

    base = {"a": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
    direction = {"a": np.full((4, 3), 1.0, np.float32), "b": np.full(3, 1.0, np.float32)}
    length = float(np.sqrt(15.0))  # the norm of `direction`
    big = {k: base[k] + 5.0 / length * direction[k] for k in base}
    small = {k: base[k] + 0.5 / length * direction[k] for k in base}
    reference = ArrayRecord(array_dict={k: Array(v) for k, v in base.items()})
    rules = checks.UpdateRules(max_norm_ratio=0.0, clip_norm=1.0)
    result = checks.screen([_reply(big, 10, 1), _reply(small, 10, 2)], reference, rules)
    assert result.norms == pytest.approx({1: 5.0, 2: 0.5}, rel=1e-5)
    clipped, untouched = ({k: r.content["arrays"][k].numpy() for k in base} for r in result.passed)
    distance = np.sqrt(sum(((clipped[k] - base[k]) ** 2).sum() for k in base))
    assert distance == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] - base["a"], (big["a"] - base["a"]) / 5, rtol=1e-5)
    assert all(np.array_equal(untouched[k], small[k]) for k in base)


@pytest.mark.parametrize(("strategy", "survives"), [("fedmedian", True), ("fedavg", False)])
def test_robust_aggregation_holds_off_a_scaled_update_that_the_checks_let_through(
    strategy: str, survives: bool, tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    config = _config(
        tiny_bert_dir,
        tmp_path,
        **{
            "federation.rounds": 1,
            "federation.strategy": strategy,
            "federation.max-update-norm-ratio": 0.0,  # the median-ratio check off
        },
    )
    tamper, _ = ATTACKS["scaled-1e6"]
    _run(HandlerGrid(config, sites, tamper={ATTACKER: tamper}))
    (row,) = [json.loads(line) for line in (tmp_path / "run-1" / "metrics.jsonl").open()]
    honest = max(s["train"]["update-norm"] for n, s in row["sites"].items() if n != "42")
    start = load_config(config)
    initial = get_adapter_state(build_model(start))
    final, _ = load_adapter(tmp_path / "run-1" / "adapter")
    moved = float(sum(((final[k] - initial[k]) ** 2).sum() for k in initial) ** 0.5)
    assert (moved <= honest) is survives, (moved, honest)


def test_a_site_that_hangs_or_drops_out_costs_only_its_update_and_rejoins_later(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    # The round waits for the silent site until its timeout, as with a real Grid: keep it short.
    extra = {"federation.rounds": 3, "federation.min-sites": 1, "federation.round-timeout": 1.0}
    config = _config(tiny_bert_dir, tmp_path, **extra)
    crashing = {777: tmp_path / "gone.jsonl"}  # its data vanished: every task raises
    grid = HandlerGrid(config, {**sites, **crashing}, silent={ATTACKER: {1, 2}})
    _run(grid)
    rows = [json.loads(line) for line in (tmp_path / "run-1" / "metrics.jsonl").open()]
    hung = {"node": ATTACKER, "reason": "no-reply-within-round-timeout"}
    crashed = {"node": 777, "reason": "site-error-2"}
    assert [sorted(r["dropped"], key=str) for r in rows] == [
        sorted([hung, crashed], key=str),
        sorted([hung, crashed], key=str),
        [crashed],
    ]
    assert [r["sites-ok"] for r in rows] == [1, 1, 2]  # the silent site is back in round 3
