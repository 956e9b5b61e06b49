"""`fedtune-site`: check data, train locally, join a federation and use its adapter, at a site.

fedtune-site check --data notes.jsonl
fedtune-site train --data notes.jsonl --epochs 3 --out adapter/
fedtune-site predict --adapter run/adapter --data new-notes.jsonl --out predictions.jsonl
fedtune-site evaluate --adapter run/adapter --data notes.jsonl --group-by age_band,sex
fedtune-site keygen                                  # the site's key pair; send site.pub
fedtune-site start --superlink fl.example.org:443 --ca ca.pem --coordinator-key signing.pub \
    --data notes.jsonl
fedtune-site sent                                    # what this site sent in the last round
fedtune-site audit audit.jsonl --coordinator-key signing.pub   # check the coordinator's log
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import ConfigError, FedtuneConfig, load_config
from common.keyfiles import KeyFileError
from common.records import DataError, Record, Row, read_rows, string_fields, validate_rows

if TYPE_CHECKING:
    from tqdm import tqdm

    from common.lengths import Lengths

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_IDENTIFIERS = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedtune-site`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.run(args))
    except BrokenPipeError:  # the reader stopped early (`fedtune-site sent | head`): fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return EXIT_OK
    except (ConfigError, DataError, KeyFileError, ValueError, OSError) as e:
        print(f"fedtune-site {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"fedtune-site {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune-site", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a data file and scan it for likely identifiers",
        description="Validate every record and scan the text for likely identifiers (names "
        "with titles, dates of birth, dates, phone numbers, e-mail addresses, record and "
        "social security numbers). Reports kinds, counts and row numbers, never the text. "
        "Exit code: 0 valid and clean, 1 invalid data, 3 valid but identifiers found.",
    )
    _data_args(check)
    check.set_defaults(run=_check)

    train = commands.add_parser(
        "train",
        help="fine-tune locally on one data file (no federation)",
        description="Split the file (train/validation/test, seeded), train the LoRA adapter "
        "and print validation metrics after every epoch.",
    )
    _data_args(train)
    train.add_argument(
        "--epochs", type=int, help="passes over the training split (default: train.local-epochs)"
    )
    train.add_argument(
        "--test",
        type=Path,
        help="held-out file to score at the end (default: the test split of --data)",
    )
    train.add_argument("--out", type=Path, help="write the trained adapter here (PEFT layout)")
    train.add_argument("--metrics", type=Path, help="write the per-epoch metrics here (JSON)")
    train.set_defaults(run=_train)

    predict = commands.add_parser(
        "predict",
        help="predict with an adapter on local records (no labels needed)",
        description="Load the base model of the settings with the adapter in --adapter (its "
        "LoRA shape read from its adapter_config.json) and write one JSON line per record to "
        "--out, in input order: the record's line, its id field if it has one, and the "
        "predicted label with its probability and every class's (classification), or the "
        "generated completion (causal-lm). The input text is never written.",
    )
    _adapter_args(predict)
    predict.add_argument(
        "--out", type=Path, required=True, help="the predictions, one JSON line per record"
    )
    generation = predict.add_argument_group("generation (model.task causal-lm)")
    generation.add_argument(
        "--max-new-tokens", type=int, default=64, help="most tokens generated per record"
    )
    generation.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (deterministic); above: sampled"
    )
    generation.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the top-p probability mass"
    )
    generation.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="score an adapter on local labelled records, overall and per subgroup",
        description="Print the adapter's metrics on every record of --data (as `train` "
        "prints them), then, for each --group-by column, a table per value of the column: "
        "records and metrics, so that a group the model serves worse shows before it is "
        "deployed. Groups too small to judge (fewer than 20 records) or with a single class "
        "are flagged instead of scored. Group values are printed: name category columns.",
    )
    _adapter_args(evaluate)
    evaluate.add_argument(
        "--group-by",
        type=_columns,
        default=[],
        metavar="COLUMNS",
        help="comma-separated fields to group records by, e.g. age_band,sex (default: none)",
    )
    evaluate.add_argument("--out", type=Path, help="write the metrics and groups here (JSON)")
    evaluate.set_defaults(run=_evaluate)

    personalise = commands.add_parser(
        "personalise",
        help="adapt a global adapter to this site's records, if that makes it better here",
        description="Start from the adapter in --adapter (a federation's global adapter), "
        "train it --epochs more passes over the training split of --data, and keep the "
        "result only if it scores better on the validation split (AUROC; loss for "
        "causal-lm) than the adapter as it came; write whichever is kept to --out.",
    )
    personalise.add_argument(
        "--adapter", type=Path, required=True, help="the global adapter (PEFT layout)"
    )
    _data_args(personalise)
    personalise.add_argument(
        "--epochs", type=int, default=1, help="passes over the training split (default 1)"
    )
    personalise.add_argument(
        "--out", type=Path, required=True, help="write the kept adapter here (PEFT layout)"
    )
    personalise.set_defaults(run=_personalise)

    keygen = commands.add_parser(
        "keygen",
        help="create the site's key pair (send site.pub to the coordinator)",
        description="Write HOME/site.key (ECDSA, OpenSSH format, mode 0600; it never leaves "
        "this machine) and HOME/site.pub, which the coordinator registers. Read the printed "
        "fingerprint to the coordinator over a second channel.",
    )
    _home_arg(keygen)
    keygen.set_defaults(run=_keygen)

    start = commands.add_parser(
        "start",
        help="check the data, then join the federation (runs the SuperNode)",
        description="Validate --data as `check` does (invalid records, and likely "
        "identifiers unless --allow-identifiers, stop here), then run flower-supernode in "
        "the foreground: TLS verified against --ca, authenticated with the site's key, the "
        "data path given as node config. The data never leaves this machine; only adapter "
        "updates and numeric metrics go to the coordinator.",
    )
    _data_args(start)
    _home_arg(start)
    start.add_argument("--superlink", required=True, help="the coordinator's address, HOST:PORT")
    start.add_argument(
        "--ca", type=Path, required=True, help="the coordinator's CA certificate (ca.pem)"
    )
    start.add_argument(
        "--coordinator-key",
        type=Path,
        help="the coordinator's public signing key (its signing.pub): the site refuses any "
        "global adapter whose signature does not verify against it",
    )
    start.add_argument("--key", type=Path, help="private key (default: HOME/site.key)")
    start.add_argument(
        "--name",
        default="",
        help="the name this site goes by in the run's model card, e.g. st-marys (the name "
        "the coordinator registered it under); without it the card shows the node id",
    )
    start.add_argument(
        "--lora-rank",
        type=_rank,
        default=0,
        help="train at this LoRA rank instead of the run's lora.rank (less memory and compute "
        "at a small site); replies still travel at the run's rank (docs: LORA.md)",
    )
    start.add_argument(
        "--port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    start.add_argument("--host", default="127.0.0.1", help="address of the SuperNode's runtime API")
    start.add_argument(
        "--isolation",
        choices=("subprocess", "process"),
        default="subprocess",
        help="subprocess: the SuperNode runs the ClientApp itself; process: a separately "
        "started flower-superexec does (containers)",
    )
    start.add_argument(
        "--worker",
        choices=("start", "none"),
        default="start",
        help="start: a warm worker keeps torch, the model and the data loaded across rounds "
        "(default; the ClientApp process Flower starts per message only forwards to it); "
        "none: every message's ClientApp process loads everything itself",
    )
    start.add_argument(
        "--worker-socket",
        type=Path,
        help="socket of a worker started separately with `python -m client.worker` "
        "(containers); default: HOME/run/worker.sock",
    )
    start.add_argument(
        "--allow-identifiers",
        action="store_true",
        help="join even when the scan finds likely identifiers (after you have reviewed them)",
    )
    start.set_defaults(run=_start)

    sent = commands.add_parser(
        "sent",
        help="show what this site sent: tensor names, shapes and norms, and metrics",
        description="Print, from HOME/sent.jsonl, every reply of the last round this site "
        "took part in, as it left: tensor names, dtypes, shapes and L2 norms, the numeric "
        "metrics, the size, and the sha256 of the global adapter it had received.",
    )
    _home_arg(sent)
    sent.add_argument("--all", action="store_true", help="every reply recorded, oldest first")
    sent.set_defaults(run=_sent)

    audit = commands.add_parser(
        "audit",
        help="verify a run's audit log and match it with the adapters this site received",
        description="Check the coordinator's audit.jsonl line by line (hash chain and Ed25519 "
        "signatures), print each round's contributors and drops, and check that every "
        "adapter this site received (HOME/sent.jsonl) is one the log records.",
    )
    audit.add_argument("log", type=Path, help="the run's audit.jsonl, from the coordinator")
    audit.add_argument(
        "--coordinator-key", type=Path, required=True, help="the coordinator's signing.pub"
    )
    _home_arg(audit)
    audit.set_defaults(run=_audit)
    return parser


def _rank(text: str) -> int:
    rank = int(text)
    if not 1 <= rank <= 1024:
        raise argparse.ArgumentTypeError(f"--lora-rank must be from 1 to 1024, got {rank}")
    return rank


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="JSONL, CSV or Parquet file")
    parser.add_argument("--config", type=Path, help="TOML file overriding the default settings")
    parser.add_argument(
        "--task", choices=("classification", "causal-lm"), help="shorthand for model.task"
    )


def _adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        type=Path,
        required=True,
        help="adapter directory (PEFT layout): a run's RUN_DIR/adapter or `train --out`",
    )
    _data_args(parser)
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=0,
        help="records per batch (default: twice train.batch-size)",
    )


def _batch_size(text: str) -> int:
    size = int(text)
    if not 1 <= size <= 4096:
        raise argparse.ArgumentTypeError(f"--batch-size must be from 1 to 4096, got {size}")
    return size


def _columns(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _home_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, help="the site's directory (default: ~/.fedtune/site)")


def _config(args: argparse.Namespace) -> FedtuneConfig:
    keys = {"model.task": args.task} if args.task else {}
    return load_config(keys, args.config)


def _check(args: argparse.Namespace) -> int:
    from client.phi import scan_rows

    cfg = _config(args)
    rows: list[Row] = list(read_rows(args.data))
    records, problems = validate_rows(iter(rows), cfg.model, cfg.data)
    report = scan_rows((r.number, string_fields(r.fields)) for r in rows if r.fields)
    name = args.data.name
    if problems or not records:
        print(DataError(args.data, problems or ["no records in the file"]))
    else:
        print(f"{name}: {len(records)} records, valid for {cfg.model.task}")
        labels = Counter(getattr(r, "label", None) for r in records)
        if None not in labels:
            names = cfg.data.label_list
            shares = ", ".join(
                f"{names[k] if names else k}: {n} ({n / len(records):.0%})"
                for k, n in sorted(labels.items())
            )
            print(f"  labels: {shares}")
        print(f"  {_lengths(records, cfg).summary()}")
    if report.clean:
        print(f"{name}: no likely identifiers found in {report.rows_scanned} records")
    else:
        print(f"{name}: likely identifiers found (kinds, counts and rows; text not shown):")
        for line in report.summary():
            print(f"  {line}")
        print("  Remove or mask them before this site joins a federation.")
    if problems or not records:
        return EXIT_INVALID
    return EXIT_OK if report.clean else EXIT_IDENTIFIERS


def _lengths(records: list[Record], cfg: FedtuneConfig) -> Lengths:
    from common.lengths import measure_lengths
    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    return measure_lengths(records, tokenizer, cfg.data.max_length, cfg.data.truncation)


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from client.dataset import load_site
    from client.train import schedule_over, train_local
    from common.adapter import get_adapter_state, save_adapter
    from common.evaluation import evaluate, load_eval_file
    from common.files import check_writable, write_atomic
    from common.model import build_model, set_threads
    from common.precision import compute_of

    cfg = _config(args)
    epochs = args.epochs or cfg.train.local_epochs
    if epochs < 1:
        raise ValueError("--epochs must be at least 1")
    for flag, path in (("--out", args.out), ("--metrics", args.metrics)):
        if path is not None:  # refuse a path it cannot write before training, not after
            check_writable(path.parent, flag)
    threads = set_threads(cfg.train.num_threads)
    site = load_site(args.data, cfg)
    if len(site.val) == 0:
        raise ValueError("data.val-fraction leaves no validation records; raise it")
    run_cfg, per_epoch = schedule_over(cfg, len(site.train), epochs, local_epochs=1)
    print(
        f"{args.data.name}: {len(site.train)} train, {len(site.val)} validation, "
        f"{len(site.test)} test records; {epochs} epochs of {per_epoch} steps on "
        f"{threads} threads"
    )
    print(f"  {site.lengths.summary()}")
    model = build_model(run_cfg)
    compute = compute_of(model, run_cfg.model)
    print(f"computing on {compute.describe()}")
    history = [{"epoch": 0, **evaluate(model, site.val, run_cfg)}]
    print(_line("untrained", history[0], run_cfg))
    for epoch in range(1, epochs + 1):
        with tqdm(
            total=per_epoch,
            desc=f"epoch {epoch}/{epochs}",
            unit="step",
            leave=False,
            file=sys.stderr,
        ) as bar:

            def advance(step: int, loss: float, bar: tqdm = bar) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            result = train_local(
                model, site.train, run_cfg, start_step=(epoch - 1) * per_epoch, on_step=advance
            )
        metrics = evaluate(model, site.val, run_cfg)
        history.append(
            {
                "epoch": epoch,
                "train_loss": result.loss,
                "examples_per_s": result.examples / result.seconds,
                **metrics,
            }
        )
        print(
            _line(f"epoch {epoch}/{epochs}", history[-1], run_cfg)
            + f"  train loss {result.loss:.4f}  {result.examples / result.seconds:.1f} ex/s"
        )
    test = load_eval_file(args.test, run_cfg) if args.test else site.test
    summary: dict[str, object] = {"compute": compute.fields(), "validation": history}
    if len(test):
        summary["test"] = evaluate(model, test, run_cfg)
        print(_line("test", summary["test"], run_cfg))  # type: ignore[arg-type]
    if args.out:
        save_adapter(get_adapter_state(model), model.peft_config["default"], args.out)
        print(f"adapter written to {args.out}")
    if args.metrics:
        write_atomic(args.metrics, json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return EXIT_OK


def _line(label: str, metrics: dict[str, float], cfg: FedtuneConfig) -> str:
    shown = "  ".join(
        f"{n} {metrics[n]:.4f}" for n in _metric_names(cfg) if not math.isnan(metrics[n])
    )
    return f"{label:>12}  {shown}"


def _metric_names(cfg: FedtuneConfig) -> tuple[str, ...]:
    if cfg.model.task != "classification":
        return ("loss", "perplexity")
    return ("f1", "auroc", "accuracy", "precision", "recall", "loss")


def _personalise(args: argparse.Namespace) -> int:
    from client.dataset import load_site
    from client.personalise import personalise
    from common.adapter import get_adapter_state, save_adapter
    from common.files import check_writable
    from common.model import load_adapted_model, set_threads
    from common.precision import compute_of

    cfg = _config(args)
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    check_writable(args.out.parent, "--out")
    set_threads(cfg.train.num_threads)
    site = load_site(args.data, cfg)
    model = load_adapted_model(args.adapter, cfg)
    print(
        f"{args.data.name}: {len(site.train)} train, {len(site.val)} validation records; "
        f"computing on {compute_of(model, cfg.model).describe()}"
    )
    result = personalise(model, site, cfg, args.epochs)
    what = "personalised" if result.kept else "global (personalising did not help here)"
    print(
        f"validation {result.criterion}: global {result.before:.4f}, after {result.steps} "
        f"steps {result.after:.4f}; keeping the {what} adapter"
    )
    save_adapter(get_adapter_state(model), model.peft_config["default"], args.out)
    print(f"adapter written to {args.out}")
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from client.inference import ClassPrediction, Sampling, load_inputs, predict, write_predictions
    from common.files import check_writable
    from common.model import load_adapted_model, set_threads
    from common.precision import compute_of

    cfg = _config(args)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    check_writable(args.out.parent, "--out")  # fail in seconds, not after the predictions
    set_threads(cfg.train.num_threads)
    records = load_inputs(args.data, cfg)
    model = load_adapted_model(args.adapter, cfg)
    compute = compute_of(model, cfg.model)
    print(f"{args.data.name}: {len(records)} records, adapter {args.adapter}")
    print(f"computing on {compute.describe()}")
    with _progress(len(records), "predict") as bar:
        predictions = predict(
            model, records, cfg, batch_size=args.batch_size, sampling=sampling, on_batch=bar.update
        )
    write_predictions(args.out, predictions)
    labels = Counter(p.label for p in predictions if isinstance(p, ClassPrediction))
    if labels:
        shares = ", ".join(
            f"{label}: {n} ({n / len(predictions):.0%})" for label, n in sorted(labels.items())
        )
        print(f"  predicted: {shares}")
    print(f"{len(predictions)} predictions written to {args.out}")
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from client.subgroups import evaluate_groups, load_labelled
    from common.files import check_writable, write_atomic
    from common.model import load_adapted_model, set_threads
    from common.precision import compute_of

    cfg = _config(args)
    if args.out is not None:
        check_writable(args.out.parent, "--out")
    set_threads(cfg.train.num_threads)
    records = load_labelled(args.data, cfg, args.group_by)
    model = load_adapted_model(args.adapter, cfg)
    compute = compute_of(model, cfg.model)
    print(f"{args.data.name}: {len(records)} labelled records, adapter {args.adapter}")
    print(f"computing on {compute.describe()}")
    with _progress(len(records), "evaluate") as bar:
        result = evaluate_groups(
            model, records, cfg, args.group_by, batch_size=args.batch_size, on_batch=bar.update
        )
    print(_line("all", result.metrics, cfg))
    names = _metric_names(cfg)
    for column in args.group_by:
        print(f"by {column}:")
        print(f"  {'':<20} {'records':>7}  " + "  ".join(f"{n:>9}" for n in names))
        for group in (g for g in result.groups if g.column == column):
            if group.flag is None:
                shown = "  ".join(f"{group.metrics[n]:>9.4f}" for n in names)
            else:
                shown = f"not scored: {group.flag}"
            print(f"  {group.value:<20} {group.records:>7}  {shown}")
    if args.out is not None:
        summary = {
            "data": args.data.name,
            "adapter": str(args.adapter),
            "compute": compute.fields(),
            "records": result.records,
            "metrics": result.metrics,
            "groups": [asdict(g) for g in result.groups],
        }
        write_atomic(args.out, json.dumps(summary, indent=2, allow_nan=True) + "\n")
        print(f"metrics written to {args.out}")
    return EXIT_OK


def _progress(total: int, desc: str) -> tqdm:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="record", leave=False, file=sys.stderr)


def _keygen(args: argparse.Namespace) -> int:
    from client.identity import check_private_key, generate_identity
    from client.supernode import site_home

    home = site_home(args.home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = generate_identity(home, comment=f"fedtune-site@{os.uname().nodename}")
    print(f"private key: {home / 'site.key'} (mode 0600; it never leaves this machine)")
    print(f"public key:  {public}")
    print(f"fingerprint: {check_private_key(home / 'site.key')}")
    print("Send site.pub to the coordinator and read them the fingerprint by phone.")
    return EXIT_OK


def _start(args: argparse.Namespace) -> int:
    from cryptography import x509

    from client.identity import check_private_key
    from client.ledger import FILE_NAME as LEDGER_FILE
    from client.supernode import site_home, supernode_command, worker_command
    from common.flower import flower_env
    from common.signing import load_verify_key
    from common.sitename import check_name

    home = site_home(args.home)
    if args.name:
        check_name(args.name)
    key = args.key or home / "site.key"
    print(f"site key {key}: {check_private_key(key)}")
    try:
        x509.load_pem_x509_certificate(args.ca.read_bytes())
    except ValueError as e:
        raise ValueError(f"{args.ca}: not a PEM certificate; use the coordinator's ca.pem") from e
    if args.coordinator_key is not None:
        load_verify_key(args.coordinator_key)  # a wrong file fails here, not in round 1
        print(f"global adapters must be signed by the coordinator key {args.coordinator_key}")
    else:
        print(
            "warning: no --coordinator-key: this site will train on any adapter it is sent; "
            "ask the coordinator for its signing.pub",
            file=sys.stderr,
        )
    code = _check(args)
    if code == EXIT_INVALID:
        print(f"fedtune-site start: {args.data} is not valid; fix it before joining")
        return EXIT_INVALID
    if code == EXIT_IDENTIFIERS and not args.allow_identifiers:
        print(
            "fedtune-site start: likely identifiers found; remove or mask them, or review "
            "them and start again with --allow-identifiers"
        )
        return EXIT_IDENTIFIERS
    socket_path = None if args.worker == "none" else args.worker_socket
    if args.worker == "start" and socket_path is None:
        socket_path = home / "run" / "worker.sock"
        command = worker_command(socket_path, args.data, parent=os.getpid())
        log_path = home / "logs" / "worker.log"
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with log_path.open("ab") as worker_log:
            # It outlives this exec as the SuperNode's child and exits when the SuperNode does.
            subprocess.Popen(command, stdout=worker_log, stderr=subprocess.STDOUT)
        print(f"warm worker starting; its log: {log_path}")
    command = supernode_command(
        args.superlink,
        args.ca,
        key,
        args.data,
        args.port,
        args.host,
        args.isolation,
        socket_path,
        args.coordinator_key,
        home / LEDGER_FILE,
        args.lora_rank,
        args.name,
    )
    flwr_home = home / "flwr-home"
    flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    print(f"joining the federation at {args.superlink} (TLS, authenticated)", flush=True)
    os.execve(command[0], command, flower_env(flwr_home))


def _sent(args: argparse.Namespace) -> int:
    from client.ledger import FILE_NAME, describe, last_round, read_ledger
    from client.supernode import site_home

    path = site_home(args.home) / FILE_NAME
    entries = read_ledger(path)
    if not entries:
        print(f"nothing sent yet ({path} is empty or missing)")
        return EXIT_OK
    for entry in entries if args.all else last_round(entries):
        print("\n".join(describe(entry)))
    return EXIT_OK


def _audit(args: argparse.Namespace) -> int:
    from client.ledger import FILE_NAME, read_ledger
    from client.supernode import site_home
    from common.auditlog import verify_log
    from common.signing import load_verify_key

    entries = verify_log(args.log, load_verify_key(args.coordinator_key))
    print(f"{args.log}: {len(entries)} entries, chain intact, each signed by the coordinator")
    for entry in entries:
        if entry["event"] == "round":
            dropped = ", ".join(f"{d['node']} {d['reason']}" for d in entry["dropped"]) or "-"
            print(
                f"  round {entry['round']}: {len(entry['contributed'])} sites contributed; "
                f"dropped: {dropped}; adapter {entry['adapter-sha256'][:16]}"
            )
        else:
            after = f" after round {entry['after-round']}" if "after-round" in entry else ""
            print(f"  {entry['event']}{after} (Flower run {entry.get('run', '?')})")
    logged = {e["adapter-sha256"] for e in entries if "adapter-sha256" in e}
    runs = {e["run"] for e in entries if "run" in e}
    received = [
        e
        for e in read_ledger(site_home(args.home) / FILE_NAME)
        if e["run"] in runs and e["received-adapter-sha256"]  # secure-aggregation key stages
    ]
    unknown = [e for e in received if e["received-adapter-sha256"] not in logged]
    matched = len(received) - len(unknown)
    print(
        f"this site's ledger: {matched} of {len(received)} adapters received in this run are "
        "in the log" + ("" if not unknown else "; NOT in the log:")
    )
    for entry in unknown:
        print(f"  run {entry['run']} round {entry['round']} {entry['op']}")
    return EXIT_OK if not unknown else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
