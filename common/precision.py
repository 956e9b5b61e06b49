"""Where the model computes and in which precision, decided from `model.device`,
`model.precision` and what the hardware computes natively; and the record of that choice
that every result carries (run.json, metrics, report, model card, the site commands' output,
benchmarks), because the same settings give different numbers in fp32 and in bf16.

`auto` means bf16 autocast on a CUDA GPU that computes bf16 natively, and fp32 everywhere
else, CPUs included. Measured on a 2-core CPU with AVX512-BF16 (`python -m
simulations.precision`, BENCHMARKS.md "Training precision"): bf16 trains 1.57x faster and
costs no AUROC that 3 seeds can see (-0.001, 95% CI -0.009 to +0.006), but with it the same
command gives other numbers on machines of the same kind without native bf16 (where
emulated bf16 is ~20x slower than fp32), and a federation of CPU sites trains in a mix of
precisions. Reproducible numbers are the default; a site that wants the speed sets `bf16`,
and the site commands say so where the CPU has it.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from common.config import ModelSettings

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16"]


class DeviceError(ValueError):
    """`model.device` names a device this machine does not have."""


@dataclass(frozen=True)
class Compute:
    """The device and precision one process computes in."""

    device: Device
    precision: Precision
    native_bf16: bool
    """Whether the device computes bf16 in hardware (emulated bf16 is many times slower)."""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def fields(self) -> dict[str, str]:
        """What a result records: device and precision, two words from a fixed vocabulary."""
        return {"device": self.device, "precision": self.precision}

    def describe(self) -> str:
        """For people: `cpu, fp32` or `cuda, bf16 autocast`; emulated bf16 flagged, and fp32
        where the device could compute bf16 natively."""
        if self.precision == "fp32":
            faster = ' (native bf16 here: model.precision = "bf16" is faster)'
            return f"{self.device}, fp32" + (faster if self.native_bf16 else "")
        native = "" if self.native_bf16 else " (emulated: no native bf16)"
        return f"{self.device}, bf16 autocast{native}"


def pick_device(setting: str) -> torch.device:
    """The torch device for `model.device`."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceError('model.device is "cuda" but no CUDA device is available; use "auto"')
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_for(settings: ModelSettings, device: torch.device) -> Compute:
    """The precision `model.precision` means on `device` (see the module docstring)."""
    native = native_bf16(device)
    kind: Device = "cuda" if device.type == "cuda" else "cpu"
    if settings.precision == "bf16":
        if not native:
            _warn_once(
                f"model.precision is bf16 but {device.type} has no native bf16: "
                "training will be many times slower than fp32; use auto or fp32"
            )
        return Compute(kind, "bf16", native)
    bf16 = settings.precision == "auto" and kind == "cuda" and native
    return Compute(kind, "bf16" if bf16 else "fp32", native)


def autocast_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `model.precision` on this device, or None for plain fp32."""
    return compute_for(settings, device).dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """An autocast context for `dtype` on `device`; a no-op when dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@cache
def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 matmuls in hardware (on a CPU: AVX512-BF16 or AMX,
    as oneDNN sees it; `ONEDNN_MAX_CPU_ISA=AVX2` hides them, as on a CPU without)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@cache
def _warn_once(message: str) -> None:
    log.warning(message)


def hardware() -> dict[str, object]:
    """The machine a benchmark ran on: CPU model, cores, native bf16, GPU, torch version."""
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu-native-bf16": native_bf16(torch.device("cpu")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_of(model: torch.nn.Module, settings: ModelSettings) -> Compute:
    """What a built model computes in under `settings` (its device, their precision)."""
    return compute_for(settings, next(model.parameters()).device)


def resolve_compute(settings: ModelSettings) -> Compute:
    """What a model built with `settings` computes in on this machine."""
    return compute_for(settings, pick_device(settings.device))
