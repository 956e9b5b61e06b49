"""FFA-LoRA (`lora.aggregation = "ffa"`): every site's A factors stay at their shared
initial value, drawn from `lora.init-seed`, and only B (and the classification head) is
trained and travels, both ways. Averaging B then averages the products B @ A exactly, and
the adapter on the wire is about half its size.

Each side rebuilds the frozen A from the same seed; the coordinator sends the sha256 of
its A with every task (`frozen-sha256`), and a site whose own A differs (other model files,
other library versions) refuses the task rather than train a different adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel

from common.adapter import AdapterError, AdapterState, get_adapter_state, set_adapter_state
from common.config import LoraSettings
from common.lora_math import is_lora_a
from common.signing import adapter_digest


def frozen(lora: LoraSettings) -> bool:
    return lora.aggregation == "ffa"


def frozen_part(state: Mapping[str, torch.Tensor], lora: LoraSettings) -> AdapterState:
    """The part of an adapter that never travels: its A factors under FFA-LoRA, else
    nothing."""
    return {k: v for k, v in state.items() if frozen(lora) and is_lora_a(k)}


def frozen_digest(part: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the frozen factors, as fp32 arrays (common.signing's adapter digest)."""
    return adapter_digest({k: v.detach().cpu().float().numpy() for k, v in part.items()})


def load_received(
    model: PeftModel, received: Mapping[str, torch.Tensor], lora: LoraSettings, digest: str = ""
) -> None:
    """Load the global adapter a site was sent. Under FFA-LoRA it lacks the frozen A, which
    the model holds from the shared initialisation; with `digest`, that A is checked
    against the coordinator's first."""
    if frozen(lora):
        own = frozen_part(get_adapter_state(model), lora)
        if digest and frozen_digest(own) != digest:
            raise AdapterError(
                "this site's frozen LoRA A factors differ from the coordinator's (sha256 "
                f"{frozen_digest(own)[:16]} vs {digest[:16]}): the model files, lora settings "
                "or the torch/peft versions differ; install what the coordinator runs"
            )
        received = {**own, **received}
    set_adapter_state(model, received)
