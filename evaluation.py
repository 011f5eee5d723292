"""The loss of a model over the batches of an evaluation, summed over the ranks under torchrun.

Scored by the model uncompiled, in eval mode and without gradients: evaluation never compiles
(compilation.py says why).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

from compilation import uncompiled
from distributed import Collectives
from model import target_count

# the batches of one split: ((inputs, targets), whether it counts); a batch that does not
# count is one FSDP's gathers make a rank run so that every rank runs as many
SplitBatches = Callable[[str], Iterable[tuple[tuple[torch.Tensor, torch.Tensor], bool]]]


@torch.no_grad()
def mean_losses(model: torch.nn.Module, batches: SplitBatches, autocast: contextlib.AbstractContextManager,
                collectives: Collectives, device: torch.device) -> dict[str, float]:
    """Return the mean loss per counted target on each split over its batches (under torchrun
    each rank scores its share, and the ranks' sums are added up)."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=device)
        targets = torch.zeros((), dtype=torch.int64, device=device)
        for (x, y), counts in batches(split):
            with autocast, uncompiled():
                _, loss = model(x, y)
            if counts:  # a batch without targets adds 0 to both, even where its 0/0 loss is NaN
                counted = target_count(y)  # all B x T of them, but for masked chat data
                total += torch.where(counted > 0, loss.float() * counted, 0.0)
                targets += counted
        summed, count = collectives.sum_(total).item(), collectives.sum_(targets).item()
        losses[split] = summed / count if count else math.nan  # nothing to score
    model.train()
    return losses
