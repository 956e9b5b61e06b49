"""The training benchmark runs end to end (on a tiny model) and writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.bench_train import IMPLEMENTATIONS, SFT_IMPLEMENTATIONS, main


@pytest.mark.slow
def test_bench_train_writes_side_by_side_figures(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--steps", "2", "--repeats", "1", "--model", str(tiny_bert_dir), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(IMPLEMENTATIONS)
    for figures in report["results"].values():
        assert figures["examples"] == 2 * 16
        assert figures["examples_per_s"] > 0 and figures["tokens_per_s"] > 0
        assert 0 <= figures["padding_share"] < 1 and figures["peak_rss_mb"] > 0
    assert report["ratio_examples_per_s_vs_trainer"] > 0


@pytest.mark.slow
def test_bench_train_compares_instruction_tuning_with_sft_trainer(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--task", "causal-lm", "--steps", "2", "--batch-size", "4", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(SFT_IMPLEMENTATIONS)
    for figures in report["results"].values():
        assert figures["examples"] == 2 * 4
        assert 0 < figures["tokens"] <= 2 * 4 * 256
    assert report["ratio_examples_per_s_vs_sft_trainer"] > 0
