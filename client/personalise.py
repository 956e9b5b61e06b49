"""Personalisation after a federation: a site adapts the global adapter to its own records
with a little more local training, and keeps the result only where its validation split says
it is better than the global adapter as it came. A site with an unusual case mix gains; a
site the global model already serves well keeps the global model, never a worse one.

    model = load_adapted_model(Path("global-adapter"), cfg)
    result = personalise(model, load_site(Path("notes.jsonl"), cfg), cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peft import PeftModel

from client.dataset import SiteData
from client.train import train_calls
from common.adapter import get_adapter_state, set_adapter_state
from common.config import FedtuneConfig
from common.evaluation import evaluate

CRITERION = {"classification": "auroc", "causal-lm": "loss"}
"""The validation metric that decides, per task (AUROC higher is better; loss lower)."""


@dataclass(frozen=True)
class Personalised:
    """What personalisation did at one site."""

    kept: bool
    """Whether the adapted adapter replaced the global one (it scored better on validation)."""
    criterion: str
    before: float
    """The global adapter's validation score."""
    after: float
    """The adapted adapter's validation score."""
    steps: int


def personalise(
    model: PeftModel, site: SiteData, cfg: FedtuneConfig, epochs: int = 1
) -> Personalised:
    """Train the model's current (global) adapter `epochs` passes over the site's training
    split, on a fresh learning-rate schedule; keep the result if it scores better on the
    validation split, else restore the global adapter. The model ends in eval mode."""
    if len(site.val) == 0:
        raise ValueError("personalisation needs validation records: raise data.val-fraction")
    criterion = CRITERION[cfg.model.task]
    start = get_adapter_state(model)
    before = evaluate(model, site.val, cfg)[criterion]
    trained = train_calls(model, site.train, cfg, epochs, local_epochs=1, local_steps=0)
    steps = sum(result.steps for result in trained)
    after = evaluate(model, site.val, cfg)[criterion]
    kept = _better(after, before, criterion)
    if not kept:
        set_adapter_state(model, start)
    model.eval()
    return Personalised(kept, criterion, before, after, steps)


def _better(after: float, before: float, criterion: str) -> bool:
    if math.isnan(after):
        return False
    if math.isnan(before):
        return True
    return after > before if criterion == "auroc" else after < before
