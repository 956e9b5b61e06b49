"""One experiment config run with a few keys changed, and its test F1 after every round: what
the side-by-side benchmarks (lora_modes, wire_formats) are made of."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.config import load_config
from server.runlog import read_rounds, read_run
from simulations.run import run_simulation
from simulations.scoring import score_sites, weighted_mean


def run_variant(config: Path, keys: dict[str, object], out: Path, name: str) -> tuple[Path, float]:
    """Run `config` with `keys` set (under OUT/NAME, no baselines); its run directory and
    wall seconds."""
    override = out / f"{name}.toml"
    override.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for line in config.read_text().splitlines() if line and line[0] != "#"]
    lines = [line for line in lines if line.split(" = ")[0] not in keys]
    override.write_text("\n".join([*lines, *(f"{k} = {json.dumps(v)}" for k, v in keys.items())]))
    started = time.monotonic()
    run_dir = run_simulation(override, None, out / name, with_baselines=False)
    return run_dir, time.monotonic() - started


def f1_per_round(run_dir: Path) -> list[float]:
    """The record-weighted F1 of each round's checkpointed adapter on every site's test file."""
    cfg = load_config(read_run(run_dir)["config"])
    data_dir = Path(cfg.simulation.data_dir)
    return [
        weighted_mean(
            score_sites(run_dir / "checkpoints" / f"round-{r['round']:04d}", cfg, data_dir)
        )["f1"]
        for r in read_rounds(run_dir)
    ]
