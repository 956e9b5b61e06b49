"""Client-level differential privacy through the real ServerApp and ClientApp: each site's
update leaves clipped to the bound, the aggregate carries Gaussian noise of the calibrated
size, the epsilon reported matches the Renyi-DP accountant (and the closed-form bound), and
the run stops with its adapter before a round would exceed the budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from test_federation import CoordinatorCrash, HandlerGrid, _config, _run

from common.config import ConfigError, load_config
from server.card import CARD_JSON, CARD_MD
from server.strategy import RoundFailed

pytestmark = pytest.mark.usefixtures("task_identity")
CLIP = 0.05
NOISE = 0.8


def _dp_config(tiny_bert_dir: Path, tmp_path: Path, **extra: object) -> dict[str, object]:
    return _config(
        tiny_bert_dir,
        tmp_path / "runs",
        **{
            "federation.min-sites": 3,
            "federation.rounds": 2,
            "privacy.noise-multiplier": NOISE,
            "privacy.clipping-norm": CLIP,
            "privacy.delta": 1e-3,
            **extra,
        },
    )


class Recorder:
    """Keeps what each site sent (after the ClientApp's mods) and what it was sent."""

    def __init__(self) -> None:
        self.sent: dict[int, list[dict[str, np.ndarray]]] = {}
        self.start: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, message: Message, reply: Message) -> RecordDict:
        server_round = int(message.content["config"]["server-round"])
        arrays = message.content["arrays"]
        self.start[server_round] = {k: arrays[k].numpy() for k in arrays}
        sent = reply.content["arrays"]
        self.sent.setdefault(server_round, []).append({k: sent[k].numpy() for k in sent})
        return reply.content


def _accounted(rounds: int) -> float:
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-3,
            population_size=3,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(NOISE, 3, 3), rounds)
    return accountant.get_privacy_spent().epsilon


def test_updates_are_clipped_noise_is_calibrated_and_epsilon_is_reported(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    recorder = Recorder()
    _run(
        HandlerGrid(_dp_config(tiny_bert_dir, tmp_path), sites, tamper={n: recorder for n in sites})
    )
    run_dir = tmp_path / "runs" / "run-1"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-ok"] for r in rows] == [3, 3]

    # 1. Every update left its site clipped to the bound (a tiny model's honest update at
    #    lr 0.01 is well above 0.05, so the mod did the clipping).
    for server_round, updates in recorder.sent.items():
        start = recorder.start[server_round]
        norms = [math.sqrt(sum(float(((u[k] - start[k]) ** 2).sum()) for k in u)) for u in updates]
        assert max(norms) <= CLIP * (1 + 1e-4) and min(norms) > 0.9 * CLIP

    # 2. The new global adapter is the equal-weight mean of the clipped updates plus noise of
    #    standard deviation noise x clip / sites, coordinate by coordinate.
    after_round_1 = recorder.start[2]
    mean = {k: np.mean([u[k] for u in recorder.sent[1]], axis=0) for k in after_round_1}
    noise = np.concatenate([(after_round_1[k] - mean[k]).ravel() for k in after_round_1])
    expected = NOISE * CLIP / 3
    assert noise.size > 1000  # the tiny adapter: the std is known to about 2%
    assert abs(noise.std() / expected - 1) < 0.1 and abs(noise.mean()) < 0.1 * expected

    # 3. Epsilon after each round is what the accountant gives for that many releases, and
    #    below the closed-form Renyi bound min_a [T a / (2 z^2) + log(1/delta) / (a - 1)].
    for row in rows:
        rounds = row["round"]
        epsilon = row["privacy"]["epsilon"]
        assert epsilon == pytest.approx(_accounted(rounds), rel=1e-9)
        bound = min(
            rounds * a / (2 * NOISE**2) + math.log(1 / 1e-3) / (a - 1)
            for a in np.linspace(1.01, 200, 20000)
        )
        assert 0 < epsilon <= bound
    record = json.loads((run_dir / "run.json").read_text())
    assert record["privacy"]["epsilon"] == rows[-1]["privacy"]["epsilon"]
    card = json.loads((run_dir / CARD_JSON).read_text())["privacy"]
    assert card["differential-privacy"] and card["noise-multiplier"] == NOISE
    assert card["spent"]["epsilon"] == record["privacy"]["epsilon"]
    epsilon_shown = f"epsilon spent {record['privacy']['epsilon']}"
    assert epsilon_shown in (run_dir / CARD_MD).read_text()


def test_the_run_stops_before_the_budget_is_exceeded(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    budget = (_accounted(1) + _accounted(2)) / 2  # room for round 1, not for round 2
    config = _dp_config(
        tiny_bert_dir, tmp_path, **{"federation.rounds": 3, "privacy.max-epsilon": budget}
    )
    _run(HandlerGrid(config, sites))
    run_dir = tmp_path / "runs" / "run-1"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["privacy"]["epsilon"] <= budget
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["rounds"] == 1
    assert record["stopped"] == "privacy budget (privacy.max-epsilon)"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"privacy.noise-multiplier": 1.0}, "privacy.clipping-norm is 0"),
        (
            {"privacy.noise-multiplier": 1.0, "privacy.clipping-norm": 1.0,
             "federation.strategy": "fedmedian"},
            'needs federation.strategy fedavg or fedprox .* got "fedmedian"',
        ),
    ],
)  # fmt: skip
def test_dp_settings_that_cannot_work_are_refused(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(keys)


def test_a_resumed_dp_run_keeps_counting_epsilon(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    config = _dp_config(tiny_bert_dir, tmp_path, **{"federation.rounds": 3})
    with pytest.raises(CoordinatorCrash):
        _run(HandlerGrid(config, sites, crash_in_round=3))
    run_dir = tmp_path / "runs" / "run-1"
    _run(HandlerGrid({**config, "federation.resume": str(run_dir)}, sites), run_id=2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["privacy"]["releases"] for r in rows] == [1, 2, 3]
    assert rows[-1]["privacy"]["epsilon"] == pytest.approx(_accounted(3), rel=1e-9)


def test_under_dp_a_missing_site_fails_the_round_loudly(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    # The noise is calibrated to the mean of exactly min-sites updates, so under DP a round
    # samples min-sites sites and needs every one of them: one silent site stops the run,
    # naming why, rather than release a mean with too little noise for its size.
    config = _dp_config(tiny_bert_dir, tmp_path, **{"federation.min-sites": 2})
    expected = r"round 1: 1 usable updates of 2 sites asked \(1 no-reply-within-round-timeout\)"
    with pytest.raises(RoundFailed, match=expected):
        _run(HandlerGrid(config, sites, silent={42: {1}}))
