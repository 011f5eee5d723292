"""Optimizers, their schedule and the update step: AdamW, or Muon for the hidden weight
matrices with AdamW for everything else (muon.py).

Every group carries `initial_lr`, and the schedule scales each group's learning rate by the
same factor. The update step never reads the device on the host: a step with a non-finite
loss or gradient is skipped on the device (the optimizer's found_inf, as GradScaler does).
"""
from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Optional, Sequence

import torch

from config import TrainingConfig, cooldown_start
from distributed import Collectives, local, whole
from model import target_count
from muon import MuonWithAdamW, fused_splits, uses_muon
from utils import notice


def newton_schulz_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 as in Muon's reference where it is fast (GPUs; CPUs that train in bf16 have it
    in hardware, and it halved a 4x128 model's step there: 26 -> 12 ms); float32 on other CPUs,
    which only emulate bf16 matmuls."""
    return torch.bfloat16 if device.type == "cuda" or compute_dtype == torch.bfloat16 else torch.float32


def make_optimizer(model: torch.nn.Module, t: TrainingConfig, device: torch.device,
                   compute_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """Return the configured optimizer; weight decay only on matrices, never on gains and biases."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for _, p in named if p.dim() >= 2]
    others = [p for _, p in named if p.dim() < 2]
    if t.optimizer == "adamw":
        groups = [{"params": matrices, "weight_decay": t.weight_decay, "initial_lr": t.lr},
                  {"params": others, "weight_decay": 0.0, "initial_lr": t.lr}]
        # one kernel for all parameters instead of one per tensor, and a skip on the device
        # (found_inf); torch >= 2.4 has it for CUDA, CPU (pytorch#123074) and MPS (pytorch#127242)
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    hidden = [(n, p) for n, p in named if uses_muon(n, p)]
    if not hidden:
        notice(f"training.optimizer muon found no 2-D weights under 'blocks.' in {type(model).__name__}, "
               "so AdamW trains them all; keep the transformer layers in self.blocks for Muon")
    embeddings = [p for n, p in named if p.dim() >= 2 and not uses_muon(n, p)]
    splits = fused_splits(model)
    groups = [
        {"params": [p for _, p in hidden], "splits": [splits.get(n) for n, _ in hidden], "muon": True,
         "lr": t.muon_lr, "initial_lr": t.muon_lr},  # no decay
        {"params": embeddings, "lr": t.lr, "initial_lr": t.lr, "weight_decay": t.weight_decay},
        {"params": others, "lr": t.lr, "initial_lr": t.lr, "weight_decay": 0.0},
    ]
    return MuonWithAdamW(groups, betas=(t.beta1, t.beta2), momentum=t.muon_momentum,
                         newton_schulz_dtype=newton_schulz_dtype(device, compute_dtype))


def learning_rate(step: int, t: TrainingConfig, max_steps: int) -> float:
    """Return the learning rate at `step`: linear warmup, then a cosine decay to min_lr, or
    (schedule wsd) a stable phase at lr and a linear cooldown to min_lr at the end."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_end = t.lr_decay_steps or max_steps
    if t.schedule == "wsd":
        decay_start = cooldown_start(t, max_steps)
        progress = min(1.0, max(0.0, (step - decay_start) / max(1.0, decay_end - decay_start)))
        return t.lr + progress * (t.min_lr - t.lr)
    progress = min(1.0, (step - t.warmup_steps) / max(1, decay_end - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def total_steps(t: TrainingConfig, train_tokens: int, tokens_per_step: int) -> int:
    """Return the number of optimizer steps: from `epochs` when set, else `max_steps`."""
    if t.epochs is None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's initial learning rate by the schedule's current factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


# ---------------------------------------------------------------- the update step


def token_weights(targets: Sequence[torch.Tensor], collectives: Collectives) -> torch.Tensor:
    """Return the weight of each micro-batch's mean loss that makes a step over masked data
    (chat: only the replies count) weigh every counted target of the step, on every rank,
    alike; the mean over micro-batches would weigh a target more in a batch with fewer.

    Micro-batch i of rank r has n_ri counted targets and mean loss L_ri (the model's contract),
    and N = sum_ri n_ri. The step's loss is sum_ri n_ri L_ri / N. DDP and FSDP average the
    ranks' gradients (their sum / W, W = world_size), so rank r backpropagates sum_i w_ri L_ri
    with w_ri = W n_ri / N: (1 / W) sum_r sum_i W n_ri / N grad L_ri is the step loss's
    gradient, and the ranks' mean of sum_i w_ri L_ri is the step's loss. Without a mask every
    n_ri is B x T and w_ri = 1 / n_micro.

    N costs one all-reduce of one integer per step, on the device: nothing is read on the
    host. A step without any counted target weighs its (zero) losses 0.
    """
    counts = torch.stack([target_count(y) for y in targets])
    total = collectives.sum_(counts.sum()).clamp(min=1)
    return counts * collectives.ranks.world_size / total


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_micro: int,
    autocast: AbstractContextManager,
    scaler: torch.amp.GradScaler,
    sync: Callable[[bool], AbstractContextManager] = lambda last: contextlib.nullcontext(),
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Backpropagate the weighted sum of the losses of `n_micro` micro-batches; return it
    (detached: this rank's share of the step's loss).

    By default each micro-batch's loss is divided by n_micro, so the summed gradients equal
    those of one batch n_micro times larger when every micro-batch counts as many targets;
    with a loss mask they do not, and `weights` (token_weights) give each loss its share of
    the step's targets instead. `sync(last)` wraps each micro-step: under DDP only the last
    one all-reduces the summed gradients.

    A non-finite loss makes every gradient it reaches NaN (a loss of inf can have finite
    gradients), so the gradient norm alone says whether a step is sound, and under torchrun
    it says so alike on every rank: DDP averages one rank's NaN into all of them.
    """
    losses = []
    for index, (x, y) in enumerate(micro_batches):
        with sync(index == n_micro - 1):
            with autocast:
                _, loss = model(x, y)
            loss = loss / n_micro if weights is None else loss * weights[index]
            poison = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)  # 1.0: exactly the loss
            scaler.scale(loss * poison).backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
) -> torch.Tensor:
    """Clip the gradients, update the weights unless their norm is not finite, clear the
    gradients; return (on the device) whether the step was applied.

    Nothing is read on the host: a bad step is skipped on the device, where the optimizer's
    kernels see `found_inf` (torch's fused AdamW, our MuonWithAdamW) and leave every weight,
    moment and step count as it was. With fp16, GradScaler's inf check and scale update also
    stay on the device, since its step() (which reads found_inf for most optimizers) is not used.
    """
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    applied = torch.isfinite(grad_norm)  # a non-finite loss has made its gradients NaN
    optimizer.found_inf = (~applied).float()  # what GradScaler hands a fused optimizer
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    scaler.update()  # with fp16: a lower scale after an overflow (its own check, on the device)
    optimizer.zero_grad(set_to_none=True)
    return applied


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Return whether this process's weights (its slices of them, under FSDP) are finite."""
    return bool(torch.stack([torch.isfinite(local(p)).all() for p in model.parameters()]).all())
