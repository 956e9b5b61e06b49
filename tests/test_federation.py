"""The ServerApp's rounds, driven in-process: the real ServerApp `main` and ClientApp handlers,
with a Grid that hands each message straight to the handler of the site it is addressed to
(what Flower's engines do across processes). Resume, failing sites and too few updates."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from client.app import app as client_app
from common.adapter import load_adapter
from server.app import main
from server.checkpoint import latest_checkpoint, read_checkpoint
from server.replies import dropped, example_weighted
from server.strategy import RoundFailed

pytestmark = pytest.mark.usefixtures("task_identity")


class CoordinatorCrash(BaseException):
    """Stands in for the coordinator process dying (not an Exception: nothing handles it)."""


class HandlerGrid(Grid):
    """Delivers each message to the ClientApp handler of its site, in this process."""

    def __init__(
        self,
        run_config: dict[str, object],
        sites: dict[int, Path],
        crash_in_round: int = 0,
        tamper: dict[int, Callable[[Message, Message], RecordDict]] | None = None,
        silent: dict[int, set[int]] | None = None,
        node_config: dict[str, object] | None = None,
        in_transit: dict[int, Callable[[Message], Message]] | None = None,
        record: bool = False,
        per_node: dict[int, dict[str, object]] | None = None,
    ) -> None:
        self.run_config = run_config
        self.sites = sites
        self.crash_in_round = crash_in_round
        self.tamper = tamper or {}  # node -> what it sends instead of its honest reply
        self.silent = silent or {}  # node -> rounds it hangs or is cut off (no reply in time)
        self.node_config = node_config or {}  # more node config for every site
        self.in_transit = in_transit or {}  # node -> what alters its messages on the way
        self.contexts: dict[int, Context] = {}  # a site's context lives across messages
        self.record = record
        self.per_node = per_node or {}  # node -> node config of that site only
        self.received: list[Message] = []  # with `record`: every reply, as it arrived
        self.pushed: dict[str, Message] = {}  # message id -> message not yet pulled
        self.ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = [r for m in messages if (r := self._deliver(m)) is not None]
        if self.record:
            self.received += copy.deepcopy(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"  # as Flower does
            self._crash_if_due(message)
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these messages, each computed when first pulled (a silent site's
        never comes, as when it does not answer within the round's timeout)."""
        wanted = [self.pushed.pop(i) for i in message_ids if i in self.pushed]
        replies = [r for m in wanted if (r := self._deliver(m)) is not None]
        if self.record:
            self.received += copy.deepcopy(replies)
        return replies

    def _crash_if_due(self, message: Message) -> None:
        config = message.content.get("config") or {"server-round": message.metadata.group_id}
        server_round = int(config.get("server-round", 0))
        if server_round == self.crash_in_round and message.metadata.message_type == "train":
            raise CoordinatorCrash

    def _deliver(self, message: Message) -> Message | None:
        """The site's reply to `message` (None: the site stays silent this round)."""
        self._crash_if_due(message)
        config = message.content.get("config") or {"server-round": message.metadata.group_id}
        server_round = int(config.get("server-round", 0))
        node = message.metadata.dst_node_id
        if server_round in self.silent.get(node, set()):
            return None  # what the Grid returns when a site does not answer within the timeout
        context = self.contexts.setdefault(
            node,
            Context(
                run_id=1,
                node_id=node,
                node_config={
                    "data-path": str(self.sites[node]),
                    **self.node_config,
                    **self.per_node.get(node, {}),
                },
                state=RecordDict(),
                run_config=self.run_config,  # type: ignore[arg-type]
            ),
        )
        message = copy.deepcopy(message)  # as over the wire: the site's own copy
        if node in self.in_transit:
            message = self.in_transit[node](message)
        try:
            reply = client_app(message, context)  # routes by type, with the handler's mods
            if node in self.tamper and message.metadata.message_type == "train":
                reply = Message(self.tamper[node](message, reply), reply_to=message)
            return reply
        except Exception as e:  # as Flower does: the site's failure becomes an error reply
            return Message(Error(code=2, reason=type(e).__name__), reply_to=message)

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError


def _config(tiny_bert_dir: Path, run_dir: Path, **extra: object) -> dict[str, object]:
    return {
        "model.path": str(tiny_bert_dir),
        "lora.rank": 4,
        "data.max-length": 32,
        "train.batch-size": 8,
        "train.learning-rate": 0.01,
        "train.local-steps": 2,
        "train.num-threads": 1,
        "federation.rounds": 3,
        "federation.min-sites": 2,
        "federation.connect-timeout": 1.0,
        "federation.run-dir": str(run_dir),
        **extra,
    }


def _run(grid: HandlerGrid, run_id: int = 1) -> None:
    main(
        grid,
        Context(
            run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config
        ),
    )  # type: ignore[arg-type]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_a_resumed_run_ends_with_the_same_adapter(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, strategy: str
) -> None:
    extra = {"federation.strategy": strategy, "federation.evaluate-every": 2}
    whole = _config(tiny_bert_dir, tmp_path / "whole", **extra)
    _run(HandlerGrid(whole, sites))
    reference, _ = load_adapter(tmp_path / "whole" / "run-1" / "adapter")

    broken = _config(tiny_bert_dir, tmp_path / "broken", **extra)
    with pytest.raises(CoordinatorCrash):
        _run(HandlerGrid(broken, sites, crash_in_round=3))
    run_dir = tmp_path / "broken" / "run-1"
    assert not (run_dir / "adapter").exists()
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "round-0002"
    if strategy != "fedavg":  # the server optimiser's state is part of the checkpoint
        assert read_checkpoint(run_dir / "checkpoints" / "round-0002").server_state

    _run(HandlerGrid({**broken, "federation.resume": str(run_dir)}, sites), run_id=2)
    resumed, _ = load_adapter(run_dir / "adapter")
    assert set(resumed) == set(reference)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3]
    assert [bool(r["evaluate"]) for r in _rows(run_dir)] == [False, True, True]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed-after-rounds"] == [2]


def test_resume_refuses_changed_settings(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    config = _config(tiny_bert_dir, tmp_path, **{"federation.rounds": 1})
    _run(HandlerGrid(config, sites))
    changed = {**config, "lora.rank": 8, "federation.resume": str(tmp_path / "run-1")}
    with pytest.raises(Exception, match=r"other settings \(lora.rank differ\)"):
        _run(HandlerGrid(changed, sites), run_id=2)


def test_a_failing_site_leaves_the_round_to_the_others(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    broken = {**sites, 5: tmp_path / "missing.jsonl"}  # this site's data file is gone
    _run(HandlerGrid(_config(tiny_bert_dir, tmp_path, **{"federation.rounds": 2}), broken))
    rows = _rows(tmp_path / "run-1")
    assert [r["sites-ok"] for r in rows] == [3, 3] and [r["sites-asked"] for r in rows] == [4, 4]
    assert rows[0]["dropped"] == [{"node": 5, "reason": "site-error-2"}]
    assert set(rows[0]["sites"]) == {str(n) for n in sites}
    assert rows[0]["train"]["num-examples"] > 0 and rows[0]["bytes-up"] > 0
    assert (tmp_path / "run-1" / "adapter" / "adapter_model.safetensors").is_file()


def test_too_few_updates_fail_the_run_with_its_reason(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    only_one = {9001: sites[9001], 5: tmp_path / "missing.jsonl"}
    with pytest.raises(
        RoundFailed, match=r"round 1: 1 usable updates of 2 sites asked \(1 site-error-2\)"
    ):
        _run(HandlerGrid(_config(tiny_bert_dir, tmp_path), only_one))
    record = json.loads((tmp_path / "run-1" / "run.json").read_text())
    assert record["status"] == "failed" and "federation.min-sites" in record["error"]
    assert latest_checkpoint(tmp_path / "run-1") is None


def test_central_evaluation_scores_every_round(
    tiny_bert_dir: Path, sites: dict[int, Path], text_file: Path, tmp_path: Path
) -> None:
    config = _config(
        tiny_bert_dir,
        tmp_path,
        **{
            "federation.rounds": 2,
            "federation.eval-file": str(text_file),
            "federation.evaluate-every": 0,
        },
    )
    _run(HandlerGrid(config, sites))
    rows = _rows(tmp_path / "run-1")
    assert all({"f1", "auroc", "loss"} <= set(r["central"]) for r in rows)
    assert all(r["evaluate"] == {} for r in rows)
    assert rows[0]["central"]["loss"] != rows[1]["central"]["loss"]


def test_sites_that_never_connect_fail_with_a_clear_message(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    config = _config(tiny_bert_dir, tmp_path, **{"federation.min-sites": 5})
    with pytest.raises(Exception, match=r"only 3 of the 5 sites .* within 1 s"):
        _run(HandlerGrid(config, sites))


def test_a_site_gone_offline_is_dropped_under_its_own_node_id() -> None:
    # The SuperLink answers for a site that went offline: the error reply's source is the
    # SuperLink (node 0), and only its reply_to id says which site it stands for.
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (11, 12, 13)]
    for n, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"m{n}"
    replies = [Message(RecordDict(), reply_to=sent[0])]
    offline = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="offline"), reply_to=sent[1])
    offline.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    replies.append(offline)
    assert dropped(sent, replies) == [
        {"node": 12, "reason": "site-offline"},
        {"node": 13, "reason": "no-reply-within-round-timeout"},
    ]


def test_evaluation_metrics_are_example_weighted_whatever_the_strategy() -> None:
    sent = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"f1": f1, "num-examples": n})}), reply_to=sent)
        for f1, n in ((0.2, 10), (0.8, 30), (0.9, 0))
    ]
    means = example_weighted(replies)
    assert means == {"num-examples": 40, "f1": pytest.approx((0.2 * 10 + 0.8 * 30) / 40)}


def test_tasks_go_out_longest_expected_training_first() -> None:
    from server.schedule import Durations, longest_first

    def task(node: int) -> Message:
        return Message(RecordDict(), dst_node_id=node, message_type="train")

    durations = Durations()
    for node, seconds, examples in ((1, 5.0, 10), (2, 50.0, 100), (3, 20.0, 40)):
        durations.trained(node, {"train-seconds": seconds, "num-examples": examples})
    durations.examples.update({5: 60, 6: 8})  # sized by a query, never trained: 0.5 s each
    order = longest_first([task(n) for n in (1, 2, 3, 4, 5, 6)], durations)
    assert [m.metadata.dst_node_id for m in order] == [4, 2, 5, 3, 1, 6]
    assert durations.unknown([1, 4, 5]) == [4]


def test_round_one_asks_new_sites_their_size_and_sends_the_largest_first(
    tiny_bert_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in text_file.read_text().splitlines()]
    sites = {  # 16, 48 and 32 records: the largest is neither first nor last by node id
        node: write_jsonl(tmp_path / f"site-{node}.jsonl", rows[lo:hi])
        for node, lo, hi in ((1, 0, 16), (2, 16, 64), (3, 64, 96))
    }
    config = _config(
        tiny_bert_dir,
        tmp_path / "runs",
        **{"train.local-steps": 0, "federation.rounds": 2, "federation.evaluate-every": 0},
    )
    grid = HandlerGrid(config, sites, record=True)  # replies computed in the order sent
    _run(grid)

    queries = [r for r in grid.received if r.metadata.message_type == "query"]
    trained = [r for r in grid.received if r.metadata.message_type == "train"]
    assert len(queries) == 3  # round 1 only: from round 2 the sites' train-seconds are known
    assert {r.metadata.src_node_id: dict(r.content["metrics"]) for r in queries} == {
        r.metadata.src_node_id: {"num-examples": r.content["metrics"]["num-examples"]}
        for r in trained[:3]
    }
    assert [r.metadata.src_node_id for r in trained[:3]] == [2, 3, 1]
    assert "size-query" in _rows(tmp_path / "runs" / "run-1")[0]["phase-seconds"]
