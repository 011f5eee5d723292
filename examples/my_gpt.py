"""A GPT-2 written from scratch: where docs/tutorials/build-your-own-gpt.md ends, every method of
examples/my_gpt_skeleton.py filled in.

    python check_model.py examples/my_gpt.py:MyGPT
    python train.py --config configs/tiny.json --model_impl examples/my_gpt.py:MyGPT

It keeps the contract in contract.py and nothing more: no KV cache (gen.py recomputes the
context for each new token), the textbook attention instead of the fused kernel.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Each position mixes in the positions before it, in n_head heads side by side."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.query_key_value = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.projection = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attention_dropout = nn.Dropout(config.dropout)
        # past[i, j] is True where position j is not after position i: what i may look at
        past = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("past", past, persistent=False)  # rebuilt from the config, not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        head_size = C // self.n_head
        q, k, v = self.query_key_value(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_size)  # (B, nh, T, T)
        scores = scores.masked_fill(~self.past[:T, :T], float("-inf"))  # never the future
        weights = self.attention_dropout(F.softmax(scores, dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # the heads side by side again
        return self.projection(y)


class MLP(nn.Module):
    """Each position on its own: widen four times, GELU, back to n_embd."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.widen = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.narrow = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(F.gelu(self.widen(x)))


class Block(nn.Module):
    """Attention, then the MLP, each added to the residual stream after a LayerNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attention = CausalSelfAttention(config)
        self.norm_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm_1(x)))
        return x + self.dropout(self.mlp(self.norm_2(x)))


class MyGPT(nn.Module):
    gpt2_compatible = True  # GPT-2's layers exactly (with model.bias true): check_model.py counts

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # one matrix reads and writes tokens
        for param in self.parameters():  # GPT-2's start: small random matrices
            if param.dim() == 2:
                nn.init.normal_(param, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_norm(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
