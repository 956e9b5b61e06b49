"""A simulated run's report: the global adapter against the baselines and references at every
site and on all sites' test records pooled, with bootstrap intervals, and plots of the run's
rounds from its metrics.jsonl.

Only a researcher's simulation can do this: the synthetic sites' files are on this machine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import FedtuneConfig
from common.precision import resolve_compute
from server.runlog import read_rounds, read_run
from simulations.scoring import (
    COLUMNS,
    RESAMPLES,
    SiteScore,
    bootstrap,
    pooled_metrics,
    weighted_mean,
)

log = logging.getLogger(__name__)

APPROACHES = {
    "personalised": "federated + personalised",
    "local": "local only",
    "centralized": "centralised",
    "tfidf": "TF-IDF + LR",
    "probe": "frozen probe",
}
"""Baseline modes (as in `fedtune-sim baseline --mode`) and their names in tables."""
FEDERATED = "federated"
LABELS = {"f1": "F1", "auroc": "AUROC", "loss": "loss", "perplexity": "perplexity"}
NOT_RUN = "not run"
Round = dict[str, Any]


def pooled_test_scores(run_dir: Path) -> dict[str, float]:
    """The record-weighted mean over the sites of a simulated run's RUN_DIR/test-scores.json
    (NaN where a site has none)."""
    scores = [SiteScore(**s) for s in json.loads((run_dir / "test-scores.json").read_text())]
    means = weighted_mean(scores)
    return {name: means.get(name, math.nan) for name in COLUMNS}


def table(scores: Sequence[SiteScore]) -> list[str]:
    """One adapter's per-site table as markdown lines, with a record-weighted mean row."""
    columns = [c for c in (*COLUMNS, "loss", "perplexity") if any(c in s.metrics for s in scores)]
    columns = [c for c in columns if c in COLUMNS] or columns
    lines = [
        "| site | test records | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for s in scores:
        cells = " | ".join(_cell(s.metrics.get(c)) for c in columns)
        lines.append(f"| {s.site} | {s.records} | {cells} |")
    mean = weighted_mean(scores, columns)
    cells = " | ".join(_cell(mean.get(c)) for c in columns)
    lines.append(f"| **all (weighted)** | {sum(s.records for s in scores)} | {cells} |")
    return lines


def comparison(
    federated: Sequence[SiteScore],
    baselines: Mapping[str, Sequence[SiteScore] | None] | None = None,
    command: str = "fedtune-sim baseline",
    bayes: Mapping[str, float] | None = None,
) -> list[str]:
    """The federated model's test results beside each baseline's (the modes in `baselines`,
    local-only and centralised when it is empty), per site, as the record-weighted mean of
    the sites, and on the pooled predictions, as markdown lines. `bayes` adds each site's
    Bayes AUROC (synthetic data). A baseline not run says how to run it (`command` plus
    `--mode MODE`); a model that predicts one class at a site is warned about."""
    baselines = dict(baselines or {"local": None, "centralized": None})
    metrics = _headline(federated)
    approaches = _approaches(federated, baselines)
    head = [f"{name} {LABELS[m]}" for name in approaches for m in metrics]
    head += ["Bayes AUROC"] if bayes else []
    lines = [
        "| site | test records | " + " | ".join(head) + " |",
        "|" + "---|" * (len(head) + 2),
    ]
    for site in federated:
        cells = []
        for scores in approaches.values():
            found = {s.site: s for s in scores or ()}.get(site.site)
            for m in metrics:
                cells.append(_cell(found.metrics.get(m)) if found else _absent(scores))
        cells += [_cell(bayes.get(site.site))] if bayes else []
        lines.append(f"| {site.site} | {site.records} | " + " | ".join(cells) + " |")
    total = sum(s.records for s in federated)
    rows = {"all (weighted)": weighted_mean}
    if all(s.probs for s in federated):
        rows["all (pooled)"] = lambda scores, metrics: pooled_metrics(scores)
    for label, combine in rows.items():
        cells = []
        for scores in approaches.values():
            mean = combine(scores, metrics) if scores else {}
            cells += [_cell(mean.get(m)) if scores else NOT_RUN for m in metrics]
        cells += [""] if bayes else []
        lines.append(f"| **{label}** | {total} | " + " | ".join(cells) + " |")
    lines += ["", _ROWS_NOTE if len(rows) > 1 else _WEIGHTED_NOTE]
    missing = [mode for mode in baselines if not baselines[mode]]
    if missing:
        lines.append("")
        lines += [
            f"{APPROACHES[mode]}: not run with these settings and data; run "
            f"`{command} --mode {mode}`"
            for mode in missing
        ]
    warned = one_class_warnings(approaches)
    return lines + (["", *warned] if warned else [])


_WEIGHTED_NOTE = "all (weighted): the mean of the sites' values, weighted by their test records."
_ROWS_NOTE = (
    "all (weighted): the mean of the sites' values, weighted by their test records; all "
    "(pooled): the metric of every site's test predictions taken as one set."
)


def _approaches(
    federated: Sequence[SiteScore], baselines: Mapping[str, Sequence[SiteScore] | None]
) -> dict[str, Sequence[SiteScore] | None]:
    approaches: dict[str, Sequence[SiteScore] | None] = {FEDERATED: federated}
    approaches.update({APPROACHES[m]: baselines[m] for m in baselines})
    return approaches


def one_class_warnings(approaches: Mapping[str, Sequence[SiteScore] | None]) -> list[str]:
    """A line for each model and site where the model predicts one class for every record."""
    warned = []
    for name, scores in approaches.items():
        for s in scores or ():
            k = s.predicted_class()
            if k is not None and s.records > 1:
                warned.append(
                    f"**Warning**: {name} predicts class {k} for every one of the {s.records} "
                    f"test records at {s.site}: its F1 and accuracy there say nothing of skill."
                )
    return warned


def intervals(
    federated: Sequence[SiteScore],
    baselines: Mapping[str, Sequence[SiteScore] | None],
    resamples: int = RESAMPLES,
) -> list[str]:
    """Pooled F1 and AUROC of each model with 95% bootstrap intervals, and each baseline's
    difference to the federated model (paired: the same resampled records for every model),
    as markdown lines; [] without per-record predictions."""
    models = {FEDERATED: federated, **{m: s for m, s in baselines.items() if s}}
    found = bootstrap(models, FEDERATED, resamples)
    if not found:
        return []
    lines = [
        f"All sites' test records pooled; 95% bootstrap intervals from {resamples} resamples of "
        "each site's test records. A difference whose interval excludes 0 is signal, not noise.",
        "",
        "| model | F1 | AUROC | AUROC minus federated | F1 minus federated |",
        "|---|---|---|---|---|",
    ]
    for mode, result in found.items():
        name = FEDERATED if mode == FEDERATED else APPROACHES[mode]
        cells = [str(result["f1"]), str(result["auroc"])]
        cells += [
            str(result[f"{m}-minus-{FEDERATED}"]) if mode != FEDERATED else ""
            for m in ("auroc", "f1")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def test_summary(
    federated: Sequence[SiteScore],
    baselines: Mapping[str, Sequence[SiteScore] | None],
    resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """The comparison as data, for the model card: per model, the pooled F1 and AUROC with
    95% bootstrap intervals, and each site's values."""
    models = {FEDERATED: federated, **{m: s for m, s in baselines.items() if s}}
    found = bootstrap(models, FEDERATED, resamples)
    summary: dict[str, Any] = {}
    for mode, scores in models.items():
        name = FEDERATED if mode == FEDERATED else APPROACHES[mode]
        pooled = {
            metric: [interval.estimate, interval.low, interval.high]
            for metric, interval in found.get(mode, {}).items()
            if metric in ("f1", "auroc")
        }
        sites = {s.site: {m: s.metrics.get(m) for m in ("f1", "auroc")} for s in scores}
        summary[name] = {"pooled": pooled, "sites": sites}
    return summary


def plot_rounds(rounds: Sequence[Round], plots_dir: Path) -> dict[str, Path]:
    """PNG plots of the rounds into `plots_dir`, by title: train loss, evaluation, traffic.
    A plot with nothing to show is left out."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no screen needed

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def save(fig: Figure, title: str, name: str) -> None:
        fig.tight_layout()
        path = plots_dir / name
        fig.savefig(path, format="png", dpi=100)
        written[title] = path

    loss = _series(rounds, "train", "train-loss")
    if loss:
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        ax.plot(*zip(*loss, strict=True), marker="o", color="black", label="aggregated")
        names = _site_names(rounds)
        for node in sorted(names, key=lambda n: names[n]):
            site_loss = _series(rounds, "sites", node, "train", "train-loss")
            if site_loss:
                ax.plot(*zip(*site_loss, strict=True), linewidth=0.8, alpha=0.6, label=names[node])
        _finish(ax, "Training loss", "train loss", legend=len(ax.lines) <= 11)
        save(fig, "Train loss", "train-loss.png")

    wanted = [
        ("evaluate", "f1", "federated validation F1"),
        ("evaluate", "auroc", "federated validation AUROC"),
        ("central", "f1", "central evaluation F1"),
    ]
    curves = [(label, _series(rounds, part, key)) for part, key, label in wanted]
    if not any(points for _, points in curves):  # a causal-LM run has losses, not F1
        wanted = [("evaluate", "loss", "federated validation loss"), ("central", "loss", "central")]
        curves = [(label, _series(rounds, part, key)) for part, key, label in wanted]
    if any(points for _, points in curves):
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        for label, points in curves:
            if points:
                style = "--" if label.startswith("central") else "-"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=label)
        _finish(ax, "Evaluation of the global adapter", "metric", legend=True)
        save(fig, "Evaluation", "evaluation.png")

    up, down = _traffic(rounds, "bytes-up"), _traffic(rounds, "bytes-down")
    if up or down:
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.subplots()
        bars = ((up, -0.2, "up (sites to server)"), (down, 0.2, "down (server to sites)"))
        for points, offset, label in bars:
            if points:
                ax.bar([x + offset for x, _ in points], [y for _, y in points], 0.4, label=label)
        _finish(ax, "Adapter traffic", "MB per round", legend=True)
        save(fig, "Traffic", "traffic.png")
    return written


def write_report(
    run_dir: Path,
    scores: Sequence[SiteScore],
    cfg: FedtuneConfig,
    baselines: Mapping[str, Sequence[SiteScore] | None] | None = None,
    command: str = "fedtune-sim baseline",
) -> Path:
    """RUN_DIR/report.md: settings, the rounds, plots in RUN_DIR/plots/, the per-site test
    table of the federated adapter beside the baselines (`command` runs a missing one), and
    pooled results with bootstrap intervals."""
    run_dir = Path(run_dir)
    rounds = read_rounds(run_dir)
    baselines = dict(baselines or {"local": None, "centralized": None})
    pooled = intervals(scores, baselines)
    lines = [
        f"# fedtune run {run_dir.name}",
        "",
        f"Strategy {cfg.federation.strategy}, {cfg.federation.rounds} rounds, model "
        f"{cfg.model.path}, LoRA r={cfg.lora.rank} on {cfg.lora.target_modules}. "
        f"Settings digest `{cfg.digest()[:12]}`.",
        "",
        computed_in(run_dir, cfg),
        "",
        *_privacy_line(run_dir, cfg),
        "## Test results at each site",
        "",
        "Each site's held-out test file: the federated global adapter, each site trained alone "
        "on its own records (local only), and one adapter trained on all sites' records pooled "
        "(centralised), with the same number of passes over every record; and two references "
        "fitted on all sites' training records with no fine-tuning: TF-IDF (word 1-2 grams) + "
        "logistic regression, and logistic regression on the frozen base model's mean-pooled "
        "embeddings (frozen probe). Bayes AUROC, where the data is synthetic, is what the "
        "generator's true risk scores: no model can expect more.",
        "",
        *comparison(scores, baselines, command, bayes_aurocs(Path(cfg.simulation.data_dir))),
        "",
        *(["## Pooled test results", "", *pooled, ""] if pooled else []),
        "## Rounds",
        "",
        *_rounds_table(rounds),
        "",
    ]
    plots = plot_rounds(rounds, run_dir / "plots") if rounds else {}
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots.items():
            lines += [f"![{title}]({path.relative_to(run_dir).as_posix()})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def computed_in(run_dir: Path, cfg: FedtuneConfig) -> str:
    """Where each number was computed and in which precision: the federated training at each
    site (as it reported), the test scoring and the baselines on this machine."""
    sites = read_run(run_dir).get("compute", {}).get("sites", {})
    trained = "; ".join(f"{name} {c['device']}, {c['precision']}" for name, c in sites.items())
    here = resolve_compute(cfg.model).describe()
    return (
        f"Computed in (model.precision `{cfg.model.precision}`): federated training at "
        f"{trained or 'sites that did not report it'}; test scoring and baselines here, "
        f"{here}."
    )


def bayes_aurocs(data_dir: Path) -> dict[str, float]:
    """Each synthetic site's Bayes AUROC from DATA_DIR/federation.json ({} for other data)."""
    try:
        summary = json.loads((Path(data_dir) / "federation.json").read_text())
        return {str(s["name"]): float(s["bayes_auroc"]) for s in summary["sites"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _privacy_line(run_dir: Path, cfg: FedtuneConfig) -> list[str]:
    lines = []
    if cfg.privacy.enabled:
        spent = read_run(run_dir).get("privacy") or {}
        epsilon = f"epsilon {spent['epsilon']:.2f} at delta {spent['delta']:g}" if spent else "n/a"
        lines += [
            f"Client-level differential privacy: noise multiplier "
            f"{cfg.privacy.noise_multiplier}, clipping norm {cfg.privacy.clipping_norm}; "
            f"spent {epsilon}.",
            "",
        ]
    if cfg.secure_aggregation.enabled:
        lines += [
            "Secure aggregation (SecAgg+): the coordinator saw only the mean of each round's "
            "adapters; the per-site update norms are not known.",
            "",
        ]
    return lines


def _rounds_table(rounds: Sequence[Round]) -> list[str]:
    if not rounds:
        return ["No rounds recorded (metrics.jsonl is missing or empty)."]
    lines = [
        "| round | sites ok/asked | dropped | train loss | val F1 | val AUROC | central F1 "
        "| MB up | MB down | seconds |",
        "|" + "---|" * 10,
    ]
    traffic = {
        key: dict(_traffic(rounds, f"bytes-{key}")) for key in ("up", "down")
    }  # in MB by round
    for r in rounds:
        train, ev, central = (r.get(k) or {} for k in ("train", "evaluate", "central"))
        ok = r.get("sites-ok", train.get("sites"))
        asked = r.get("sites-asked")
        sites = f"{_count(ok)}/{_count(asked)}" if asked is not None else _count(ok)
        dropped = r.get("dropped")
        cells = [
            str(r["round"]),
            sites,
            str(len(dropped)) if isinstance(dropped, list) else "n/a",
            _cell(train.get("train-loss"), 4),
            _cell(ev.get("f1")),
            _cell(ev.get("auroc")),
            _cell(central.get("f1")),
            _cell(traffic["up"].get(r["round"]), 2),
            _cell(traffic["down"].get(r["round"]), 2),
            _cell(r.get("round-seconds"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _headline(scores: Sequence[SiteScore]) -> tuple[str, ...]:
    """F1 and AUROC for classification; loss and perplexity for a causal-LM task."""
    if scores and all("f1" in s.metrics for s in scores):
        return ("f1", "auroc")
    return ("loss", "perplexity")


def _site_names(rounds: Sequence[Round]) -> dict[str, str]:
    """Each node's site name as it told it, else `node ID`."""
    names: dict[str, str] = {}
    for r in rounds:
        for node, site in (r.get("sites") or {}).items():
            told = site.get("name") if isinstance(site, Mapping) else None
            names[node] = told or names.get(node) or f"node {node}"
    return names


def _series(rounds: Sequence[Round], *keys: str) -> list[tuple[int, float]]:
    """(round, value) of a nested key, for the rounds that have a finite number there."""
    points = []
    for r in rounds:
        value: Any = r
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((int(r["round"]), float(value)))
    return points


def _traffic(rounds: Sequence[Round], key: str) -> list[tuple[int, float]]:
    """MB moved per round: the round's total, or (older rows) the mean per site times sites."""
    points = []
    for r in rounds:
        total = r.get(key)
        train = r.get("train") or {}
        if not isinstance(total, int | float) and key == "bytes-up":
            per_site, sites = train.get("bytes-up"), train.get("sites")
            if isinstance(per_site, int | float) and isinstance(sites, int | float):
                total = per_site * sites
        if isinstance(total, int | float) and math.isfinite(total):
            points.append((int(r["round"]), total / 1e6))
    return points


def _finish(ax: Any, title: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _absent(scores: Sequence[SiteScore] | None) -> str:
    return NOT_RUN if not scores else "-"


def _count(value: object) -> str:
    return str(int(value)) if isinstance(value, int | float) else "?"
