"""Exporting a run's global adapter for use without fedtune: the adapter in PEFT layout and,
if asked, the base model with it merged in Hugging Face layout. Both are loaded back with
peft and transformers alone and scored against fedtune's own model before the export is
put in place: the output directory is complete and checked, or absent.

    fedtune-server export RUN_DIR [--round N] --out DIR [--merged] [--force]

    DIR/adapter/   adapter_config.json (base_model_name_or_path: the base model's directory),
                   adapter_model.safetensors
    DIR/merged/    config.json, model.safetensors, tokenizer files (with --merged)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BatchEncoding,
    PreTrainedTokenizerBase,
)

from common.adapter import (
    WEIGHTS_FILE,
    AdapterState,
    load_adapter,
    set_adapter_state,
    write_adapter_files,
)
from common.config import FedtuneConfig, load_config
from common.files import replace_dir, staging_dir
from common.model import (
    build_model,
    clear_model_cache,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)
from server.checkpoint import (
    CheckpointError,
    checkpoint_rounds,
    file_sha256,
    read_checkpoint,
)
from server.runlog import read_run

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
"""Largest difference in any output allowed between fedtune's model and the export (fp32)."""
CHECK_TEXTS = (
    "patient discharged home in stable condition, follow up in clinic",
    "worsening shortness of breath on day three; readmitted",
    "no acute distress",
)
"""Fixed inputs the export is scored on, of different lengths so that padding is exercised."""
EXPORT_PARTS = ("adapter", "merged")


class ExportError(ValueError):
    """An export cannot be made or failed its check; the message names what and the fix."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote and how closely it reproduces fedtune's model."""

    out: Path
    source: str
    """Where the adapter came from: the run's final adapter or a round's checkpoint."""
    adapter_sha256: str
    """sha256 of DIR/adapter/adapter_model.safetensors."""
    merged: bool
    differences: dict[str, float]
    """Largest absolute output difference from fedtune's model, per part written."""


def export_run(
    run_dir: Path,
    out: Path,
    server_round: int | None = None,
    merged: bool = False,
    force: bool = False,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Export the final adapter of `run_dir` (or round `server_round`'s checkpoint) to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    if cfg.model.pooling != "cls":
        raise ExportError(
            f"{run_dir} was trained with model.pooling {cfg.model.pooling}, which Hugging "
            "Face's sequence-classification classes cannot express: loaded by them, the "
            "adapter would give other outputs. Use the run's adapter/ with fedtune-site "
            "predict or evaluate, which pool as the run did"
        )
    state, peft_config, source = source_adapter(run_dir, server_round)
    check_target(out, force)
    path = resolve_model_path(cfg.model.path)
    peft_config.base_model_name_or_path = str(path)  # where PeftModel users find the base
    tokenizer = load_tokenizer(path)
    inputs = check_inputs(tokenizer, cfg)
    reference = fedtune_outputs(cfg, state, inputs)
    differences: dict[str, float] = {}
    with staging_dir(out) as staging:
        (staging / "adapter").mkdir()
        write_adapter_files(state, peft_config, staging / "adapter")
        with warnings.catch_warnings():
            # peft asks transformers a question it has deprecated; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            with_adapter = PeftModel.from_pretrained(load_base_model(cfg), staging / "adapter")
        differences["adapter"] = _difference(outputs(with_adapter, inputs), reference)
        if merged:
            write_merged(with_adapter, tokenizer, cfg, staging / "merged")
            del with_adapter
            plain = load_exported(staging / "merged", cfg)
            differences["merged"] = _difference(outputs(plain, inputs), reference)
            del plain
        worst = max(differences, key=lambda part: differences[part])
        if not differences[worst] <= tolerance:  # NaN fails too
            raise ExportError(
                f"export check failed: the exported {worst} gives outputs up to "
                f"{differences[worst]:.3g} away from fedtune's model (tolerance {tolerance:g}); "
                f"nothing was written to {out}"
            )
        sha256 = file_sha256(staging / "adapter" / WEIGHTS_FILE)
        replace_dir(staging, out)
    log.info("exported %s of %s to %s", source, run_dir, out)
    return Exported(out, source, sha256, merged, differences)


def run_config(run_dir: Path) -> FedtuneConfig:
    """The settings of the run in `run_dir` (its run.json), for the CPU in fp32."""
    record = read_run(run_dir)
    if "config" not in record:
        raise ExportError(f"{run_dir}: run.json missing; not a fedtune run directory")
    return load_config({**record["config"], "model.device": "cpu", "model.precision": "fp32"})


def source_adapter(run_dir: Path, server_round: int | None) -> tuple[AdapterState, LoraConfig, str]:
    """The run's final adapter, or round `server_round`'s checkpoint (verified, as resume
    reads it); a round without a good checkpoint is refused, listing the rounds there are."""
    rounds = checkpoint_rounds(run_dir)
    available = ", ".join(map(str, rounds)) or "none"
    if server_round is None:
        final = run_dir / "adapter"
        if not final.is_dir():
            status = read_run(run_dir).get("status", "unknown")
            raise ExportError(
                f"{final} missing: the run has no final adapter (status {status}); export a "
                f"round's checkpoint with --round N (rounds available: {available})"
            )
        state, config = load_adapter(final)
        return state, config, "the final adapter"
    if server_round not in rounds:
        raise ExportError(
            f"{run_dir}: no checkpoint of round {server_round}; rounds available: {available}"
        )
    try:
        checkpoint = read_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}")
    except CheckpointError as e:
        raise ExportError(f"{e}; rounds available: {available}") from e
    assert isinstance(checkpoint.peft_config, LoraConfig)
    return checkpoint.adapter, checkpoint.peft_config, f"round {server_round}'s checkpoint"


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing non-empty `out` unless `force`, and even then anything in it that
    an export did not write (so that --force cannot wipe a directory by mistake)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not force:
        raise ExportError(
            f"--out {out} exists and is not empty ({', '.join(present)}); give --force to "
            "replace it, or another directory"
        )
    foreign = [name for name in present if name not in EXPORT_PARTS]
    if foreign:
        raise ExportError(
            f"--out {out} holds files an export did not write ({', '.join(foreign)}); "
            "--force replaces only a previous export: give another directory"
        )


def check_inputs(tokenizer: PreTrainedTokenizerBase, cfg: FedtuneConfig) -> BatchEncoding:
    """The fixed check texts as one padded batch."""
    return tokenizer(
        list(CHECK_TEXTS),
        padding=True,
        truncation=True,
        max_length=cfg.data.max_length,
        return_tensors="pt",
    )


def fedtune_outputs(cfg: FedtuneConfig, state: AdapterState, inputs: BatchEncoding) -> torch.Tensor:
    """What fedtune's own model computes with `state` on `inputs` (its memory freed after)."""
    model = build_model(cfg)
    try:
        set_adapter_state(model, state)
        return outputs(model, inputs)
    finally:
        del model
        clear_model_cache()


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: BatchEncoding) -> torch.Tensor:
    """The logits on `inputs`: per example for a classifier, per real token for a causal LM."""
    was_training = model.training
    model.eval()
    try:
        logits = model(**inputs).logits.float()
    finally:
        model.train(was_training)
    if logits.dim() == 3:  # a causal LM: padding positions are no output of anyone's
        logits = logits[inputs["attention_mask"].bool()]
    return logits


def write_merged(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: FedtuneConfig, directory: Path
) -> None:
    """The base with the adapter merged in (and the trained head), in Hugging Face layout."""
    merged = model.merge_and_unload()
    labels = cfg.data.label_list
    if cfg.model.task == "classification" and labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_exported(directory: Path, cfg: FedtuneConfig) -> torch.nn.Module:
    """A merged export, loaded by transformers alone, as its users will."""
    auto = (
        AutoModelForSequenceClassification
        if cfg.model.task == "classification"
        else AutoModelForCausalLM
    )
    return auto.from_pretrained(directory, local_files_only=True, dtype=torch.float32)


def _difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max())
