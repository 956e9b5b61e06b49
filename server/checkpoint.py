"""Checkpoints: the global adapter after a round, in PEFT layout, with the run state and a
sha256 manifest. Written atomically (complete or absent); a checkpoint whose files do not
match its manifest is refused, never loaded.

    RUN_DIR/checkpoints/round-0003/
        adapter_config.json  adapter_model.safetensors  state.json  MANIFEST.json
        server_state.safetensors    (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum)
    RUN_DIR/checkpoints/LATEST          name of the newest complete checkpoint
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftConfig
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save as save_numpy

from common.adapter import (
    AdapterError,
    AdapterState,
    check_adapter_state,
    load_adapter,
    write_adapter_files,
)
from common.config import DIGEST_EXEMPT
from common.files import replace_dir, staging_dir, storage_error, write_atomic

MANIFEST = "MANIFEST.json"
STATE = "state.json"
SERVER_STATE = "server_state.safetensors"
LATEST = "LATEST"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or altered; the message names the file."""


def round_of(path: Path) -> int | None:
    """The round a checkpoint directory holds (`round-0003`: 3), None for anything else."""
    name = path.name
    digits = name.removeprefix("round-")
    return int(digits) if name.startswith("round-") and digits.isdigit() else None


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds that have a checkpoint directory in `run_dir` (verified or not), in order."""
    root = run_dir / "checkpoints"
    found = (round_of(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else ()
    return sorted(r for r in found if r is not None)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds."""

    round: int
    adapter: AdapterState
    peft_config: PeftConfig
    state: dict[str, Any]
    """Run state: config digest, metrics so far, seeds."""
    server_state: dict[str, np.ndarray]
    """The strategy's optimiser state, as named arrays ({} for stateless strategies)."""


def write_checkpoint(
    run_dir: Path,
    server_round: int,
    adapter: Mapping[str, torch.Tensor],
    peft_config: PeftConfig,
    state: Mapping[str, Any],
    server_state: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write round `server_round`'s checkpoint and point LATEST at it; returns its path.

    On any failure (a full disk, say) the half-made checkpoint is removed, LATEST still names
    the previous complete one, and the error names the directory and the fix.
    """
    root = run_dir / "checkpoints"
    target = root / f"round-{server_round:04d}"
    try:
        with staging_dir(target) as staging:
            files = write_adapter_files(adapter, peft_config, staging)
            state_text = json.dumps({"round": server_round, **state}, indent=2)
            write_atomic(staging / STATE, state_text)
            files.append(staging / STATE)
            if server_state:
                arrays = {k: np.ascontiguousarray(v) for k, v in server_state.items()}
                write_atomic(staging / SERVER_STATE, save_numpy(arrays))
                files.append(staging / SERVER_STATE)
            manifest = {p.name: file_sha256(p) for p in files}
            write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            replace_dir(staging, target)
        write_atomic(root / LATEST, target.name)
    except OSError as e:
        raise storage_error(
            e,
            root,
            "checkpoint directory",
            then=f"Round {server_round}'s checkpoint was not written; once fixed, resume the "
            "run from its last complete checkpoint",
        ) from e
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint after checking every file against its manifest."""
    verify_checkpoint(path)
    adapter, peft_config = load_adapter(path)
    state = json.loads((path / STATE).read_text())
    server_state = load_numpy(str(path / SERVER_STATE)) if (path / SERVER_STATE).is_file() else {}
    return Checkpoint(
        round=int(state["round"]),
        adapter=adapter,
        peft_config=peft_config,
        state=state,
        server_state=server_state,
    )


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless the files are exactly those listed, with those hashes."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} missing: incomplete or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON: altered or damaged") from e
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if present != set(manifest):
        raise CheckpointError(
            f"{path}: files {sorted(present ^ set(manifest))} differ from the manifest; "
            "the checkpoint was altered and will not be loaded"
        )
    for name, digest in manifest.items():
        if file_sha256(path / name) != digest:
            raise CheckpointError(
                f"{path / name}: sha256 does not match the manifest; the checkpoint was "
                "altered or damaged and will not be loaded"
            )


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_checkpoint(run_dir: Path, digest: str, config: Mapping[str, Any]) -> Checkpoint:
    """The last good checkpoint of `run_dir`, for continuing the run with the same settings.

    Refused, with the reason, when the run has no checkpoint, when it fails verification, or
    when its settings differ from `config` (a resumed run must reach the same result).
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(
            f"{run_dir}: no checkpoint to resume from (checkpoints/LATEST missing); "
            "start a new run instead"
        )
    checkpoint = read_checkpoint(path)
    if checkpoint.state.get("config-digest") != digest:
        saved = checkpoint.state.get("config", {})
        changed = sorted(
            k
            for k in set(saved) | set(config)
            if saved.get(k) != config.get(k) and k not in DIGEST_EXEMPT
        )
        raise CheckpointError(
            f"{path}: the run was made with other settings ({', '.join(changed) or 'unknown'} "
            "differ); resume with the run's own settings (its state.json lists them)"
        )
    return checkpoint


def read_init_adapter(
    path: Path, model_state: Mapping[str, torch.Tensor], alpha: int
) -> AdapterState:
    """The adapter a new run starts from (`federation.init-adapter`), fp32 in the model's key
    order; refused, naming the path and the first key that differs, unless it fits the
    model's keys and shapes and was made with the same LoRA scale (`alpha`)."""
    where = f"federation.init-adapter {path}"
    try:
        state, config = load_adapter(path)
        check_adapter_state(state, {k: tuple(v.shape) for k, v in model_state.items()})
    except AdapterError as e:
        raise AdapterError(f"{where}: {e}") from e
    if config.lora_alpha != alpha:
        raise AdapterError(
            f"{where}: made with lora alpha {config.lora_alpha}, this run has lora.alpha "
            f"{alpha}; the same factors would compute another update, so set lora.alpha = "
            f"{config.lora_alpha}"
        )
    return {key: state[key].to(torch.float32) for key in model_state}
