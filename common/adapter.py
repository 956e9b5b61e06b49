"""The adapter: the trainable LoRA tensors and head, moved in and out of a model and onto disk.

Keys are PEFT's saved names (`base_model.model....lora_A.weight`), so a state written by
`save_adapter` loads with `PeftModel.from_pretrained(base, directory)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save

from common.files import fsync_file, replace_dir, staging_dir, write_atomic

AdapterState = dict[str, torch.Tensor]
WireDtype = Literal["fp32", "fp16"]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WIRE_NUMPY: dict[str, type[np.floating]] = {"fp32": np.float32, "fp16": np.float16}


class AdapterError(ValueError):
    """An adapter does not fit the model or its files are unreadable; the message names it."""


def get_adapter_state(model: PeftModel) -> AdapterState:
    """A detached CPU copy of the adapter: LoRA tensors and saved head, never the base."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def set_adapter_state(
    model: PeftModel, state: Mapping[str, torch.Tensor], fix: str | None = None
) -> None:
    """Load `state` into the model's adapter; keys and shapes must match exactly (`fix`, if
    given, is the advice an error ends with)."""
    expected = get_peft_model_state_dict(model)
    check_adapter_state(state, {k: tuple(v.shape) for k, v in expected.items()}, fix)
    set_peft_model_state_dict(model, dict(state))


def check_adapter_state(
    state: Mapping[str, torch.Tensor | np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    fix: str | None = None,
) -> None:
    """Raise AdapterError unless `state` has exactly the keys and shapes in `shapes`; the
    message ends with `fix` when given, else with the settings to compare."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise AdapterError(
            f"adapter keys do not match the model: {len(missing)} missing "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}); "
            + (fix or "were the model and LoRA settings the same when it was made?")
        )
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise AdapterError(
                f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model needs "
                f"{shape}; " + (fix or "check lora.rank and model.num-labels")
            )


def to_wire(state: Mapping[str, torch.Tensor], dtype: WireDtype = "fp32") -> dict[str, np.ndarray]:
    """NumPy arrays for a Flower ArrayRecord, in fp32 or fp16 (NumPy has no bfloat16)."""
    if dtype not in WIRE_NUMPY:
        raise AdapterError(f"wire dtype must be one of {sorted(WIRE_NUMPY)}, got {dtype!r}")
    np_dtype = WIRE_NUMPY[dtype]
    return {
        k: v.detach().to("cpu", torch.float32).numpy().astype(np_dtype) for k, v in state.items()
    }


def from_wire(arrays: Mapping[str, np.ndarray]) -> AdapterState:
    """Torch fp32 tensors from wire arrays."""
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for k, a in arrays.items()}


def save_adapter(state: Mapping[str, torch.Tensor], config: PeftConfig, directory: Path) -> None:
    """Write `directory` in PEFT layout, atomically: it is complete or absent, never partial."""
    directory = Path(directory)
    with staging_dir(directory) as staging:
        write_adapter_files(state, config, staging)
        replace_dir(staging, directory)


def write_adapter_files(
    state: Mapping[str, torch.Tensor], config: PeftConfig, directory: Path
) -> list[Path]:
    """Write the two PEFT files into an existing directory and flush them to disk."""
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fsync_file(directory / CONFIG_FILE)
    # Serialised here and written by Python, so that a full disk raises OSError (errno set),
    # not safetensors' own error type.
    write_atomic(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    return [directory / CONFIG_FILE, directory / WEIGHTS_FILE]


def load_adapter(directory: Path) -> tuple[AdapterState, LoraConfig]:
    """Read an adapter in PEFT layout; errors name the directory and the missing piece."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise AdapterError(f"{directory}: {name} missing; not a PEFT adapter directory")
    try:
        config = LoraConfig.from_pretrained(str(directory))
        state = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:
        raise AdapterError(f"{directory}: unreadable adapter ({type(e).__name__}: {e})") from e
    return state, config
