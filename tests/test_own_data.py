"""Simulating on a researcher's own data: a directory of site folders (only ever read), or one
records file split into sites by a column or by a flwr-datasets partitioner (records copied
unchanged); sites without a test file scored on their training file's held-out test share;
bad input refused with one error that names the file, line or key and quotes no record."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.split import site_splits, train_size
from client.task import site_data_path
from common.config import ConfigError, FedtuneConfig, load_config
from common.records import DataError, load_records
from common.sitefiles import FederationError, find_sites, site_at
from common.sitename import site_name
from server.submit import app_defaults
from simulations.baseline import load_baseline, run_baseline
from simulations.federation import data_hash, prepare_federation, scored_records
from simulations.partition import MIN_PARTITION_RECORDS

SECRET = "zqxprivatewug"
"""In every record's text: it must appear in no error message and no summary."""
WORDS = ["patient", "stable", "discharged", "home", "clinic", "improved", "meds", "follow"]


def _rows(n: int, seed: int = 0, hospitals: tuple[str, ...] = ()) -> list[dict]:
    """Records whose label one word carries; a comma and a line break in every text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = int(rng.random() < 0.4)
        words = rng.choices(WORDS, k=rng.randint(3, 8))
        words.insert(1, "worsening" if label else "resolved")
        row = {"id": i, "text": f"{' '.join(words)}, {SECRET}\nseen {i}", "label": label}
        if hospitals:
            row["hospital"] = hospitals[i % len(hospitals)]
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    """Rows in the format the file's suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _cfg(**keys: object) -> FedtuneConfig:
    return load_config({**app_defaults(), **keys})


def _digests(directory: Path) -> dict[str, str]:
    """Every file under `directory` by relative path, with its sha256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def hospitals(tmp_path: Path) -> Path:
    """A researcher's federation: one site with a test file, one without (Parquet), and a
    file and a hidden folder beside them that are not sites."""
    root = tmp_path / "hospitals"
    _write(root / "hospital-b" / "train.csv", _rows(60, seed=1))
    _write(root / "hospital-b" / "test.csv", _rows(20, seed=2))
    _write(root / "hospital-a" / "train.parquet", _rows(50, seed=3))
    (root / "README.md").write_text("our data\n")
    (root / ".cache").mkdir()
    return root


def test_site_folders_are_the_sites_in_natural_order(tmp_path: Path) -> None:
    for name in ("site-10", "site-2", "Alpha"):
        _write(tmp_path / name / "train.jsonl", _rows(3))
    _write(tmp_path / "site-2" / "test.jsonl", _rows(3))
    (tmp_path / "site-2" / "instruct-train.jsonl").write_text("{}\n")  # not a training file
    sites = find_sites(tmp_path)
    assert [s.name for s in sites] == ["Alpha", "site-2", "site-10"]
    assert sites[1].train == tmp_path / "site-2" / "train.jsonl"
    assert sites[1].test == tmp_path / "site-2" / "test.jsonl" and sites[2].test is None
    cfg = _cfg(**{"simulation.data-dir": str(tmp_path)})
    assert site_data_path({"partition-id": 2}, cfg) == tmp_path / "site-10" / "train.jsonl"
    run = {"simulation.data-dir": str(tmp_path)}
    # the name a simulated site reports: its folder's, where that is a well-formed site name
    assert site_name({"partition-id": 2}, run) == "site-10"
    assert site_name({"partition-id": 0}, run) == "site-1"  # "Alpha" is not: upper case
    with pytest.raises(FederationError, match="partition-id 3: .* holds 3 sites"):
        site_at(tmp_path, 3)


def test_a_folder_federation_is_checked_and_only_read(hospitals: Path, tmp_path: Path) -> None:
    before = _digests(hospitals)
    cfg = _cfg(**{"simulation.data-dir": str(hospitals)})
    federation = prepare_federation(cfg, tmp_path / "out", asked_sites=2)
    assert federation.kind == "folders" and federation.directory == hospitals
    assert [s.name for s in federation.sites] == ["hospital-a", "hospital-b"]
    assert (
        "hospital-a: " in federation.notes[0]
        and "test share of train.parquet" in (federation.notes[0])
    )
    assert federation.notes[1].endswith("scored on 20 records of test.csv")
    assert _digests(hospitals) == before  # nothing changed, nothing added
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_site_without_a_test_file_is_scored_on_records_it_never_trains_on(
    hospitals: Path,
) -> None:
    cfg = _cfg(**{"simulation.data-dir": str(hospitals)})
    site_a, site_b = find_sites(hospitals)
    records = load_records(site_a.train, cfg.model, cfg.data)
    splits = site_splits(records, cfg)
    scored = scored_records(site_a, cfg)
    assert scored == splits.test and 4 <= len(scored) <= 6  # data.test-fraction 0.1 of 50
    trained_or_validated = {r.row for r in splits.train + splits.val}
    assert scored and not {r.row for r in scored} & trained_or_validated
    # the simulated site trains on exactly the rest: what the client counts for its split
    assert train_size(site_a.train, cfg) == len(splits.train) == 50 - len(scored) - len(splits.val)
    assert scored_records(site_b, cfg) == load_records(site_b.test, cfg.model, cfg.data)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_file_split_by_a_column_keeps_every_record_unchanged(suffix: str, tmp_path: Path) -> None:
    rows = _rows(90, hospitals=("St Mary's", "General", "north"))
    source = _write(tmp_path / f"records{suffix}", rows)
    before = source.read_bytes()
    cfg = _cfg(**{"simulation.records-file": str(source), "simulation.site-column": "hospital"})
    federation = prepare_federation(cfg, tmp_path / "out")
    assert source.read_bytes() == before
    assert federation.kind == "split" and federation.directory.parent == tmp_path / "out"
    assert [s.name for s in federation.sites] == ["general", "north", "st-mary-s"]
    by_value = {"general": "General", "north": "north", "st-mary-s": "St Mary's"}
    seen = []
    for site in federation.sites:
        assert site.train.name == f"train{suffix}" and site.test is None
        copied = _read(site.train)
        assert copied == [r for r in rows if r["hospital"] == by_value[site.name]]
        seen += [r["id"] for r in copied]
    assert sorted(seen) == list(range(90))
    if suffix != ".parquet":  # the same bytes, line for line
        lines = set(before.splitlines(keepends=True))
        assert all(
            set(s.train.read_bytes().splitlines(keepends=True)) <= lines for s in federation.sites
        )
    summary_text = (federation.directory / "federation.json").read_text()
    summary = json.loads(summary_text)
    assert SECRET not in summary_text
    assert summary["source"] == {
        "file": str(source),
        "sha256": hashlib.sha256(before).hexdigest(),
        "records": 90,
    }
    assert [(s["name"], s["records"]) for s in summary["sites"]] == [
        ("general", 30),
        ("north", 30),
        ("st-mary-s", 30),
    ]
    general = [r for r in rows if r["hospital"] == "General"]
    assert summary["sites"][0]["prevalence"] == round(sum(r["label"] for r in general) / 30, 4)


def _read(path: Path) -> list[dict]:
    """A site file's rows, with the types the source had."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as f:
        return [{**r, "id": int(r["id"]), "label": int(r["label"])} for r in csv.DictReader(f)]


def _split(tmp_path: Path, partitioner: str, seed: int = 0, **keys: object) -> list[list[dict]]:
    source = tmp_path / "records.jsonl"
    if not source.exists():
        _write(source, _rows(300))
    keys = {
        "simulation.records-file": str(source),
        "simulation.partitioner": partitioner,
        "simulation.data-seed": seed,
        "simulation.num-sites": 3,
        **keys,
    }
    federation = prepare_federation(_cfg(**keys), tmp_path / "out")
    assert [s.name for s in federation.sites] == ["site-1", "site-2", "site-3"]
    return [_read(site.train) for site in federation.sites]


def _prevalences(sites: list[list[dict]]) -> list[float]:
    return [sum(r["label"] for r in site) / len(site) for site in sites]


def test_partitioners_split_every_record_once_iid_by_size_or_by_label(tmp_path: Path) -> None:
    iid = _split(tmp_path, "iid")
    size = _split(tmp_path, "size")
    skewed = _split(tmp_path, "dirichlet", **{"simulation.dirichlet-alpha": 0.1})
    for sites in (iid, size, skewed):
        ids = sorted(r["id"] for site in sites for r in site)
        assert ids == list(range(300))  # every record once
        assert all([r["id"] for r in site] == sorted(r["id"] for r in site) for site in sites)
    assert [len(s) for s in iid] == [100, 100, 100]
    assert [len(s) for s in size] == [50, 100, 150]  # LinearPartitioner: 1, 2 and 3 shares
    assert {r["id"] for r in iid[0]} != set(range(100))  # shuffled before it is cut
    assert max(_prevalences(iid)) - min(_prevalences(iid)) < 0.2
    assert max(_prevalences(skewed)) - min(_prevalences(skewed)) > 0.5  # label skew
    assert min(len(s) for s in skewed) >= MIN_PARTITION_RECORDS
    # seeded: the same seed splits the same way, another seed another way
    assert _split(tmp_path / "again", "iid") == iid
    assert _split(tmp_path / "other", "iid", seed=1) != iid


def test_a_split_is_reused_until_the_file_or_settings_change(tmp_path: Path) -> None:
    source = _write(tmp_path / "records.csv", _rows(60, hospitals=("a", "b")))
    keys = {"simulation.records-file": str(source), "simulation.site-column": "hospital"}
    first = prepare_federation(_cfg(**keys), tmp_path / "out").directory
    made = _digests(first)
    mtime = (first / "a" / "train.csv").stat().st_mtime_ns
    assert prepare_federation(_cfg(**keys), tmp_path / "out").directory == first
    assert (first / "a" / "train.csv").stat().st_mtime_ns == mtime and _digests(first) == made
    _write(source, _rows(60, seed=5, hospitals=("a", "b")))
    second = prepare_federation(_cfg(**keys), tmp_path / "out").directory
    assert second != first and data_hash(second) != data_hash(first)
    iid = {**keys, "simulation.site-column": "", "simulation.partitioner": "iid"}
    assert prepare_federation(_cfg(**iid), tmp_path / "out").directory not in (first, second)


def test_cached_baselines_are_only_reused_for_the_same_data(
    hospitals: Path, tmp_path: Path
) -> None:
    cfg = _cfg(**{"simulation.data-dir": str(hospitals)})
    result = json.loads(run_baseline("tfidf", cfg, hospitals, tmp_path).read_text())
    scored = [(s["site"], s["records"]) for s in result["sites"]]
    held_out = len(scored_records(find_sites(hospitals)[0], cfg))
    assert scored == [("hospital-a", held_out), ("hospital-b", 20)]
    assert load_baseline(tmp_path, cfg, hospitals, "tfidf") is not None
    before = data_hash(hospitals)
    _write(hospitals / "hospital-b" / "test.csv", _rows(20, seed=9))  # other test records
    assert data_hash(hospitals) != before
    assert load_baseline(tmp_path, cfg, hospitals, "tfidf") is None


def _refused(
    error: type[Exception], match: str, tmp_path: Path, asked: int | None = None, **keys: object
) -> str:
    """The error preparing a federation with `keys` raises; it never quotes a record."""
    with pytest.raises(error, match=match) as caught:
        prepare_federation(_cfg(**keys), tmp_path / "out", asked)
    assert SECRET not in str(caught.value)
    return str(caught.value)


def test_bad_own_data_gets_one_error_naming_the_file_line_or_key(
    hospitals: Path, tmp_path: Path
) -> None:
    records = _write(tmp_path / "records.jsonl", _rows(40, hospitals=("a", "b")))
    split = {"simulation.records-file": str(records)}
    # a site column no record has: the key and the fields there are
    message = _refused(
        FederationError,
        'simulation.site-column "clinic": no record',
        tmp_path,
        **split,
        **{"simulation.site-column": "clinic"},
    )
    assert "fields present: hospital, id, label, text" in message
    # a record without its site: the file and line
    rows = _rows(40, hospitals=("a", "b"))
    del rows[6]["hospital"]
    _write(records, rows)
    _refused(
        DataError,
        'records.jsonl:line 7: site column "hospital" is missing',
        tmp_path,
        **split,
        **{"simulation.site-column": "hospital"},
    )
    # two values that make one site name: lines, never the values
    rows[6]["hospital"] = "A"
    _write(records, rows)
    message = _refused(
        DataError,
        'line 7: .* both make the site name "a"',
        tmp_path,
        **split,
        **{"simulation.site-column": "hospital"},
    )
    # fewer records than the sites need
    _refused(
        FederationError,
        "40 records cannot make simulation.num-sites 5 sites",
        tmp_path,
        **split,
        **{"simulation.partitioner": "iid", "simulation.num-sites": 5},
    )
    # an invalid record in a site's file: file and line
    bad = hospitals / "hospital-b" / "test.csv"
    bad.write_text(bad.read_text() + f'99,"{SECRET} note",maybe\n')
    _refused(
        DataError,
        r"test.csv:line \d+: \"label\" must be one of 0, 1",
        tmp_path,
        **{"simulation.data-dir": str(hospitals)},
    )
    # a site folder without a training file
    (hospitals / "hospital-c").mkdir()
    (hospitals / "hospital-c" / "notes.csv").write_text("text,label\n")
    _refused(
        FederationError,
        "hospital-c: site 'hospital-c' has no training file; add train",
        tmp_path,
        **{"simulation.data-dir": str(hospitals)},
    )


def test_contradictory_settings_are_refused_by_key(tmp_path: Path) -> None:
    source = str(tmp_path / "records.csv")
    cases = [
        ({"simulation.partitioner": "shards"}, 'config key "simulation.partitioner"'),
        (
            {"simulation.records-file": source},
            "simulation.site-column .* or simulation.partitioner",
        ),
        (
            {
                "simulation.records-file": source,
                "simulation.site-column": "h",
                "simulation.partitioner": "iid",
            },
            "set only one",
        ),
        ({"simulation.site-column": "hospital"}, "simulation.records-file, which is not set"),
        (
            {
                "simulation.records-file": source,
                "simulation.partitioner": "dirichlet",
                "model.task": "causal-lm",
            },
            'model.task "causal-lm" has no labels',
        ),
        ({"simulation.dirichlet-alpha": 0}, 'config key "simulation.dirichlet-alpha"'),
    ]
    for keys, match in cases:
        with pytest.raises(ConfigError, match=match):
            _cfg(**keys)


def test_the_data_not_the_settings_says_how_many_sites(hospitals: Path, tmp_path: Path) -> None:
    folders = {"simulation.data-dir": str(hospitals)}
    _refused(
        FederationError,
        r"simulation.num-sites \(or --sites\) is 3, but the data has 2",
        tmp_path,
        asked=3,
        **folders,
    )
    _refused(
        FederationError,
        "fewer than federation.min-sites 3",
        tmp_path,
        **folders,
        **{"federation.min-sites": 3},
    )
    without_test = {**folders, "data.test-fraction": 0.0}
    _refused(
        FederationError,
        "hospital-a.* has no test file, and the test share",
        tmp_path,
        **without_test,
    )


def test_a_directory_of_other_files_is_neither_read_nor_written(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    _write(mine / "notes.csv", _rows(10))
    before = _digests(mine)
    _refused(
        FederationError,
        "holds files fedtune did not make .* or a directory of site folders",
        tmp_path,
        **{"simulation.data-dir": str(mine)},
    )
    assert _digests(mine) == before
    with pytest.raises(FederationError, match="no federation at"):
        prepare_federation(
            _cfg(**{"simulation.data-dir": str(tmp_path / "new")}),
            tmp_path / "out",
            synthesise=False,
        )
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_simulation_on_site_folders_trains_each_site_on_its_own_file(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from simulations.run import run_simulation

    root = tmp_path / "hospitals"
    _write(root / "hospital-a" / "train.jsonl", _rows(60, seed=1))
    _write(root / "hospital-b" / "train.csv", _rows(40, seed=2))
    _write(root / "hospital-b" / "test.csv", _rows(20, seed=3))
    before = _digests(root)
    override = tmp_path / "own.toml"
    override.write_text(
        f'model.path = "{tiny_bert_dir}"\nlora.rank = 4\ndata.max-length = 32\n'
        f'simulation.data-dir = "{root}"\nfederation.rounds = 1\ntrain.local-steps = 2\n'
    )
    run_dir = run_simulation(override, None, tmp_path / "out", with_baselines=False)

    assert _digests(root) == before  # the researcher's records: read, never written
    cfg = _cfg(**{"simulation.data-dir": str(root), "data.max-length": 32})
    site_a, site_b = find_sites(root)
    scores = json.loads((run_dir / "test-scores.json").read_text())
    held_out = len(scored_records(site_a, cfg))
    assert [(s["site"], s["records"]) for s in scores] == [
        ("hospital-a", held_out),
        ("hospital-b", 20),
    ]
    # each simulated site trained on its own folder's file, and went by the folder's name
    card = json.loads((run_dir / "model-card.json").read_text())
    trained = {s["name"]: s["num-examples"] for s in card["sites"]}
    assert trained == {
        "hospital-a": train_size(site_a.train, cfg),
        "hospital-b": train_size(site_b.train, cfg),
    }
    assert "| hospital-a |" in (run_dir / "report.md").read_text()
