"""A real deployment on 127.0.0.1: a SuperLink with TLS and site authentication started by
`fedtune-server start`, three hospitals joining with `fedtune-site start`, runs submitted
with `fedtune-server run`, and a coordinator killed with SIGKILL mid-run and resumed. Every
process is started here and stopped by PID."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CANARY, plant_canary

from client.ledger import MASKED_STAGE, read_ledger
from common.flower import executable, flower_env, free_port
from server.checkpoint import latest_checkpoint, read_checkpoint
from server.sites import list_sites
from simulations.localdeploy import LocalDeployment
from simulations.processes import kill_tree, stop_tree
from simulations.synth import write_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> Iterator[LocalDeployment]:
    root = tmp_path_factory.mktemp("deployment")
    write_federation(root / "data", num_sites=3, seed=0, records_per_site=40, heterogeneity=1.0)
    plant_canary(root / "data" / "site-1" / "train.jsonl")
    (root / "experiment.toml").write_text(
        f'[model]\npath = "{tiny_bert_dir}"\n'
        "[federation]\nrounds = 2\nmin-sites = 3\nconnect-timeout = 120.0\n"
        "[train]\nnum-threads = 1\n"
    )
    deployment = LocalDeployment(root, root / "data")
    try:
        deployment.create(sites=3)
        yield deployment
    finally:
        deployment.stop()


def test_private_keys_are_owner_only(federation: LocalDeployment) -> None:
    tls = federation.home.tls.directory
    for key in (tls / "ca.key", tls / "server.key", federation.root / "site-1" / "site.key"):
        assert oct(key.stat().st_mode & 0o777) == oct(0o600), key
    assert oct(federation.home.root.stat().st_mode & 0o777) == oct(0o700)


def test_a_site_with_an_unregistered_key_is_refused(federation: LocalDeployment) -> None:
    federation.command("fedtune-site", "keygen", "--home", str(federation.root / "rogue"))
    rogue = federation.start_site("rogue", 1)
    federation.sites.remove(rogue)
    try:
        code = rogue.wait(timeout=120)
    finally:
        stop_tree(rogue.pid)
    assert code != 0
    assert "Failed to activate SuperNode" in (federation.root / "rogue.out").read_text()
    assert len(list_sites(federation.home)) == 3  # it never became a node


def test_a_plaintext_connection_is_refused(federation: LocalDeployment) -> None:
    # A SuperNode that will not use TLS never gets a session: it retries, unanswered ...
    log = federation.root / "plain.out"
    with log.open("wb") as out:
        plain = subprocess.Popen(
            [executable("flower-supernode"), "--insecure", "--superlink",
             f"127.0.0.1:{federation.port}", "--port", str(free_port()),
             "--node-config", 'data-path="/nonexistent"'],
            env=flower_env(federation.root / "plain-flwr-home"),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("Connection attempt failed") < 2:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1.0)
        assert len(list_sites(federation.home)) == 3  # no new node appeared
    finally:
        stop_tree(plain.pid)
        plain.wait()
    # ... and no plain HTTP request gets an answer: the port speaks TLS only.
    connection = http.client.HTTPConnection("127.0.0.1", federation.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        connection.request("POST", "/v1/fleet/activate-node", body=b"{}")
        connection.getresponse()
    connection.close()


def test_three_sites_run_two_rounds_over_tls(federation: LocalDeployment) -> None:
    done = federation.server("run", "--config", str(federation.root / "experiment.toml"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2  3/3 sites" in done.stdout
    (run_dir,) = federation.home.runs.glob("run-*")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    latest = latest_checkpoint(run_dir)
    assert latest is not None and read_checkpoint(latest).round == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites-ok"] for r in rows] == [3, 3]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # Nothing of the sites' records, nor their data paths (node config), reaches any file
    # of the coordinator: state database, runs, logs, submissions, Flower's home.
    stored = [p for p in federation.home.root.rglob("*") if p.is_file()]
    assert federation.home.database in stored and (run_dir / "audit.jsonl") in stored
    for path in stored:
        content = path.read_bytes()
        assert CANARY.encode() not in content and str(federation.data).encode() not in content
    listing = federation.server("runs")
    assert f"{run_dir.name}" in listing.stdout and "completed" in listing.stdout


def test_secure_aggregation_over_tls(federation: LocalDeployment) -> None:
    """SecAgg+ across real processes: each site's four protocol messages each start a
    ClientApp process, and the protocol's state lives in the SuperNode between them."""
    config = federation.root / "secure.toml"
    config.write_text(
        (federation.root / "experiment.toml").read_text().replace("rounds = 2", "rounds = 1")
        + "[secure-aggregation]\nenabled = true\n"
    )
    before = set(federation.home.runs.glob("run-*"))
    done = federation.server("run", "--config", str(config))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = set(federation.home.runs.glob("run-*")) - before
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["sites-ok"] == 3 and row["dropped"] == []
    (run_id,) = json.loads((run_dir / "run.json").read_text())["flower-run-ids"]
    sent = [e for e in read_ledger(federation.root / "site-1" / "sent.jsonl") if e["run"] == run_id]
    stages = [e.get("secure-stage") for e in sent if e["op"] == "train"]
    assert stages == ["setup", "share_keys", MASKED_STAGE, "unmask"]
    assert all(e["tensors"] == [] for e in sent if e["op"] == "train")


def test_a_coordinator_killed_mid_run_resumes_from_its_checkpoint(
    federation: LocalDeployment,
) -> None:
    config = federation.root / "three-rounds.toml"
    config.write_text(
        (federation.root / "experiment.toml").read_text().replace("rounds = 2", "rounds = 3")
    )
    before = set(federation.home.runs.glob("run-*"))
    submitted = federation.submit(config, "killed-run")
    try:
        run_dir = _wait_for_round(federation, before, 1)
        assert federation.superlink is not None
        kill_tree(federation.superlink.pid)  # the coordinator's machine dies, children too
        federation.superlink.wait()
        assert submitted.wait(timeout=120) != 0
    finally:
        stop_tree(submitted.pid)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    federation.start_superlink()  # same home: same state database, same registered sites
    federation.wait_online(3)
    done = federation.server("resume", str(run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and len(record["flower-run-ids"]) == 2
    assert record["resumed-after-rounds"][0] >= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["sites-ok"] == 3 for r in rows)


def test_a_site_killed_mid_round_costs_its_update_and_rejoins_later(
    federation: LocalDeployment,
) -> None:
    config = federation.root / "site-fault.toml"
    config.write_text(
        (federation.root / "experiment.toml")
        .read_text()
        .replace("rounds = 2", "rounds = 4")
        .replace("min-sites = 3", "min-sites = 2\nround-timeout = 150.0")
    )
    victim = next(p for p in federation.sites if str(federation.root / "site-3") in p.args)
    node = next(s.node_id for s in list_sites(federation.home) if s.name == "site-3")
    site_log = federation.root / "site-3.out"
    tasks_before = site_log.read_text().count("Receiving: train message")
    before = set(federation.home.runs.glob("run-*"))
    submitted = federation.submit(config, "site-fault-run")
    try:
        _wait_for(lambda: site_log.read_text().count("Receiving: train message") > tasks_before)
        kill_tree(victim.pid)  # the site's machine dies while it trains round 1
        victim.wait()
        federation.sites.remove(victim)
        run_dir = _wait_for_round(federation, before, 1)
        federation.start_site("site-3", 3)  # the site comes back, same key and data
        assert submitted.wait(timeout=1200) == 0, federation.root / "site-fault-run.out"
    finally:
        stop_tree(submitted.pid)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    (dropped,) = rows[0]["dropped"]
    assert dropped["node"] == int(node)
    assert dropped["reason"] in {"site-offline", "no-reply-within-round-timeout"}
    assert rows[0]["sites-ok"] == 2 and str(node) not in rows[0]["sites"]
    assert rows[-1]["sites-ok"] == 3 and "train" in rows[-1]["sites"][str(node)]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    adapter = read_checkpoint(latest_checkpoint(run_dir)).adapter  # type: ignore[arg-type]
    assert all(bool(t.isfinite().all()) for t in adapter.values())


def _wait_for(condition: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _wait_for_round(federation: LocalDeployment, before: set[Path], round_: int) -> Path:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for run_dir in set(federation.home.runs.glob("run-*")) - before:
            latest = latest_checkpoint(run_dir)
            if latest is not None and read_checkpoint(latest).round >= round_:
                return run_dir
        time.sleep(1.0)
    raise AssertionError(f"no new run reached round {round_}; see {federation.root}")
