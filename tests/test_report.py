"""The run report: federated against the baselines per site, the rounds, and PNG plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from common.config import load_config
from simulations.report import (
    SiteScore,
    _site_names,
    comparison,
    plot_rounds,
    read_rounds,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _score(site: str, records: int, f1: float, auroc: float) -> SiteScore:
    return SiteScore(site, records, {"f1": f1, "auroc": auroc, "accuracy": 0.5, "loss": 0.7})


FEDERATED = [_score("site-1", 10, 0.5, 0.6), _score("site-2", 30, 0.8, 0.9)]
LOCAL = [_score("site-1", 10, 0.4, 0.55), _score("site-2", 30, 0.6, 0.7)]


def _rounds() -> list[dict]:
    """Three rounds in the server's metrics.jsonl schema; round 2 had no evaluation."""
    rows = []
    for r in (1, 2, 3):
        rows.append(
            {
                "round": r,
                "seconds": 10.0 * r,
                "round-seconds": 10.0,
                "sites-asked": 3,
                "sites-ok": 3 if r != 2 else 2,
                "dropped": [] if r != 2 else [{"node": 7, "reason": "non-finite update"}],
                "bytes-up": 3_000_000,
                "bytes-down": 1_500_000 * r,
                "train": {"train-loss": 0.7 - 0.1 * r, "num-examples": 120},
                "evaluate": {} if r == 2 else {"f1": 0.2 * r, "auroc": 0.5 + 0.1 * r},
                "central": {"f1": 0.25 * r} if r == 3 else {},
                "sites": {
                    "11": {"train": {"train-loss": 0.8 - 0.1 * r}, "evaluate": {}},
                    "12": {"train": {"train-loss": 0.6 - 0.1 * r}, "evaluate": {}},
                },
            }
        )
    return rows


def _write_rounds(run_dir: Path, rows: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_comparison_puts_three_approaches_side_by_side_with_a_weighted_mean() -> None:
    lines = comparison(FEDERATED, {"local": LOCAL, "centralized": None})
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == [
        "site",
        "test records",
        "federated F1",
        "federated AUROC",
        "local only F1",
        "local only AUROC",
        "centralised F1",
        "centralised AUROC",
    ]
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    site_1 = [c.strip() for c in rows["site-1"].strip("|").split("|")]
    assert site_1[1:] == ["10", "0.500", "0.600", "0.400", "0.550", "not run", "not run"]
    mean = [c.strip() for c in rows["**all (weighted)**"].strip("|").split("|")]
    # record-weighted: (0.5 x 10 + 0.8 x 30) / 40, not the plain mean 0.65
    assert mean[1:6] == ["40", "0.725", "0.825", "0.550", "0.662"]
    assert mean[6:] == ["not run", "not run"]
    hint = [line for line in lines if "not run with these settings" in line]
    assert hint == [
        "centralised: not run with these settings and data; run "
        "`fedtune-sim baseline --mode centralized`"
    ]


def test_comparison_without_baselines_names_the_command_for_each() -> None:
    lines = comparison(FEDERATED, None, command="fedtune-sim baseline --config x.toml")
    assert lines[2].count("not run") == 4
    assert any("`fedtune-sim baseline --config x.toml --mode local`" in line for line in lines)
    assert any("--mode centralized`" in line for line in lines)


def test_comparison_of_a_language_model_task_shows_loss_and_perplexity() -> None:
    lm = [SiteScore("site-1", 5, {"loss": 1.5, "perplexity": 4.48})]
    lines = comparison(lm, {"local": lm, "centralized": lm})
    assert "federated loss" in lines[0] and "centralised perplexity" in lines[0]
    assert "| site-1 | 5 | 1.500 | 4.480 | 1.500 |" in lines[2]


def test_report_has_the_table_rounds_and_valid_png_plots(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-007"
    _write_rounds(run_dir, _rounds())
    cfg = load_config({"federation.rounds": 3})
    report = write_report(run_dir, FEDERATED, cfg, {"local": LOCAL, "centralized": None})
    text = report.read_text()
    assert "| site | test records | federated F1 | federated AUROC | local only F1" in text
    assert "`fedtune-sim baseline --mode centralized`" in text
    assert "federated training at sites that did not report it" in text  # no run.json here
    assert "model.precision `auto`" in text and "here, cpu, fp32" in text
    # the rounds table: sites ok/asked, dropped count, totals in MB up and down
    assert "| 2 | 2/3 | 1 | 0.5000 | n/a | n/a | n/a | 3.00 | 3.00 | 10.0 |" in text
    assert "| 3 | 3/3 | 0 | 0.4000 | 0.600 | 0.800 | 0.750 | 3.00 | 4.50 | 10.0 |" in text
    links = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", text)
    assert sorted(links) == ["plots/evaluation.png", "plots/traffic.png", "plots/train-loss.png"]
    for link in links:
        _assert_png(run_dir / link)


def test_report_tolerates_missing_keys_old_rows_and_a_torn_last_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-001"
    rows = [
        {"round": 1, "train": {"train-loss": 0.69, "sites": 2, "bytes-up": 1_000_000}},
        {"round": 2, "train": {}, "evaluate": {}},
    ]
    _write_rounds(run_dir, rows, tail='{"round": 3, "train": {"tr')
    assert [r["round"] for r in read_rounds(run_dir)] == [1, 2]
    text = write_report(run_dir, FEDERATED, load_config({})).read_text()
    assert "| 1 | 2 | n/a | 0.6900 | n/a | n/a | n/a | 2.00 | n/a | n/a |" in text
    assert "plots/train-loss.png" in text and "plots/traffic.png" in text
    assert "plots/evaluation.png" not in text  # nothing was evaluated: no empty plot
    assert not (run_dir / "plots" / "evaluation.png").exists()


def test_report_without_metrics_says_so_and_plots_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-002"
    run_dir.mkdir()
    text = write_report(run_dir, FEDERATED, load_config({})).read_text()
    assert "No rounds recorded" in text and "![" not in text
    assert "| site-2 | 30 | 0.800 | 0.900 | not run |" in text


def test_a_resumed_round_logged_twice_counts_once(tmp_path: Path) -> None:
    rows = _rounds()
    again = dict(rows[1], **{"train": {"train-loss": 0.1}})
    _write_rounds(tmp_path, [rows[0], rows[1], again, rows[2]])
    found = read_rounds(tmp_path)
    assert [r["round"] for r in found] == [1, 2, 3]
    assert found[1]["train"]["train-loss"] == pytest.approx(0.1)
    plots = plot_rounds(found, tmp_path / "plots")
    assert set(plots) == {"Train loss", "Evaluation", "Traffic"}
    for path in plots.values():
        _assert_png(path)


def test_plots_name_sites_by_the_names_they_told() -> None:
    rows = _rounds()
    rows[1]["sites"]["11"]["name"] = "st-marys"
    assert _site_names(rows) == {"11": "st-marys", "12": "node 12"}
