"""Weight-only int8 quantisation for generation: `gen.py --quantize int8`, `eval.py --quantize int8`.

Each nn.Linear's weight becomes int8 with one float scale per output row (symmetric, the
row's largest magnitude maps to 127). Decoding one token is a matrix-vector product per
layer, limited by reading the weights, so a quarter of float32's bytes is the point. On a
CPU the product is PyTorch's fused `torch._weight_int8pack_mm` (the kernel gpt-fast uses for
int8 on CPU and MPS), fed bfloat16 activations: about 2.4x faster than a bfloat16 F.linear
for the 10.7M model's 1536x384 matrices on a 2-core EPYC (BENCHMARKS.md, 'Decoding'). Elsewhere
the weight is widened back to the activations' dtype for each product: the memory saving
stays, the speed does not. Embeddings stay float (a lookup reads one row, not the matrix).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from config_fields import QUANTIZATIONS

FUSED_INT8 = hasattr(torch, "_weight_int8pack_mm")  # a private op, so checked, not assumed


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # what the fused CPU kernel takes
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_INT8 and x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale_bf16)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by, for code that reads a head's weight
        (the chunked loss of losses.py) and for measuring the rounding error."""
        return self.weight_int8.float() * self.scale[:, None]


def quantize_int8(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by an Int8Linear, in place; return how many. A head
    tied to the token embedding gets its own int8 copy, and the embedding stays float."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced


def apply_quantization(model: nn.Module, method: str) -> nn.Module:
    """The model with `method` (one of QUANTIZATIONS) applied, for inference only."""
    assert method in QUANTIZATIONS, method
    if method == "int8":
        quantize_int8(model)
    return model.eval()
