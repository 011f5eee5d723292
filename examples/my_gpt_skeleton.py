"""Your own GPT, to be written: copy this file and fill in one method at a time.

    cp examples/my_gpt_skeleton.py my_gpt.py
    python check_model.py my_gpt.py:MyGPT

check_model.py names the method to write next (each one below raises NotImplementedError
saying what goes in it), and docs/tutorials/build-your-own-gpt.md explains each step. When every check
passes, train it: python train.py --config configs/tiny.json --model_impl my_gpt.py:MyGPT
"""
import math  # noqa: F401 (step 8 needs it)

import torch
from torch import nn
from torch.nn import functional as F  # noqa: F401 (steps 6, 8 and 9 need it)

from config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Each position mixes in the positions before it, in n_head heads side by side."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        raise NotImplementedError(
            "step 3, CausalSelfAttention.__init__: one nn.Linear from n_embd to 3 * n_embd for the "
            "queries, keys and values, one from n_embd to n_embd for the output projection, and the "
            "lower-triangular mask of block_size x block_size as a buffer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "step 8, CausalSelfAttention.forward: split x's queries, keys and values into n_head heads, "
            "scores = q @ k^T / sqrt(head size), -inf above the diagonal, softmax, times v, the heads "
            "side by side again, then the output projection")


class MLP(nn.Module):
    """Each position on its own: widen four times, GELU, back to n_embd."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        raise NotImplementedError("step 4, MLP.__init__: nn.Linear from n_embd to 4 * n_embd, and one back")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("step 9, MLP.forward: widen, F.gelu, narrow")


class Block(nn.Module):
    """Attention, then the MLP, each added to the residual stream after a LayerNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        raise NotImplementedError("step 2, Block.__init__: two nn.LayerNorm(n_embd), a CausalSelfAttention "
                                  "and an MLP")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("step 7, Block.forward: x + attention(norm_1(x)), then x + mlp(norm_2(x))")


class MyGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        raise NotImplementedError(
            "step 1, MyGPT.__init__: the token embedding (vocab_size x n_embd) and position embedding "
            "(block_size x n_embd), n_layer Blocks in an nn.ModuleList called self.blocks, a final "
            "nn.LayerNorm, and the head (nn.Linear n_embd -> vocab_size) sharing the token embedding's "
            "weight")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        raise NotImplementedError(
            "step 6, MyGPT.forward: embed the tokens and their positions, run the blocks, the final norm "
            "and the head; return (logits, None), or with targets (logits, F.cross_entropy of them)")

    def num_params(self) -> int:
        raise NotImplementedError("step 5, MyGPT.num_params: return the parameter count, "
                                  "sum(p.numel() for p in self.parameters())")
