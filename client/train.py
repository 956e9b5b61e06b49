"""Local training of the LoRA model on a site's tokenised records."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from common.batches import Tokenized, iter_batches
from common.config import FedtuneConfig, TrainSettings
from common.evaluation import balanced_class_weights, batch_loss
from common.model import HEAD_NAMES
from common.precision import autocast, autocast_dtype

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did."""

    loss: float
    """Mean training loss over the call's batches."""
    steps: int
    examples: int
    tokens: int
    """Non-padding tokens processed."""
    padded_tokens: int
    """Token positions processed, padding included."""
    seconds: float


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then cosine to zero."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_call(num_examples: int, settings: TrainSettings) -> int:
    """Optimizer steps one training call takes over `num_examples` training records."""
    if settings.local_steps:
        return settings.local_steps
    batches = math.ceil(num_examples / settings.batch_size)
    return math.ceil(batches / settings.grad_accum_steps) * settings.local_epochs


def schedule_over(
    cfg: FedtuneConfig, num_examples: int, calls: int, **train: object
) -> tuple[FedtuneConfig, int]:
    """Settings for one of `calls` training calls that share one learning-rate schedule
    (epochs of local training, or federated rounds), and the steps each call takes.

    `train` overrides training keys first (for example local_epochs=1). The schedule lasts
    `train.schedule-steps` or, when 0, calls x steps per call.
    """
    settings = cfg.train.model_copy(update=train)
    per_call = steps_per_call(num_examples, settings)
    schedule = settings.schedule_steps or per_call * calls
    settings = settings.model_copy(update={"schedule_steps": schedule})
    return cfg.model_copy(update={"train": settings}), per_call


def train_calls(
    model: PeftModel,
    data: Tokenized,
    cfg: FedtuneConfig,
    calls: int,
    on_call: Callable[[int, TrainResult], None] | None = None,
    **train: object,
) -> list[TrainResult]:
    """`calls` training calls in a row on one learning-rate schedule spanning them (a site's
    rounds without the averaging in between: a baseline, or personalisation); `train`
    overrides training keys as in `schedule_over`; `on_call(k, result)` after call k."""
    call_cfg, per_call = schedule_over(cfg, len(data), calls, **train)
    results = []
    for k in range(calls):
        results.append(train_local(model, data, call_cfg, start_step=k * per_call))
        if on_call is not None:
            on_call(k + 1, results[-1])
    return results


def train_local(
    model: PeftModel,
    data: Tokenized,
    cfg: FedtuneConfig,
    *,
    start_step: int = 0,
    proximal_mu: float = 0.0,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train the adapter in place with AdamW for one call's steps.

    `start_step` places this call on a schedule that may span federated rounds
    (`train.schedule-steps`); batch order and dropout are seeded from `train.seed` and it.
    `proximal_mu` > 0 adds FedProx's mu/2 * ||w - w_start||^2 over the trainable weights,
    which keeps the update near the global adapter it started from.
    """
    settings = cfg.train
    if len(data) == 0:
        raise ValueError("no training records: the training split is empty")
    steps = steps_per_call(len(data), settings)
    total = settings.schedule_steps or start_step + steps
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.model, device)
    optimizer = _optimizer(model, settings)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    anchor = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    task = cfg.model.task
    weights = None
    if task == "classification" and settings.class_weights == "balanced":
        labels = [int(t) for t in data.targets]  # type: ignore[arg-type]
        weights = balanced_class_weights(labels, cfg.model.num_labels).to(device)
    model.train()
    started = time.perf_counter()
    loss_sum, examples, tokens, padded = 0.0, 0, 0, 0
    stream = _batch_stream(data, settings, start_step)
    with _seeded(settings.seed + start_step, device):
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(start_step + step, group["peak"], settings.warmup_steps, total)
            step_loss = 0.0
            for _ in range(settings.grad_accum_steps):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
                with autocast(device, amp):
                    loss = batch_loss(model, batch, task, "mean", weights)
                objective = loss
                if anchor:
                    objective = loss + 0.5 * proximal_mu * _drift(trainable, anchor)
                (objective / settings.grad_accum_steps).backward()
                step_loss += loss.item() / settings.grad_accum_steps
                examples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += step_loss
            if on_step is not None:
                on_step(step + 1, step_loss)
    return TrainResult(
        loss=loss_sum / steps,
        steps=steps,
        examples=examples,
        tokens=tokens,
        padded_tokens=padded,
        seconds=time.perf_counter() - started,
    )


def _drift(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """Squared distance of the weights from where this call started."""
    return torch.stack([((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)]).sum()


def _optimizer(model: PeftModel, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable weights: decay on matrices only; the classification head at
    its own peak learning rate when `train.head-learning-rate` sets one. Each group keeps its
    peak under "peak" for the schedule."""
    head_peak = settings.head_learning_rate or settings.learning_rate
    groups = []
    for is_head, peak in ((False, settings.learning_rate), (True, head_peak)):
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and is_head_weight(n) == is_head
        ]
        for decays in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decays]
            if chosen:
                decay = settings.weight_decay if decays else 0.0
                groups.append({"params": chosen, "weight_decay": decay, "peak": peak})
    return torch.optim.AdamW(groups, lr=settings.learning_rate)


def is_head_weight(name: str) -> bool:
    """Whether a parameter belongs to the classification head (peft's modules_to_save copy
    of `classifier` or `score`)."""
    return any(f".{head}." in f".{name}" for head in HEAD_NAMES) and "lora_" not in name


def _batch_stream(
    data: Tokenized, settings: TrainSettings, start_step: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: epoch after epoch, each in a fresh seeded order."""
    epoch = 0
    while True:
        seed = int(np.random.SeedSequence([settings.seed, start_step, epoch]).generate_state(1)[0])
        yield from iter_batches(data, settings.batch_size, shuffle=True, seed=seed)
        epoch += 1


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout for this call without disturbing the caller's RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
