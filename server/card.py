"""The model card every run writes when it ends: how its global adapter was made, in settings
and numbers only, never a record.

    RUN_DIR/model-card.json   the card's fields, for tools
    RUN_DIR/MODEL_CARD.md     the same, for people

Everything comes from what the run already keeps (run.json, metrics.jsonl, the final adapter)
and the base model's files, so a card can be written again for any finished run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.adapter import WEIGHTS_FILE
from common.files import write_atomic
from common.model import ModelError, resolve_model_path
from server.checkpoint import file_sha256
from server.runlog import read_rounds, read_run

CARD_JSON = "model-card.json"
CARD_MD = "MODEL_CARD.md"
TEST_SUMMARY = "test-summary.json"
"""A simulated run's test comparison (simulations/report.test_summary), when it has one."""
SETTINGS = ("model", "lora", "data", "train", "federation", "compression")
"""Config sections the card lists in full (privacy and secure aggregation have their own)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEADLINE = ("f1", "auroc", "accuracy", "loss", "perplexity")


def write_card(run_dir: Path) -> dict[str, Any]:
    """Write the run's card, both files; returns its fields."""
    card = build_card(run_dir)
    write_atomic(run_dir / CARD_JSON, json.dumps(card, indent=2, allow_nan=True) + "\n")
    write_atomic(run_dir / CARD_MD, render(card))
    return card


def build_card(run_dir: Path) -> dict[str, Any]:
    """The card's fields, from the run's own records."""
    record, rows = read_run(run_dir), read_rounds(run_dir)
    config: dict[str, Any] = record.get("config", {})
    return {
        "run": {
            "directory": run_dir.name,
            "flower-run-ids": record.get("flower-run-ids", []),
            "status": record.get("status", "unknown"),
            "started": _when(record.get("started")),
            "ended": _when(record.get("ended")),
            "rounds": len(rows),
            **({"stopped": record["stopped"]} if record.get("stopped") else {}),
            **(
                {"resumed-after-rounds": record["resumed-after-rounds"]}
                if record.get("resumed-after-rounds")
                else {}
            ),
        },
        "base-model": base_model(str(config.get("model.path", ""))),
        "compute": {
            "model.precision": config.get("model.precision"),
            "model.device": config.get("model.device"),
            "coordinator": record.get("compute", {}).get("coordinator"),
        },
        "init-adapter": record.get("init-adapter"),
        "settings": {
            section: {k: v for k, v in config.items() if k.startswith(section + ".")}
            for section in SETTINGS
        },
        "privacy": privacy(config, record),
        "sites": sites(rows),
        "rounds": [round_summary(row) for row in rows],
        "final": final(rows),
        "adapter": adapter(run_dir, "adapter"),
        "simulation-test": _read_json(run_dir / TEST_SUMMARY),
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def base_model(path: str) -> dict[str, Any]:
    """The base model's path and one sha256 over its weight files (names and contents)."""
    try:
        directory = resolve_model_path(path)
    except ModelError as e:
        return {"path": path, "sha256": None, "note": str(e)}
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {
        "path": path,
        "directory": str(directory),
        "weight-files": [p.name for p in files],
        "sha256": digest.hexdigest() if files else None,
    }


def privacy(config: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """What protected the sites' updates, and the epsilon spent where DP was on."""
    dp = float(config.get("privacy.noise-multiplier", 0.0)) > 0
    return {
        "differential-privacy": dp,
        **(
            {
                "noise-multiplier": config.get("privacy.noise-multiplier"),
                "clipping-norm": config.get("privacy.clipping-norm"),
                "delta": config.get("privacy.delta"),
                "max-epsilon": config.get("privacy.max-epsilon"),
                "spent": record.get("privacy"),
            }
            if dp
            else {}
        ),
        "secure-aggregation": bool(config.get("secure-aggregation.enabled", False)),
        "signed-adapters": bool(config.get("federation.signing-key", "")),
        "update-checks": {
            k: v
            for k, v in config.items()
            if k.startswith("federation.max-update") or k == "federation.max-examples"
        },
    }


def sites(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each site that trained: its name where it told one, the device and precision it
    trained in (as it told them), the rounds it was aggregated in, its training examples (as
    of its last round) and its last evaluation."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        for node, site in row.get("sites", {}).items():
            entry = seen.setdefault(node, {"name": None, "node-id": node, "rounds": 0})
            entry["name"] = site.get("name") or entry["name"]
            entry["compute"] = site.get("compute") or entry.get("compute")
            if "train" in site:
                entry["rounds"] += 1
                entry["num-examples"] = site["train"].get("num-examples")
            if site.get("evaluate"):
                entry["evaluate"] = site["evaluate"]
    return sorted(seen.values(), key=lambda s: (s["name"] is None, s["name"] or "", s["node-id"]))


def round_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "round": row["round"],
        "sites-ok": row.get("sites-ok"),
        "sites-asked": row.get("sites-asked"),
        "dropped": [d.get("reason") for d in row.get("dropped", [])],
        "train-loss": row.get("train", {}).get("train-loss"),
        "num-examples": row.get("train", {}).get("num-examples"),
        "evaluate": row.get("evaluate", {}),
        "central": row.get("central", {}),
        **({"privacy": row["privacy"]} if row.get("privacy") else {}),
    }


def final(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last federated evaluation (overall, example-weighted) and central scores."""
    evaluated = [r for r in rows if r.get("evaluate")]
    central = [r for r in rows if r.get("central")]
    return {
        "evaluated-round": evaluated[-1]["round"] if evaluated else None,
        "evaluate": evaluated[-1]["evaluate"] if evaluated else {},
        "central-round": central[-1]["round"] if central else None,
        "central": central[-1]["central"] if central else {},
    }


def adapter(run_dir: Path, name: str) -> dict[str, Any]:
    """The final adapter (RUN_DIR/NAME) and the sha256 of its weights file."""
    weights = run_dir / name / WEIGHTS_FILE
    if not weights.is_file():
        return {"directory": name, "sha256": None}
    return {"directory": name, "weights": WEIGHTS_FILE, "sha256": file_sha256(weights)}


def render(card: Mapping[str, Any]) -> str:
    """The card as Markdown."""
    run, base, fin = card["run"], card["base-model"], card["final"]
    lines = [
        f"# Model card: {run['directory']}",
        "",
        f"Federated LoRA fine-tuning with fedtune; {run['status']}, {run['rounds']} rounds "
        f"({run['started']} to {run['ended']}).",
        "",
        "## Base model",
        "",
        f"- path: `{base['path']}`",
        f"- sha256 of the weight files: `{base['sha256']}`",
    ]
    init = card.get("init-adapter")
    lines += [
        f"- started from the adapter `{init['path']}` (sha256 of its weights: "
        f"`{init.get('file-sha256')}`)"
        if init
        else "- started from a fresh adapter (lora.init-seed)",
        "",
        "## Global adapter",
        "",
        f"- `{card['adapter']['directory']}/` in PEFT layout; sha256 of its weights: "
        f"`{card['adapter']['sha256']}`",
        "",
        "## Final metrics",
        "",
    ]
    if fin["evaluate"]:
        lines.append(
            f"Federated evaluation after round {fin['evaluated-round']} (validation "
            f"splits, example-weighted): {_scores(fin['evaluate'])}"
        )
    if fin["central"]:
        lines.append(
            f"Central evaluation after round {fin['central-round']}: {_scores(fin['central'])}"
        )
    if not fin["evaluate"] and not fin["central"]:
        lines.append("No evaluation was run (federation.evaluate-every = 0, no eval-file).")
    lines += _simulation_test(card.get("simulation-test"))
    lines += [
        "",
        "## Sites",
        "",
        f"Trained with model.precision `{card['compute']['model.precision']}`; each site's "
        "device and precision as it reported them (bf16 and fp32 give different numbers).",
        "",
        "| site | computed in | rounds | training examples | last evaluation |",
        "|---|---|---|---|---|",
    ]
    for site in card["sites"]:
        name = site["name"] or f"node {site['node-id']}"
        lines.append(
            f"| {name} | {_compute(site.get('compute'))} | {site['rounds']} | "
            f"{site.get('num-examples', '')} | {_scores(site.get('evaluate', {}))} |"
        )
    coordinator = card["compute"]["coordinator"]
    if coordinator and fin["central"]:
        lines += ["", f"Central evaluation computed in {_compute(coordinator)}."]
    lines += [
        "",
        "## Rounds",
        "",
        "| round | sites | train loss | evaluation | central |",
        "|---|---|---|---|---|",
    ]
    for r in card["rounds"]:
        loss = "" if r["train-loss"] is None else f"{r['train-loss']:.4f}"
        lines.append(
            f"| {r['round']} | {r['sites-ok']}/{r['sites-asked']} | {loss} | "
            f"{_scores(r['evaluate'])} | {_scores(r['central'])} |"
        )
    lines += ["", "## Privacy", ""]
    p = card["privacy"]
    if p["differential-privacy"]:
        spent = p.get("spent") or {}
        lines.append(
            f"- client-level DP: noise multiplier {p['noise-multiplier']}, clipping "
            f"norm {p['clipping-norm']}, delta {p['delta']}; epsilon spent "
            f"{spent.get('epsilon', 'unknown')}"
        )
    else:
        lines.append("- differential privacy: off")
    lines += [
        f"- secure aggregation: {'on' if p['secure-aggregation'] else 'off'}",
        f"- adapters signed by the coordinator: {'yes' if p['signed-adapters'] else 'no'}",
        "",
        "## Settings",
        "",
    ]
    for section, values in card["settings"].items():
        shown = ", ".join(f"`{k.split('.', 1)[1]}` {_value(v)}" for k, v in values.items())
        lines.append(f"- **{section}**: {shown}")
    lines += ["", "No record content is kept in this card: settings, counts and metrics only.", ""]
    return "\n".join(lines)


def _simulation_test(summary: Mapping[str, Any] | None) -> list[str]:
    """A simulated run's test comparison: every site's test records pooled, each model's F1
    and AUROC with its 95% bootstrap interval."""
    if not summary:
        return []
    lines = [
        "",
        "Simulation: every site's held-out test records pooled; 95% bootstrap intervals.",
        "",
        "| model | F1 | AUROC |",
        "|---|---|---|",
    ]
    for name, found in summary.items():
        cells = []
        for metric in ("f1", "auroc"):
            value = found.get("pooled", {}).get(metric)
            cells.append(
                f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"
                if value and all(_number(v) for v in value)
                else "n/a"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _compute(compute: Mapping[str, Any] | None) -> str:
    if not compute:
        return "not reported"
    return f"{compute.get('device')}, {compute.get('precision')}"


def _scores(metrics: Mapping[str, Any]) -> str:
    shown = [f"{k} {metrics[k]:.4f}" for k in HEADLINE if _number(metrics.get(k))]
    return ", ".join(shown)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _value(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else json.dumps(value)


def _when(seconds: object) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
