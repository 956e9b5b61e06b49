"""Continue training: a new run starts from another run's global adapter
(`federation.init-adapter`), exactly its weights, recorded in run.json and the audit log;
an adapter that does not fit the model, and FFA-LoRA, refused with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from test_federation import CoordinatorCrash, HandlerGrid, _config, _run

from common.adapter import AdapterError, load_adapter
from common.auditlog import AUDIT_FILE, verify_log
from common.config import ConfigError, load_config
from common.signing import adapter_digest
from server.card import CARD_JSON
from server.submit import absolute_paths

pytestmark = pytest.mark.usefixtures("task_identity")


def _earlier_run(tiny_bert_dir: Path, sites: dict[int, Path], runs: Path) -> Path:
    _run(HandlerGrid(_config(tiny_bert_dir, runs, **{"federation.rounds": 1}), sites))
    return runs / "run-1" / "adapter"


def test_a_run_started_from_another_runs_adapter_sends_exactly_its_weights(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    adapter = _earlier_run(tiny_bert_dir, sites, tmp_path / "a")
    tasks: list[Message] = []

    def note(message: Message) -> Message:
        if message.metadata.message_type == "train":
            tasks.append(message)
        return message

    config = _config(
        tiny_bert_dir,
        tmp_path / "b",
        **{"federation.rounds": 1, "federation.init-adapter": str(adapter)},
    )
    _run(HandlerGrid(config, sites, in_transit={node: note for node in sites}))

    earlier, _ = load_adapter(adapter)
    assert len(tasks) == len(sites)
    for task in tasks:
        sent = {k: a.numpy() for k, a in task.content["arrays"].items()}
        assert set(sent) == set(earlier)
        for key, tensor in earlier.items():
            assert sent[key].dtype == np.float32
            assert np.array_equal(sent[key], tensor.numpy()), key  # bit for bit
    assert any(np.abs(a).max() > 0 for k, a in sent.items() if "lora_B" in k), "a trained B"

    run_dir = tmp_path / "b" / "run-1"
    earlier_card = json.loads((adapter.parent / CARD_JSON).read_text())
    origin = {
        "path": str(adapter),
        "sha256": adapter_digest(sent),
        "file-sha256": earlier_card["adapter"]["sha256"],  # as the earlier run's card lists
    }
    record = json.loads((run_dir / "run.json").read_text())
    assert record["init-adapter"] == origin and record["status"] == "completed"
    assert json.loads((run_dir / CARD_JSON).read_text())["init-adapter"] == origin
    started = verify_log(run_dir / AUDIT_FILE)[0]
    assert started["event"] == "started" and started["init-adapter"] == origin


def test_an_adapter_that_does_not_fit_is_refused_naming_the_key(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    adapter = _earlier_run(tiny_bert_dir, sites, tmp_path / "a")  # lora.rank 4
    config = _config(
        tiny_bert_dir,
        tmp_path / "b",
        **{"lora.rank": 8, "federation.init-adapter": str(adapter)},
    )
    with pytest.raises(
        AdapterError,
        match=rf"federation.init-adapter {adapter}: adapter tensor \S+lora_A.weight has shape "
        r"\(4, 32\), the model needs \(8, 32\)",
    ):
        _run(HandlerGrid(config, sites))
    assert not (tmp_path / "b" / "run-1" / "checkpoints").exists()

    same_shapes = {**config, "lora.rank": 4, "lora.alpha": 32}  # same factors, twice the scale
    with pytest.raises(AdapterError, match=r"made with lora alpha 16, this run has lora.alpha 32"):
        _run(HandlerGrid(same_shapes, sites))


def test_an_init_adapter_is_refused_with_ffa_lora() -> None:
    with pytest.raises(ConfigError, match="federation.init-adapter cannot be used with lora"):
        load_config({"federation.init-adapter": "/runs/run-1/adapter", "lora.aggregation": "ffa"})


def test_on_resume_the_checkpoint_wins_over_the_init_adapter(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path
) -> None:
    adapter = _earlier_run(tiny_bert_dir, sites, tmp_path / "a")
    config = _config(
        tiny_bert_dir,
        tmp_path / "b",
        **{"federation.rounds": 2, "federation.init-adapter": str(adapter)},
    )
    with pytest.raises(CoordinatorCrash):
        _run(HandlerGrid(config, sites, crash_in_round=2))
    run_dir = tmp_path / "b" / "run-1"
    origin = json.loads((run_dir / "run.json").read_text())["init-adapter"]
    (adapter / "adapter_model.safetensors").unlink()  # not read again: round 1 is checkpointed

    _run(HandlerGrid({**config, "federation.resume": str(run_dir)}, sites), run_id=2)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["init-adapter"] == origin
    assert [e["event"] for e in verify_log(run_dir / AUDIT_FILE)][:3] == [
        "started",
        "round",
        "resumed",
    ]


def test_submitting_makes_a_relative_init_adapter_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the SuperLink would resolve it against its own directory
    cfg = load_config({"federation.init-adapter": "runs/run-1/adapter"})
    keys = absolute_paths(cfg)  # `fedtune-server run` and `fedtune-sim run` both apply it
    assert keys["federation.init-adapter"] == str(tmp_path.resolve() / "runs/run-1/adapter")
