"""How a classifier turns a note's token states into the one vector its head reads
(`model.pooling`): `cls`, the model's own pooler over the first ([CLS]) position, or `mean`,
the mean of the last hidden states over the note's tokens (padding excluded), which is how
sentence encoders such as all-MiniLM-L6-v2 were trained (its `1_Pooling/config.json`).

Mean pooling replaces a BERT-family model's pooler module in place, so the model's own
forward, peft's wrapping and the classification head stay as they are; the pooler has no
weights, so adapters keep their layout.
"""

from __future__ import annotations

from typing import Any

import torch

POOLINGS = ("cls", "mean")


class PoolingError(ValueError):
    """The model cannot be pooled as `model.pooling` asks."""


class MeanPooler(torch.nn.Module):
    """The mean of the last hidden states over the positions the attention mask keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None
        """The current batch's attention mask, set by the encoder's forward pre-hook."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        keep = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Make a BERT-family sequence classifier pool by the mean of its last hidden states;
    PoolingError for a model without a pooler to replace (decoder models read their last
    token instead)."""
    encoder = getattr(model, "base_model", None)
    if encoder is None or encoder is model or not hasattr(encoder, "pooler"):
        raise PoolingError(
            f'model.pooling "mean" needs an encoder with a pooler (BERT family); '
            f'{type(model).__name__} has none: use model.pooling = "cls"'
        )
    pooler = MeanPooler()
    encoder.pooler = pooler

    def remember_mask(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
