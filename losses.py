"""The output head and its cross-entropy, a chunk of positions at a time (model.loss_chunk_size).

GPT-2's head turns each position into 50,304 logits: for a batch of 16 x 1024 that is 824M
numbers, 1.6 GB in bfloat16, 3.3 GB again in float32 for the softmax, and as much for their
gradient. In chunks only one chunk's logits exist at a time. Each chunk's gradients are taken
as soon as its logits are (the softmax minus the one-hot target, multiplied back through the
head), so nothing is recomputed in the backward pass, as torch.utils.checkpoint would (one
more run of the head's matmul, a third more of its cost); the price is holding the head's
weight gradient, vocab x n_embd in float32, from the forward pass to the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # a target the loss skips (chat data: every token but the assistant's)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int) -> torch.Tensor:
    """Return the summed cross-entropy of the logits hidden @ weight.T (N, vocab) over the
    targets (N,) that are not IGNORE_INDEX, never building more than chunk_size rows of logits.

    Equal to F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum") with its
    gradients; without gradients to take (evaluation) the chunks are only scored.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(hidden, weight, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        logits = F.linear(part, weight).float()
        total = total + F.cross_entropy(logits, part_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


class _ChunkedHeadLoss(torch.autograd.Function):
    """The summed loss, with the gradients for hidden and weight computed in the forward pass
    and only scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_hidden = []
        for part, part_targets in zip(hidden.split(chunk_size), targets.split(chunk_size)):
            logits = F.linear(part, weight)  # (chunk, vocab), in autocast's dtype where it is on
            summed, grad_logits = _loss_and_logit_gradients(logits.float(), part_targets)
            total = total + summed
            grad_logits = grad_logits.to(logits.dtype)  # the matmuls run as the forward's did
            grad_hidden.append(grad_logits @ weight.to(logits.dtype))
            grad_weight += grad_logits.t() @ part.to(logits.dtype)
        ctx.save_for_backward(torch.cat(grad_hidden).to(hidden.dtype), grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None


def _loss_and_logit_gradients(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the summed cross-entropy of float32 logits (rows, vocab) and its gradient with
    respect to them: softmax - one_hot(target) on counted rows, zero on ignored ones."""
    counted = targets != IGNORE_INDEX
    index = torch.where(counted, targets, 0).unsqueeze(1)  # any valid column for ignored rows
    log_probs = F.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, index).squeeze(1)
    summed = -torch.where(counted, picked, 0.0).sum()
    grad = log_probs.exp_()  # the softmax, in the log-probabilities' memory
    grad.scatter_add_(1, index, -counted.unsqueeze(1).to(grad.dtype))
    return summed, grad.mul_(counted.unsqueeze(1))
