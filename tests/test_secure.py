"""Secure aggregation (SecAgg+) through the real ServerApp and ClientApp handlers and
Flower's own protocol code: the coordinator receives no site's adapter in the clear, yet
ends the round with the same global adapter as plain FedAvg (to within quantisation); a
site that drops out after the keys are shared is left out of the sum and the sum is still
right; DP composes with it; and values the protocol cannot sum are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message
from test_federation import HandlerGrid, _config, _run

from client.ledger import MASKED_STAGE, describe, read_ledger
from common.adapter import load_adapter
from common.config import ConfigError, load_config
from common.sitename import SITE_KEY
from server.secure import MODULUS, SecureAggregationFailed, quantization_range

pytestmark = pytest.mark.usefixtures("task_identity")
SECURE = {"secure-aggregation.enabled": True, "federation.rounds": 1}
TOLERANCE = 1e-5
"""Quantisation error allowed on any adapter value; with the default clipping range and
max weight it measured 6e-7 to 7e-7 here (the error grows with max-weight / examples)."""


def _recording(*args: object, **kwargs: object) -> HandlerGrid:
    """A HandlerGrid that keeps every reply as it reached the coordinator."""
    return HandlerGrid(*args, record=True, **kwargs)  # type: ignore[arg-type]


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    tensors, _ = load_adapter(run_dir / "adapter")
    return {k: v.numpy() for k, v in tensors.items()}


def _arrays_received(grid: HandlerGrid) -> int:
    """Array values in the replies that reached the coordinator."""
    return sum(
        record[key].numpy().size
        for reply in grid.received
        if reply.has_content() and reply.metadata.message_type == "train"
        for record in reply.content.values()
        if isinstance(record, ArrayRecord)
        for key in record
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_coordinator_gets_the_fedavg_adapter_and_no_site_adapter(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    plain = _recording(
        _config(tiny_bert_dir, tmp_path / "plain", **{"federation.rounds": 1}), sites
    )
    _run(plain)
    ledger = tmp_path / "sent.jsonl"
    secure = _recording(
        _config(tiny_bert_dir, tmp_path / "secure", **SECURE),
        sites,
        node_config={"sent-log": str(ledger)},
    )
    _run(secure)

    assert _arrays_received(plain) > 0  # plain FedAvg: each site's adapter, in the clear
    assert _arrays_received(secure) == 0  # secure: masked integers in a config record only
    expected, got = _adapter(tmp_path / "plain" / "run-1"), _adapter(tmp_path / "secure" / "run-1")
    assert set(got) == set(expected)
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert 0 < worst < TOLERANCE  # the same mean, up to the protocol's stochastic rounding

    row = _rows(tmp_path / "secure" / "run-1")[0]
    assert row["sites-ok"] == 3 and row["dropped"] == []
    assert row["bytes-up"] > 0 and row["bytes-down"] > 0
    assert all("update-norm" not in site["train"] for site in row["sites"].values())
    assert (
        row["train"]["num-examples"]
        == _rows(tmp_path / "plain" / "run-1")[0]["train"]["num-examples"]
    )

    # The site's ledger: four messages per site for the one training task, the adapter masked.
    entries = [e for e in read_ledger(ledger) if e["op"] == "train"]
    stages = [e["secure-stage"] for e in entries]
    assert stages.count(MASKED_STAGE) == 3 and len(stages) == 12
    masked = [e for e in entries if e["secure-stage"] == MASKED_STAGE]
    assert all(e["tensors"] == [] and e["metrics"]["num-examples"] > 0 for e in masked)
    assert all(e["received-adapter-sha256"] for e in masked)
    assert "masked" in "\n".join(describe(masked[0]))


def test_a_site_that_fails_after_the_key_exchange_is_left_out_of_a_correct_sum(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    """Site 5 takes part in the key stages, then cannot train (its data file is gone): its
    masks are rebuilt from the others' shares and removed, so the sum is the other three's."""
    broken = {**sites, 5: tmp_path / "missing.jsonl"}
    _run(_recording(_config(tiny_bert_dir, tmp_path / "plain", **{"federation.rounds": 1}), broken))
    grid = _recording(_config(tiny_bert_dir, tmp_path / "secure", **SECURE), broken)
    _run(grid)

    row = _rows(tmp_path / "secure" / "run-1")[0]
    assert row["sites-asked"] == 4 and row["sites-ok"] == 3
    assert row["dropped"] == [{"node": 5, "reason": "site-error-2"}]
    expected, got = _adapter(tmp_path / "plain" / "run-1"), _adapter(tmp_path / "secure" / "run-1")
    assert max(float(np.abs(got[k] - expected[k]).max()) for k in expected) < TOLERANCE
    audit = [json.loads(line) for line in (tmp_path / "secure" / "run-1" / "audit.jsonl").open()]
    assert audit[-1]["contributed"] == sorted(sites) and audit[-1]["dropped"] == row["dropped"]


def test_dp_noise_is_added_to_the_secure_sum(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    dp = {"privacy.noise-multiplier": 0.5, "privacy.clipping-norm": 0.05, "federation.min-sites": 3}
    grid = _recording(_config(tiny_bert_dir, tmp_path, **SECURE, **dp), sites)
    _run(grid)
    row = _rows(tmp_path / "run-1")[0]
    assert row["sites-ok"] == 3 and row["privacy"]["epsilon"] > 0
    assert _arrays_received(grid) == 0
    record = json.loads((tmp_path / "run-1" / "run.json").read_text())
    assert (
        record["status"] == "completed"
        and record["privacy"]["epsilon"] == row["privacy"]["epsilon"]
    )


def test_an_adapter_value_outside_the_clipping_range_is_refused_by_name(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tight = {**SECURE, "secure-aggregation.clipping-range": 1e-4}
    grid = _recording(_config(tiny_bert_dir, tmp_path, **tight), sites)
    with pytest.raises(SecureAggregationFailed, match="could not unmask the sum: 3 of 3 sites"):
        _run(grid)
    errors = [r.error.reason for r in grid.received if r.has_error()]
    assert len(errors) == 3 and all("SecureBoundsError" in reason for reason in errors)
    assert all("1e-04" not in reason and "clipping" not in reason for reason in errors)  # type only
    assert "raise secure-aggregation.clipping-range" in caplog.text  # the site's own log


def test_a_weight_above_max_weight_is_refused_by_name(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = {**SECURE, "secure-aggregation.max-weight": 5}
    with pytest.raises(SecureAggregationFailed):
        _run(_recording(_config(tiny_bert_dir, tmp_path, **small), sites))
    assert "above secure-aggregation.max-weight (5)" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"federation.strategy": "krum"}, "needs a strategy that averages"),
        ({"federation.strategy": "fedmedian"}, "needs a strategy that averages"),
        ({"federation.clip-update-norm": 1.0}, "cannot be combined"),
        ({"federation.min-sites": 1}, "min-sites of 2 or more"),
        ({"secure-aggregation.reconstruction-threshold": 3}, "must be below"),
        (
            {"secure-aggregation.num-shares": 5, "secure-aggregation.reconstruction-threshold": 3},
            r"must not exceed federation.min-sites \(2\)",
        ),
    ],
)
def test_settings_secure_aggregation_cannot_honour_are_refused(
    extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"secure-aggregation.enabled": True, **extra})


@pytest.mark.parametrize("sites", [2, 3, 4, 24, 1000, 4096])
def test_the_quantisation_range_leaves_no_room_for_the_sum_to_wrap(sites: int) -> None:
    q = quantization_range(sites)
    assert sites * q < MODULUS and q <= 2**30  # Flower rounds in int32
    assert (sites + 1) * q >= MODULUS or q == 2**30  # and no narrower than it must be


def test_a_plain_round_is_unchanged_by_the_secure_mod(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    """Without secure aggregation the train reply is the plain adapter (the mod steps aside)."""
    grid = _recording(_config(tiny_bert_dir, tmp_path, **{"federation.rounds": 1}), sites)
    _run(grid)
    train = [
        r for r in grid.received if isinstance(r, Message) and r.metadata.message_type == "train"
    ]
    plain = {"arrays", "metrics", SITE_KEY}  # SITE_KEY: the device and precision it used
    assert len(train) == 3 and all(set(r.content) == plain for r in train)
