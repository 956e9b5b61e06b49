"""Export: a run's adapter (final or a round's checkpoint) in PEFT layout and the merged model
in Hugging Face layout, each loaded with peft/transformers alone and giving fedtune's
logits; a missing round and an occupied output directory refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from peft import PeftModel
from test_federation import HandlerGrid, _config, _run
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from common.adapter import load_adapter, set_adapter_state
from common.config import load_config
from common.model import build_model, load_tokenizer
from server.checkpoint import file_sha256, read_checkpoint
from server.cli import main as server_cli
from server.export import ExportError, export_run

pytestmark = pytest.mark.usefixtures("task_identity")

TEXTS = ["stable , seen in clinic", "worsening pain after discharge , readmitted to ward"]
"""Inputs other than the export's own check texts."""


def _classifier_run(tiny_bert_dir: Path, sites: dict[int, Path], runs: Path) -> Path:
    extra = {
        "federation.rounds": 2,
        "train.learning-rate": 0.05,  # an adapter far enough from the base to tell apart
        "federation.evaluate-every": 0,
    }
    _run(HandlerGrid(_config(tiny_bert_dir, runs, **extra), sites))
    return runs / "run-1"


def _causal_run(tiny_llama_dir: Path, instruct_file: Path, runs: Path) -> Path:
    rows = [json.loads(line) for line in instruct_file.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    sites = {n: write_jsonl(runs.parent / f"lm-{n}.jsonl", rows[n::2]) for n in (0, 1)}
    extra = {
        "model.task": "causal-lm",
        "lora.target-modules": "q_proj,v_proj",
        "federation.rounds": 1,
        "train.local-steps": 1,
        "train.learning-rate": 0.05,
        "federation.evaluate-every": 0,
    }
    _run(HandlerGrid(_config(tiny_llama_dir, runs, **extra), sites))
    return runs / "run-1"


def _logits(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    tokenizer = load_tokenizer(tokenizer_dir)
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits[inputs["attention_mask"].bool()] if logits.dim() == 3 else logits


def _fedtune_logits(run_dir: Path, adapter: dict[str, torch.Tensor]) -> torch.Tensor:
    record = json.loads((run_dir / "run.json").read_text())
    cfg = load_config({**record["config"], "model.device": "cpu", "model.precision": "fp32"})
    model = build_model(cfg)
    set_adapter_state(model, adapter)
    return _logits(model, Path(cfg.model.path))


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_export_of_the_final_adapter_loads_with_peft_and_merged_with_transformers_alone(
    tiny_bert_dir: Path,
    tiny_llama_dir: Path,
    sites: dict[int, Path],
    instruct_file: Path,
    tmp_path: Path,
    task: str,
) -> None:
    if task == "classification":
        run_dir = _classifier_run(tiny_bert_dir, sites, tmp_path / "runs")
        auto, base_dir, extra = AutoModelForSequenceClassification, tiny_bert_dir, {"num_labels": 2}
    else:
        run_dir = _causal_run(tiny_llama_dir, instruct_file, tmp_path / "runs")
        auto, base_dir, extra = AutoModelForCausalLM, tiny_llama_dir, {}
    out = tmp_path / "export"
    exported = export_run(run_dir, out, merged=True)

    final, _ = load_adapter(run_dir / "adapter")
    written, _ = load_adapter(out / "adapter")
    assert set(written) == set(final)
    assert all(torch.equal(written[k], final[k]) for k in final), "bit for bit"
    assert exported.adapter_sha256 == file_sha256(out / "adapter" / "adapter_model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    peft_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base_path = peft_config["base_model_name_or_path"]
    assert Path(base_path) == base_dir.resolve()
    reference = _fedtune_logits(run_dir, final)
    with_adapter = PeftModel.from_pretrained(
        auto.from_pretrained(base_path, **extra), out / "adapter"
    )
    torch.testing.assert_close(_logits(with_adapter, base_dir), reference, atol=1e-5, rtol=0)

    merged = auto.from_pretrained(out / "merged")  # transformers alone, no fedtune code
    base = auto.from_pretrained(base_path, **extra)
    assert not torch.equal(  # the adapter is in the weights, not only beside them
        merged.state_dict()[_a_lora_target(merged)], base.state_dict()[_a_lora_target(merged)]
    )
    torch.testing.assert_close(_logits(merged, out / "merged"), reference, atol=1e-5, rtol=0)
    assert set(exported.differences) == {"adapter", "merged"}
    assert max(exported.differences.values()) <= 1e-5


def _a_lora_target(model: torch.nn.Module) -> str:
    return next(k for k in model.state_dict() if k.endswith(("query.weight", "v_proj.weight")))


def test_export_of_a_round_is_that_checkpoint(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _classifier_run(tiny_bert_dir, sites, tmp_path / "runs")
    out = tmp_path / "round-1"
    code = server_cli(["export", str(run_dir), "--round", "1", "--out", str(out)])
    assert code == 0

    checkpoint = read_checkpoint(run_dir / "checkpoints" / "round-0001")
    written, _ = load_adapter(out / "adapter")
    assert set(written) == set(checkpoint.adapter)
    assert all(torch.equal(written[k], checkpoint.adapter[k]) for k in written)
    final, _ = load_adapter(run_dir / "adapter")
    assert not all(torch.equal(written[k], final[k]) for k in written), "round 1, not round 2"
    assert not (out / "merged").exists()

    shown = capsys.readouterr().out
    assert "round 1's checkpoint" in shown
    assert file_sha256(out / "adapter" / "adapter_model.safetensors") in shown
    assert "largest output difference from fedtune's model: adapter" in shown


def test_export_refuses_a_missing_round_and_an_occupied_directory(
    tiny_bert_dir: Path, sites: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _classifier_run(tiny_bert_dir, sites, tmp_path / "runs")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"no checkpoint of round 7; rounds available: 1, 2"):
        export_run(run_dir, out, server_round=7)
    assert not out.exists()

    # A damaged checkpoint is refused as resume refuses it, with the rounds there are.
    weights = run_dir / "checkpoints" / "round-0001" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ExportError, match=r"will not be loaded; rounds available: 1, 2"):
        export_run(run_dir, out, server_round=1)

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = server_cli(["export", str(run_dir), "--out", str(out)])
    assert code == 1
    assert "exists and is not empty (notes.txt); give --force" in capsys.readouterr().err
    with pytest.raises(ExportError, match="holds files an export did not write"):
        export_run(run_dir, out, force=True)  # --force replaces only an earlier export
    assert (out / "notes.txt").read_text() == "mine"

    (out / "notes.txt").unlink()
    export_run(run_dir, out, server_round=2)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(run_dir, out)
    export_run(run_dir, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]
