"""Which device and precision a run computes in: both answers of the hardware are forced
here (native bf16 or not), so that the tests pass alike on CPUs with and without AVX512-BF16."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import precision
from common.config import ModelSettings, load_config
from common.model import build_model
from common.precision import Compute, compute_for, compute_of, hardware, resolve_compute

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The hardware's answer, forced: every device computes bf16 natively, or none does."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: request.param)
    precision._warn_once.cache_clear()
    return bool(request.param)


def _settings(value: str) -> ModelSettings:
    return load_config({"model.precision": value}).model


def test_auto_is_fp32_on_every_cpu(native: bool) -> None:
    assert compute_for(_settings("auto"), CPU) == Compute("cpu", "fp32", native)
    assert compute_for(_settings("auto"), CPU).dtype is None


def test_auto_is_bf16_on_a_gpu_only_where_it_computes_bf16_natively(native: bool) -> None:
    chosen = compute_for(_settings("auto"), CUDA)
    assert chosen == Compute("cuda", "bf16" if native else "fp32", native)
    assert chosen.dtype == (torch.bfloat16 if native else None)


def test_fp32_is_fp32_everywhere(native: bool) -> None:
    for device in (CPU, CUDA):
        assert compute_for(_settings("fp32"), device).precision == "fp32"


def test_bf16_is_bf16_everywhere_and_warns_once_where_it_is_emulated(
    native: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        chosen = [compute_for(_settings("bf16"), CPU) for _ in range(3)]
    assert all(c == Compute("cpu", "bf16", native) and c.dtype == torch.bfloat16 for c in chosen)
    warnings = [r.message for r in caplog.records if "no native bf16" in r.message]
    assert len(warnings) == (0 if native else 1)
    described = chosen[0].describe()
    assert described == (
        "cpu, bf16 autocast" if native else "cpu, bf16 autocast (emulated: no native bf16)"
    )


def test_what_a_result_records_is_two_words(native: bool) -> None:
    assert Compute("cuda", "bf16", native).fields() == {"device": "cuda", "precision": "bf16"}
    hint = ' (native bf16 here: model.precision = "bf16" is faster)' if native else ""
    assert Compute("cpu", "fp32", native).describe() == "cpu, fp32" + hint


def test_a_built_model_computes_in_what_its_settings_resolve_to(tiny_bert_dir: Path) -> None:
    cfg = load_config({"model.path": str(tiny_bert_dir), "model.device": "cpu"})
    assert compute_of(build_model(cfg), cfg.model) == resolve_compute(cfg.model)
    assert resolve_compute(cfg.model).fields() == {"device": "cpu", "precision": "fp32"}


def test_a_cpu_without_native_bf16_can_be_imitated_with_onednn_max_isa() -> None:
    """How to check the other branch on a machine that has AVX512-BF16 (README): oneDNN
    limited to AVX2 reports no native bf16, whatever the CPU."""
    code = "import torch, common.precision as p; print(p.native_bf16(torch.device('cpu')))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_benchmarks_record_the_machine() -> None:
    found = hardware()
    assert set(found) == {"cpu", "cores", "cpu-native-bf16", "gpu", "torch"}
    assert isinstance(found["cpu-native-bf16"], bool) and found["cores"] >= 1
