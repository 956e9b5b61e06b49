"""fedtune-sim: synthetic federations (`fedtune-sim data --sites 3 --out data/synth`), runs and
baselines (`fedtune-sim baseline --mode both`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from simulations.synth import MAX_HETEROGENEITY, write_federation


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number from low to high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune-sim", description="Synthetic federations and simulation runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser(
        "data",
        help="write a synthetic federation of hospital discharge notes",
        description="Write OUT/site-N/{train,test,instruct-train,instruct-test}.jsonl and "
        "OUT/federation.json. The same arguments always give identical files.",
    )
    data.add_argument("--sites", type=_at_least(1), required=True, help="number of sites")
    data.add_argument("--out", type=Path, required=True, help="output directory")
    data.add_argument("--seed", type=_at_least(0), default=0, help="random seed (default 0)")
    data.add_argument(
        "--records",
        type=_at_least(1),
        default=None,
        help="mean train records per site; sizes vary around it (default 575)",
    )
    data.add_argument(
        "--test-records",
        type=_at_least(1),
        default=200,
        help="held-out test records per site (default 200)",
    )
    data.add_argument(
        "--heterogeneity",
        type=_between(0, MAX_HETEROGENEITY),
        default=1.0,
        help="how much sites differ in case mix, prevalence, size and note style: 0 makes "
        "them alike (IID), 1 is the default spread, larger is more non-IID (default 1)",
    )
    run = sub.add_parser(
        "run",
        help="run a simulated federation on Flower's simulation engine",
        description="Make the federation ready (the synthetic one written if missing; or "
        "simulation.data-dir's site folders, only read; or simulation.records-file split into "
        "sites under --out), run the Flower app on it with a private local SuperLink, and stop "
        "that SuperLink afterwards.",
    )
    run.add_argument("--config", type=Path, help="TOML file overriding the default settings")
    run.add_argument(
        "--sites",
        type=_at_least(1),
        help="simulated sites (default: simulation.num-sites, 3)",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path("runs/sim"),
        help="where the run writes its outputs (default runs/sim)",
    )
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last good checkpoint, with its own settings",
    )
    run.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip personalisation and training the baselines and references (baselines "
        "and references are reused when present)",
    )
    _add_baseline(sub)
    return parser


def _add_baseline(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    baseline = sub.add_parser(
        "baseline",
        help="train the baselines and references a federation is compared with",
        description="Train each site alone (local) and one model on all sites' records pooled "
        "(centralized), with the federation's budget of passes over every record; fit the "
        "references TF-IDF + logistic regression (tfidf) and a logistic regression on the "
        "frozen base model's mean-pooled embeddings (probe) on all sites' training records; "
        "score each on every site's test file. Results go to OUT/baseline-MODE.json, where "
        "`fedtune-sim run` with the same --out, settings and data finds them.",
    )
    baseline.add_argument(
        "--mode",
        choices=("centralized", "local", "tfidf", "probe", "both", "references", "all"),
        required=True,
        help="which baseline to train: both (local and centralized), references (tfidf and "
        "probe, classification only), or all",
    )
    baseline.add_argument("--config", type=Path, help="TOML file overriding the default settings")
    baseline.add_argument(
        "--out",
        type=Path,
        default=Path("runs/sim"),
        help="where to write baseline-MODE.json (default runs/sim, as fedtune-sim run)",
    )
    baseline.add_argument(
        "--force",
        action="store_true",
        help="train again even when OUT holds a baseline of the same settings and data",
    )


def _baseline(args: argparse.Namespace) -> int:
    from common.config import ConfigError, load_config
    from server.submit import app_defaults
    from simulations.baseline import LORA_MODES, load_baseline, modes_for, train_baselines
    from simulations.federation import prepare_federation
    from simulations.references import REFERENCES
    from simulations.report import APPROACHES, table
    from simulations.run import SimulationError

    results = {}
    try:
        cfg = load_config(app_defaults(), args.config)
        groups = {"both": LORA_MODES, "references": REFERENCES, "all": modes_for(cfg)}
        modes = groups.get(args.mode, (args.mode,))
        data_dir = prepare_federation(cfg, args.out, synthesise=False).directory
        missing = []
        for mode in modes:
            results[mode] = None if args.force else load_baseline(args.out, cfg, data_dir, mode)
            if results[mode] is not None:
                print(f"{mode}: reusing {args.out / f'baseline-{mode}.json'} (same settings, data)")
            else:
                missing.append(mode)
        for path, mode in zip(
            train_baselines(missing, cfg, data_dir, args.out, progress=print), missing, strict=True
        ):
            results[mode] = load_baseline(path, cfg, data_dir, mode)
            print(f"{mode}: wrote {path}")
    except (ConfigError, SimulationError, ValueError, OSError) as e:
        print(f"fedtune-sim baseline: error: {e}", file=sys.stderr)
        return 1
    for mode, scores in results.items():
        print(f"\n{APPROACHES[mode]} baseline on each site's held-out test file:")
        print("\n".join(table(scores or [])))
    return 0


def _run(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from common.files import StorageError
    from common.flower import FlowerProcessError
    from common.records import DataError
    from common.sitefiles import FederationError
    from server.checkpoint import CheckpointError
    from server.submit import SubmitError
    from simulations.baseline import BaselineError
    from simulations.run import run_simulation

    if args.resume and (args.config or args.sites):
        print("fedtune-sim run: --resume uses the run's own settings; drop --config and --sites")
        return 2
    try:
        out = run_simulation(args.config, args.sites, args.out, args.resume, not args.no_baselines)
    except (
        ConfigError,
        StorageError,
        FlowerProcessError,
        SubmitError,
        CheckpointError,
        BaselineError,
        FederationError,
        DataError,
    ) as e:
        print(f"fedtune-sim run: {e}", file=sys.stderr)
        return 1
    print(f"run outputs in {out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    try:
        summary = write_federation(
            args.out,
            num_sites=args.sites,
            seed=args.seed,
            records_per_site=args.records,
            test_records=args.test_records,
            heterogeneity=args.heterogeneity,
        )
    except ValueError as e:
        print(f"fedtune-sim data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename or args.out
        print(f"fedtune-sim data: error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{'site':<10}{'train':>7}{'test':>6}{'prevalence':>12}{'words':>7}  style")
    for site in summary.sites:
        print(
            f"{site.name:<10}{site.train_records:>7}{site.test_records:>6}"
            f"{site.prevalence:>12.3f}{site.mean_words:>7.1f}  {site.dominant_style}"
        )
    print(f"wrote {len(summary.sites)} sites to {summary.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of fedtune-sim."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "baseline":
        return _baseline(args)
    return _data(args) if args.command == "data" else _run(args)


if __name__ == "__main__":
    sys.exit(main())
