"""LoRA-aware aggregation through the real ServerApp and ClientApp handlers: FFA-LoRA sends
only B (and the head) and leaves A bit-identical; exact aggregation ends a round with the
re-factorised mean of the sites' products; settings that cannot work are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from test_federation import HandlerGrid, _config, _run

from client.task import site_rank
from common.adapter import load_adapter
from common.config import FROZEN_SHA256, ConfigError, load_config
from common.lora_math import is_lora_a, lora_pairs
from common.model import build_model

pytestmark = pytest.mark.usefixtures("task_identity")
ONE_ROUND = {"federation.rounds": 1}


def _recording(*args: object, **kwargs: object) -> HandlerGrid:
    """A HandlerGrid that keeps every reply as it reached the coordinator."""
    return HandlerGrid(*args, record=True, **kwargs)  # type: ignore[arg-type]


def _train_replies(grid: HandlerGrid) -> list[Message]:
    return [r for r in grid.received if r.metadata.message_type == "train" and not r.has_error()]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ffa_sends_only_b_and_leaves_a_bit_identical(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    naive = _recording(_config(tiny_bert_dir, tmp_path / "naive", **ONE_ROUND), sites)
    _run(naive)
    extra = {**ONE_ROUND, "lora.aggregation": "ffa", "federation.rounds": 2}
    ffa = _recording(_config(tiny_bert_dir, tmp_path / "ffa", **extra), sites)
    _run(ffa)

    sent = {k for r in _train_replies(ffa) for k in r.content["arrays"]}
    naive_sent = {k for r in _train_replies(naive) for k in r.content["arrays"]}
    assert sent and not any(is_lora_a(k) for k in sent)
    assert sent == {k for k in naive_sent if not is_lora_a(k)}
    ffa_bytes = _rows(tmp_path / "ffa" / "run-1")[0]["bytes-up"]
    naive_bytes = _rows(tmp_path / "naive" / "run-1")[0]["bytes-up"]
    a_share = sum(
        r.content["arrays"][k].numpy().nbytes
        for r in _train_replies(naive)[:1]
        for k in r.content["arrays"]
        if is_lora_a(k)
    ) * len(sites)
    assert ffa_bytes <= naive_bytes - a_share  # A's values (and their keys) never travel

    cfg = load_config(_config(tiny_bert_dir, tmp_path, **extra))
    initial = {k: v.clone() for k, v in build_model(cfg).state_dict().items() if "lora_A" in k}
    final, _ = load_adapter(tmp_path / "ffa" / "run-1" / "adapter")
    finals_a = {k: v for k, v in final.items() if is_lora_a(k)}
    assert len(finals_a) == len(initial) > 0
    for key, value in finals_a.items():
        (match,) = [v for k, v in initial.items() if k.startswith(key.removesuffix(".weight"))]
        assert torch.equal(value, match), key  # A is still its shared initial value
    assert any(  # while B trained
        v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k
    )


def test_a_site_whose_frozen_a_differs_refuses_the_task(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def other_digest(message: Message) -> Message:
        config = message.content["config"]
        if FROZEN_SHA256 in config:
            config[FROZEN_SHA256] = "0" * 64
        return message

    first = next(iter(sites))
    extra = {**ONE_ROUND, "lora.aggregation": "ffa"}
    grid = _recording(
        _config(tiny_bert_dir, tmp_path, **extra), sites, in_transit={first: other_digest}
    )
    _run(grid)
    row = _rows(tmp_path / "run-1")[0]
    assert row["dropped"] == [{"node": first, "reason": "site-error-2"}] and row["sites-ok"] == 2
    assert "frozen LoRA A factors differ from the coordinator's" in caplog.text


def test_exact_aggregation_is_the_refactorised_mean_of_the_products(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    extra = {**ONE_ROUND, "lora.aggregation": "exact", "lora.rank": 4, "lora.alpha": 8}
    grid = _recording(_config(tiny_bert_dir, tmp_path, **extra), sites)
    _run(grid)
    replies = _train_replies(grid)
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
    final, _ = load_adapter(tmp_path / "run-1" / "adapter")
    scale = 8 / 4
    records: list[ArrayRecord] = [r.content["arrays"] for r in replies]
    pairs = lora_pairs(records[0])
    assert pairs
    lost = []
    for key_a, key_b in pairs:
        mean = sum(
            w
            * scale
            * rec[key_b].numpy().astype(np.float64)
            @ rec[key_a].numpy().astype(np.float64)
            for rec, w in zip(records, weights, strict=True)
        ) / sum(weights)
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        got = scale * final[key_b].double().numpy() @ final[key_a].double().numpy()
        np.testing.assert_allclose(got, best, atol=1e-6)  # the best rank-4 fit of the mean
        lost.append(float(np.sum(s[4:] ** 2) / np.sum(s**2)))
        naive = np.mean([rec[key_b].numpy() for rec in records], axis=0) @ np.mean(
            [rec[key_a].numpy() for rec in records], axis=0
        )
        assert np.abs(scale * naive - mean).max() > 1e-6  # not what averaging factors gives
    heads = [k for k in final if "lora" not in k]
    for key in heads:  # the head is an ordinary weighted mean
        expected = sum(w * rec[key].numpy() for rec, w in zip(records, weights, strict=True))
        np.testing.assert_allclose(
            final[key].numpy(), expected / sum(weights), rtol=1e-5, atol=1e-7
        )
    row = _rows(tmp_path / "run-1")[0]
    assert 0 < row["train"]["lora-energy-lost"] < 1
    assert min(lost) <= row["train"]["lora-energy-lost"] <= max(lost)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"federation.strategy": "fedadam"}, "exact needs federation.strategy"),
        ({"federation.strategy": "krum"}, "exact needs federation.strategy"),
        ({"secure-aggregation.enabled": True}, 'use lora.aggregation = "ffa"'),
        ({"privacy.noise-multiplier": 1.0, "privacy.clipping-norm": 1.0}, "hide or perturb"),
    ],
)
def test_exact_aggregation_refuses_what_it_cannot_combine_with(
    extra: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"lora.aggregation": "exact", **extra})


def test_ffa_runs_under_secure_aggregation_and_dp(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    extra = {
        **ONE_ROUND,
        "lora.aggregation": "ffa",
        "secure-aggregation.enabled": True,
        "privacy.noise-multiplier": 0.5,
        "privacy.clipping-norm": 0.05,
        "federation.min-sites": 3,
    }
    grid = _recording(_config(tiny_bert_dir, tmp_path, **extra), sites)
    _run(grid)
    row = _rows(tmp_path / "run-1")[0]
    assert row["sites-ok"] == 3 and row["privacy"]["epsilon"] > 0
    assert not any(  # masked: no array reached the coordinator
        isinstance(record, ArrayRecord) and len(record) > 0
        for reply in _train_replies(grid)
        for record in reply.content.values()
    )
    cfg = load_config(_config(tiny_bert_dir, tmp_path, **extra))
    initial = {k: v.clone() for k, v in build_model(cfg).state_dict().items() if "lora_A" in k}
    final, _ = load_adapter(tmp_path / "run-1" / "adapter")
    for key, value in final.items():
        if is_lora_a(key):
            (match,) = [v for k, v in initial.items() if k.startswith(key.removesuffix(".weight"))]
            assert torch.equal(value, match), key


@pytest.mark.parametrize(("mode", "site_ranks"), [("exact", (2, 4, 8)), ("naive", (2, 3, 4))])
def test_sites_at_other_ranks_train_at_theirs_and_reply_at_the_runs(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, mode: str, site_ranks: tuple
) -> None:
    ranks = dict(zip(sites, site_ranks, strict=True))  # the run's lora.rank is 4
    extra = {**ONE_ROUND, "lora.aggregation": mode, "lora.rank": 4, "lora.alpha": 8}
    config = _config(tiny_bert_dir, tmp_path, **extra)
    model = build_model(load_config(config))
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    grid = _recording(
        config, sites, per_node={node: {"lora-rank": rank} for node, rank in ranks.items()}
    )
    _run(grid)
    assert _rows(tmp_path / "run-1")[0]["sites-ok"] == 3
    replies = {r.metadata.src_node_id: r.content["arrays"] for r in _train_replies(grid)}
    low = next(node for node, rank in ranks.items() if rank == 2)
    for key_a, key_b in lora_pairs(replies[low]):
        a, b = replies[low][key_a].numpy(), replies[low][key_b].numpy()
        assert a.shape[0] == 4 and b.shape[1] == 4  # at the run's rank, not the site's
        if mode == "exact":  # a rank-2 site's product, re-factorised at rank 4
            assert np.linalg.matrix_rank(b.astype(float) @ a.astype(float), tol=1e-6) <= 2
        else:  # its update is zero-padded: the components it did not train are as sent
            (init_a,) = [v for k, v in initial.items() if k.startswith(key_a[:-7])]
            np.testing.assert_array_equal(a[2:], init_a[2:])
            assert not np.array_equal(a[:2], init_a[:2])
    final, _ = load_adapter(tmp_path / "run-1" / "adapter")
    assert all(v.shape[0] == 4 for k, v in final.items() if is_lora_a(k))


def test_naive_aggregation_refuses_a_site_rank_above_the_runs(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tiny_bert_dir, tmp_path, **{**ONE_ROUND, "lora.rank": 4})
    first = next(iter(sites))
    _run(_recording(config, sites, per_node={first: {"lora-rank": 8}}))
    assert _rows(tmp_path / "run-1")[0]["dropped"] == [{"node": first, "reason": "site-error-2"}]
    assert "use lora.aggregation exact" in caplog.text


def test_a_simulated_site_takes_its_rank_from_the_list_and_a_deployed_one_from_its_node() -> None:
    run = {"simulation.site-ranks": "4,8,16"}
    assert [site_rank({"partition-id": k}, run) for k in range(4)] == [4, 8, 16, 4]
    assert site_rank({"partition-id": 0, "lora-rank": 2}, run) == 2
    assert site_rank({"data-path": "/x"}, run) == 0  # a deployed site without lora-rank
    assert site_rank({"partition-id": 1}, {}) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"simulation.site-ranks": "4,x"}, "comma-separated ranks from 1 to 1024"),
        ({"simulation.site-ranks": "4,0"}, "comma-separated ranks from 1 to 1024"),
        ({"simulation.site-ranks": "4,8", "lora.aggregation": "ffa"}, "ffa needs every site"),
    ],
)
def test_site_ranks_that_cannot_work_are_refused(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(extra)
