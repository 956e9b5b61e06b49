"""A long run does not grow in memory: 24 simulated sites for 24 rounds through the real
ServerApp and ClientApp handlers in one process. Python allocations (Flower's records,
NumPy arrays, the run's history) are traced, and the process's RSS read, at the start of
every round; once the first rounds have filled the caches (per-site data, transformers'
shape-keyed caches), both must stay flat: far below what keeping one round's replies, or a
model per site, would add."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from flwr.app import Message
from test_federation import HandlerGrid, _config, _run

pytestmark = [pytest.mark.usefixtures("task_identity"), pytest.mark.slow]
SITES = 24
ROUNDS = 24
WARM_UP = 12  # rounds that fill per-site caches (data, tokenised batches) and allocator pools


class MeasuringGrid(HandlerGrid):
    """Records the traced Python memory (after a collection) when each round's training
    is sent."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.traced: list[int] = []
        self.payload: list[int] = []
        self.rss: list[int] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            # Retained memory, not cycles that wait for the collector: when those go
            # depends on what ran before in the same process (the rest of the suite).
            gc.collect()
            self.traced.append(tracemalloc.get_traced_memory()[0])
            self.rss.append(_rss())
            self.payload.append(0)
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        trained = [r for r in replies if r.metadata.message_type == "train" and r.has_content()]
        self.payload[-1] += sum(r.content["arrays"].count_bytes() for r in trained)
        return replies


def test_memory_stays_flat_over_many_rounds_and_sites(
    tiny_bert_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in text_file.read_text().splitlines()]
    sites = {
        1000 + n: write_jsonl(tmp_path / f"site-{n}.jsonl", rows[n::SITES]) for n in range(SITES)
    }
    config = _config(
        tiny_bert_dir,
        tmp_path / "runs",
        **{
            "federation.rounds": ROUNDS,
            "federation.evaluate-every": 4,
            "train.local-steps": 1,
            "train.batch-size": 4,
            "data.val-fraction": 0.25,
        },
    )
    grid = MeasuringGrid(config, sites)
    tracemalloc.start()
    try:
        _run(grid)
    finally:
        tracemalloc.stop()
    metrics = (tmp_path / "runs" / "run-1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["sites-ok"] for line in metrics] == [SITES] * ROUNDS

    steady = np.array(grid.traced[WARM_UP:], dtype=float)
    rss = np.array(grid.rss[WARM_UP:], dtype=float)
    rounds = np.arange(len(steady))
    traced_slope = np.polyfit(rounds, steady, 1)[0]
    rss_slope = np.polyfit(rounds, rss, 1)[0]
    one_round_of_replies = float(np.mean(grid.payload))
    print(
        f"after {WARM_UP} rounds, per round: traced {traced_slope / 1e3:+.1f} kB, "
        f"RSS {rss_slope / 1e3:+.1f} kB; one round's replies: {one_round_of_replies / 1e3:.0f} kB"
    )
    # Keeping one round's replies (or the metrics history, before it moved to disk) would
    # add about a round's replies per round; keeping a model per site, megabytes.
    assert traced_slope < 0.1 * one_round_of_replies
    half = len(steady) // 2
    assert abs(steady[half:].mean() - steady[:half].mean()) < 0.5 * one_round_of_replies
    assert rss_slope < 1e6


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
