"""Simulation scale: seconds per round and peak memory as the simulated federation grows,
with the same number of sites sampled each round, on Flower's simulation engine.

    python -m simulations.scale                                  # 10, 100 and 1,000 sites
    python -m simulations.scale --sites 10 100 1000 5000 --sampled 10

Every federation trains the built-in MiniLM (LoRA r=8) for --rounds rounds; each round asks
--sampled sites to train one local epoch on their records and evaluate the new adapter.
Memory is sampled once a second over every process of the run (SuperLink, ServerApp, the
simulation's workers): the peak of their summed resident memory (shared pages counted in
each process, so an upper bound) and the largest single process. Writes
bench-results/scale.json after every federation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.precision import hardware
from server.runlog import read_rounds, run_compute, write_json
from simulations.processes import process_tree
from simulations.run import run_simulation

CONFIG = {
    "federation.rounds": 3,
    "federation.strategy": "fedavg",
    "simulation.records-per-site": 40,
    "simulation.heterogeneity": 1.0,
    "train.local-epochs": 1,
    "data.max-length": 64,
}


class PeakMemory:
    """Samples the resident memory of this process and its descendants in the background."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.total, self.largest = every, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            sizes = [_rss(pid) for pid in process_tree(os.getpid())]
            self.total = max(self.total, sum(sizes))
            self.largest = max(self.largest, max(sizes, default=0))


def _rss(pid: int) -> int:
    """Resident bytes of a process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_federation(sites: int, sampled: int, rounds: int, out: Path) -> dict[str, Any]:
    """One simulated federation of `sites` sites, `sampled` of them asked each round."""
    keys = {
        **CONFIG,
        "federation.rounds": rounds,
        "simulation.num-sites": sites,
        "simulation.data-dir": str(out / f"data-{sites}"),
        "federation.fraction-train": min(1.0, sampled / sites),
        "federation.min-sites": min(sampled, sites),
    }
    override = out / f"sites-{sites}.toml"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    started = time.monotonic()
    with PeakMemory() as memory:
        run_dir = run_simulation(
            override, None, out / f"run-{sites}", with_baselines=False, scored=False
        )
    rows = read_rounds(run_dir)
    return {
        "sites": sites,
        "sampled-per-round": rows[0]["sites-asked"],
        "round-seconds": [r["round-seconds"] for r in rows],
        "mean-round-seconds-after-round-1": round(
            sum(r["round-seconds"] for r in rows[1:]) / max(1, len(rows) - 1), 1
        ),
        "submit-to-end-seconds": round(time.monotonic() - started, 1),
        "peak-rss-mb-all-processes": round(memory.total / 2**20),
        "peak-rss-mb-largest-process": round(memory.largest / 2**20),
        "sites-ok-per-round": [r["sites-ok"] for r in rows],
        "compute": run_compute(run_dir),
        "run-dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--results", type=Path, default=Path("bench-results/scale.json"))
    args = parser.parse_args()
    out = args.out.resolve()
    rows = []
    for sites in args.sites:
        rows.append(run_federation(sites, args.sampled, args.rounds, out))
        print(rows[-1], flush=True)
        write_json(
            args.results,
            {
                "command": " ".join(["python -m simulations.scale", *sys.argv[1:]]),
                "settings": {**CONFIG, "federation.rounds": args.rounds, "sampled": args.sampled},
                "hardware": hardware(),
                "federations": rows,
            },
        )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
