"""Round wall time in deployment next to the same config in simulation, and what Flower's
per-message ClientApp process costs with and without the site's warm worker.

    python -m simulations.bench_deploy --out bench-results/deployment.json

1. `clientapp-process`: seconds for a fresh Python process to get ready for one message:
   importing the ClientApp that forwards to the warm worker, against importing torch,
   transformers, peft and our training code and loading the base model and the site's data
   (what every message pays when the ClientApp does the work itself).
2. Rounds of the default settings (MiniLM, 3 synthetic sites, one torch thread per site):
   on Flower's simulation engine (`fedtune-sim run`), then deployed on 127.0.0.1 with TLS and
   site authentication (`fedtune-server`, `fedtune-site`) with the warm worker and without;
   for each, the round overhead (simulations/overhead.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORWARD = "import client.app, client.worker"
LOAD = (
    "from pathlib import Path; from client.rounds import load_site, build_model; "
    "from common.config import load_config; cfg = load_config(dict()); build_model(cfg); "
    "load_site(Path({data!r}), cfg)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/deployment.json"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="process start measurements")
    args = parser.parse_args(argv)

    from common.config import load_config
    from common.precision import hardware
    from server.submit import app_defaults
    from simulations.federation import ensure_federation

    keys = {"federation.rounds": args.rounds, "train.num-threads": 1}
    data = ensure_federation(load_config({**app_defaults(), **keys}))
    result: dict[str, Any] = {
        "command": f"python -m simulations.bench_deploy --rounds {args.rounds}",
        "machine": {"platform": platform.platform(), **hardware()},
        "settings": keys,
        "clientapp-process": _process_start(data / "site-1" / "train.jsonl", args.repeats),
    }
    print(json.dumps(result["clientapp-process"]))
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as scratch:
        root = Path(scratch)
        config = root / "settings.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
        result["simulation"] = _simulation(config, root / "sim")
        print("simulation", json.dumps(result["simulation"]))
        variants = {"deployment-warm-worker": (), "deployment-no-worker": ("--worker", "none")}
        for name, site_args in variants.items():
            result[name] = _deployment(root / name, data, config, site_args)
            print(name, json.dumps(result[name]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _process_start(data: Path, repeats: int) -> dict[str, float]:
    """Median seconds of a fresh interpreter running each preparation."""
    codes = {"forward-to-worker": FORWARD, "load-in-process": LOAD.format(data=str(data))}
    times: dict[str, list[float]] = {name: [] for name in codes}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(repeats):
        for name, code in codes.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            times[name].append(time.perf_counter() - started)
    return {name: round(sorted(ts)[len(ts) // 2], 2) for name, ts in times.items()}


def _simulation(config: Path, out: Path) -> dict[str, Any]:
    from simulations.run import run_simulation

    started = time.perf_counter()
    run_dir = run_simulation(config, sites=3, out=out, with_baselines=False)
    return _rounds(run_dir, time.perf_counter() - started)


def _deployment(root: Path, data: Path, config: Path, site_args: tuple[str, ...]) -> dict[str, Any]:
    from simulations.localdeploy import LocalDeployment

    root.mkdir(parents=True)
    deployment = LocalDeployment(root, data)
    try:
        deployment.create(sites=3, site_args=site_args)
        started = time.perf_counter()
        done = deployment.server("run", "--config", str(config))
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"deployed run failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        (run_dir,) = deployment.home.runs.glob("run-*")
        return _rounds(run_dir, seconds)
    finally:
        deployment.stop()


def _rounds(run_dir: Path, total: float) -> dict[str, Any]:
    from server.runlog import read_rounds
    from simulations.overhead import round_overhead

    rows = read_rounds(run_dir)
    per_round = [r["round-seconds"] for r in rows]
    overhead = round_overhead(rows)
    return {
        "round-seconds": per_round,
        "mean-round-seconds": round(sum(per_round) / len(per_round), 1),
        "submit-to-end-seconds": round(total, 1),
        "final-val-f1": rows[-1]["evaluate"].get("f1"),
        "overhead-share": overhead["overhead-share"],
        "overhead-share-after-round-1": overhead["overhead-share-after-round-1"],
        "overhead-per-round": overhead["rounds"],
    }


if __name__ == "__main__":
    sys.exit(main())
