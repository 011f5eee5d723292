"""Muon for the hidden weight matrices, AdamW for everything else, in one optimizer whose step
costs a number of operations that grows with the distinct shapes of the model, not with its layers.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") takes
SGD-momentum's update for a weight matrix and replaces it by the nearest semi-orthogonal
matrix, found with a few Newton-Schulz iterations (for a fused weight, such as our attention's
q, k and v in one, for each of its matrices); embeddings, the head and the 1-D gains and
biases keep AdamW, through torch's fused AdamW kernel.

A step can be skipped on the device, as torch's fused AdamW skips one for GradScaler: with
`optimizer.found_inf` set (a float tensor, 1.0 to skip), no weight, moment, momentum buffer
or step count changes, and the host never reads the flag.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim.adamw import adamw

from distributed import local, shard_like, whole_stack

# The quintic Newton-Schulz coefficients from the Muon write-up: they push every singular
# value of a matrix scaled to norm <= 1 towards 1 within a handful of steps.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Return approximately semi-orthogonal matrices with the row/column spaces of `matrix`
    (one matrix, or a stack of same-shaped ones: (..., rows, columns)), iterating in `dtype`."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm wants one batch dimension
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        # a x + (b gram + c gram^2) x, as two multiply-adds (one kernel each, not three)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*batch_shape, *x.shape[-2:])
    return (x.transpose(-2, -1) if tall else x).to(matrix.dtype)


def uses_muon(name: str, param: torch.nn.Parameter) -> bool:
    """Muon takes the 2-D weights inside the transformer blocks; the rest stays with AdamW."""
    return param.dim() == 2 and name.startswith("blocks.")


def fused_splits(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Return {name: rows of each matrix} for the weights that hold several matrices stacked:
    the c_attn of each attention layer that says how its queries, keys and values are stacked
    (our CausalSelfAttention's qkv_widths). Every other weight, as those of a model of one's own
    that says nothing, is one matrix."""
    return {f"{name}.c_attn.weight": tuple(module.qkv_widths) for name, module in model.named_modules()
            if hasattr(module, "qkv_widths") and isinstance(getattr(module, "c_attn", None), torch.nn.Linear)}


def muon_updates(stacks: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Return Muon's update for each stack of matrices (n, rows, columns): their orthogonalised
    momenta, in one batched orthogonalisation per distinct matrix shape (a tall one counted as
    its transpose, which orthogonalize iterates on anyway)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, stack in enumerate(stacks):
        by_shape.setdefault(tuple(sorted(stack.shape[1:])), []).append(index)
    updates: dict[int, torch.Tensor] = {}
    for indices in by_shape.values():
        wide = [stacks[i] if stacks[i].size(1) <= stacks[i].size(2) else stacks[i].transpose(1, 2) for i in indices]
        done = orthogonalize(wide[0] if len(wide) == 1 else torch.cat(wide), dtype=dtype)
        for index, update in zip(indices, done.split([len(s) for s in wide])):
            rows, columns = stacks[index].shape[1:]
            # the orthogonal update has unit spectral norm; a tall matrix gets a larger step
            # so that its per-element size matches a square one's
            scale = max(1.0, rows / columns) ** 0.5
            updates[index] = (update.transpose(1, 2) if rows > columns else update) * scale
    return [updates[index] for index in range(len(stacks))]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for groups with `muon: True`, AdamW (decoupled weight decay) for the others.

    A Muon group may list `splits`, one per parameter: None for a matrix, or the rows of each
    matrix stacked in a fused one (q, k and v), which Muon orthogonalises apart, as reference
    Muon does with separate matrices. The parameters of a group that share a shape and splits
    (the same layer in every block) are updated as one stack, so a step runs a fixed number of
    operations per shape; AdamW's part is one fused kernel per group.
    """

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95,
                 newton_schulz_dtype: torch.dtype = torch.bfloat16):
        super().__init__(groups, dict(betas=betas, eps=eps, momentum=momentum, weight_decay=0.0,
                                      muon=False, splits=None))
        self.newton_schulz_dtype = newton_schulz_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state, also one written before the AdamW steps became tensors (an int "step")."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            if "step" in state:  # fused AdamW counts steps in a float tensor beside the weights
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(local(param).device)

    @torch.no_grad()
    def step(self, closure=None):
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.bool()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_update(group, skip)
            else:
                self._adamw_update(group, found_inf)
        return None

    # ------------------------------------------------------------ Muon

    def _muon_update(self, group: dict, skip: Optional[torch.Tensor]) -> None:
        # None, or missing from a group loaded from a checkpoint older than splits
        splits = group.get("splits") or [None] * len(group["params"])
        families: dict[tuple, list[torch.Tensor]] = {}
        for param, rows in zip(group["params"], splits):
            if param.grad is not None:
                families.setdefault((param.shape, tuple(rows) if rows else None), []).append(param)
        momenta = [self._nesterov_momenta(params, group["momentum"], skip) for params in families.values()]
        parts = [m.split(rows, dim=1) if rows else (m,) for m, (_, rows) in zip(momenta, families)]
        updates = iter(muon_updates([part for pieces in parts for part in pieces], self.newton_schulz_dtype))
        for params, pieces in zip(families.values(), parts):
            done = [next(updates) for _ in pieces]
            update = done[0] if len(done) == 1 else torch.cat(done, dim=1)  # fused: stacked again
            if skip is not None:
                update = torch.where(skip, 0.0, update)  # a skipped step's (non-finite) update
            self._apply(params, update, group, skip)

    def _nesterov_momenta(self, params: list[torch.Tensor], momentum: float,
                          skip: Optional[torch.Tensor]) -> torch.Tensor:
        """Advance the momentum buffers of `params` (same shape); return their Nesterov momenta
        as one stack of whole matrices (Newton-Schulz needs them whole: under FSDP every rank
        gathers them, computes the same updates and applies its own slice)."""
        buffers = [local(self._momentum_buffer(p)) for p in params]
        grads = torch.stack([local(p.grad) for p in params])
        previous = torch.stack(buffers)
        advanced = previous * momentum + grads
        if skip is not None:
            advanced = torch.where(skip, previous, advanced)
        torch._foreach_copy_(buffers, list(advanced.unbind(0)))
        return whole_stack(grads.add_(advanced, alpha=momentum), params)

    def _momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        return state["momentum_buffer"]

    @staticmethod
    def _apply(params: list[torch.Tensor], update: torch.Tensor, group: dict,
               skip: Optional[torch.Tensor]) -> None:
        """Subtract lr x the update (a stack of whole matrices) from each parameter's slice."""
        targets = [local(p) for p in params]
        slices = [local(shard_like(u, p)) for u, p in zip(update.unbind(0), params)]
        if group["weight_decay"]:  # none by default: Muon's matrices are not decayed
            decay = 1 - group["lr"] * group["weight_decay"]
            torch._foreach_mul_(targets, decay if skip is None else torch.where(skip, 1.0, decay))
        torch._foreach_add_(targets, slices, alpha=-group["lr"])

    # ------------------------------------------------------------ AdamW

    def _adamw_update(self, group: dict, found_inf: Optional[torch.Tensor]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self._adam_state(p) for p in params]
        beta1, beta2 = group["betas"]
        # torch's own kernel, on this rank's slices; found_inf leaves everything as it was
        adamw(
            [local(p) for p in params], [local(p.grad) for p in params],
            [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states], [],
            [s["step"] for s in states], fused=True, found_inf=found_inf, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False)

    def _adam_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=local(param).device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        return state
