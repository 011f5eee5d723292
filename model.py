"""The GPT: token and position embeddings, pre-norm transformer blocks, a tied LM head.

GPT-2 by default; config switches give rotary positions (RoPE), RMSNorm, other MLPs and
grouped-query attention.
Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.nn import functional as F

from config import ModelConfig
from losses import IGNORE_INDEX, chunked_cross_entropy

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos and sin tables, (T, hs/2) each
# scaled_dot_product_attention's enable_gqa (torch 2.5): key/value heads shared by groups of
# query heads without copying them
SDPA_GROUPS_HEADS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)
# Where the T tokens of a forward stand: the first one's position as a Python int, or (decoding
# against a static cache) every one's position in each row, a tensor (B, T) on the device
Start = Union[int, torch.Tensor]


def rotary_tables(length: int, head_size: int, base: float = 10000.0) -> Rotary:
    """Return RoPE's cos and sin for positions 0..length-1 (Su et al. 2021, RoFormer)."""
    inverse_frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inverse_frequencies)
    return angles.cos(), angles.sin()


def token_positions(start: Start, length: int, device: torch.device) -> torch.Tensor:
    """The positions of `length` tokens from `start` on, as a tensor on `device`."""
    if isinstance(start, torch.Tensor):
        return start
    return torch.arange(start, start + length, device=device)


def apply_rotary(x: torch.Tensor, rotary: Rotary, start: Start = 0) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) of each head by their position's angles: (B, nh, T, hs),
    the T tokens standing where `start` says."""
    T = x.size(-2)
    if isinstance(start, torch.Tensor):  # each row's positions (B, T): rows picked on the device
        cos, sin = (table[start][:, None].to(x.dtype) for table in rotary)
    else:
        cos, sin = (table[start : start + T].to(x.dtype) for table in rotary)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


GATED_MLPS = ("swiglu", "geglu")  # a gate and a value matrix: three matrices instead of two


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """4 x n_embd, or for a gated MLP 8/3 of it (the same parameters), to a multiple of 32."""
    if cfg.mlp in GATED_MLPS:
        return 32 * math.ceil(8 * cfg.n_embd / 3 / 32)
    return 4 * cfg.n_embd


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """The number of targets the loss covers (those not IGNORE_INDEX), exactly: what losses
    summed over several batches are divided by."""
    return (targets != IGNORE_INDEX).sum()


def counted_targets(targets: torch.Tensor) -> torch.Tensor:
    """target_count, but at least 1, for one batch's mean: a window with none (a chat window
    of user turns only) then has loss 0 instead of 0/0."""
    return target_count(targets).clamp(min=1)


def qkv_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    """The rows of the query, key and value matrices fused, in that order, in an attention
    layer's c_attn weight: n_embd for the queries, n_kv_head x head size for the keys and for
    the values (fewer with grouped-query attention)."""
    kv_width = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
    return cfg.n_embd, kv_width, kv_width


class LayerCache:
    """One layer's keys and values for the tokens seen so far, in buffers of block_size."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def extend(self, k: torch.Tensor, v: torch.Tensor, start: int,
               capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k and v (B, n_kv_head, T, hs) at positions start.. and return all so far."""
        if self.keys is None:
            B, H, _, hs = k.shape
            self.keys, self.values = (k.new_zeros(B, H, capacity, hs) for _ in range(2))
        end = start + k.size(2)
        self.keys[:, :, start:end], self.values[:, :, start:end] = k, v
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Every layer's keys and values for the tokens seen so far, so that each new token costs
    one token's work instead of the whole context's (for generation, not training)."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.length = 0  # tokens cached, and the position of the next one

    def reset(self) -> None:
        self.length = 0  # the buffers stay; positions from 0 are written over


class StaticLayerCache:
    """One layer's keys and values in buffers of a fixed shape (B, n_kv_head, block_size, hs),
    each row written at its own positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.row_index = torch.arange(keys.size(0), device=keys.device)[:, None]  # (B, 1): row i holds i

    def extend(self, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
               capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k and v (B, n_kv_head, T, hs) at each row's positions `start` (B, T); return
        the whole buffers (attention hides the slots past each query's position)."""
        self.keys[self.row_index, :, start] = k.transpose(1, 2)  # indexed [row, :, position]: (B, T, n_kv_head, hs)
        self.values[self.row_index, :, start] = v.transpose(1, 2)
        return self.keys, self.values

    def rows(self, start: int, stop: int) -> "StaticLayerCache":
        return StaticLayerCache(self.keys[start:stop], self.values[start:stop])


AnyLayerCache = Union[LayerCache, StaticLayerCache]


class StaticKVCache:
    """A KV cache whose shapes never change and whose lengths, one per row, are a tensor on the
    device: a one-token step then reads no Python number that moves, so torch.compile compiles
    it once and a CUDA graph captured once replays it for every token (decode_step.py). Rows
    may stand at different lengths: a server decodes requests of their own lengths together."""

    def __init__(self, layers: list[StaticLayerCache], length: torch.Tensor):
        self.layers, self.length = layers, length  # length (B,): += T in place, on the device

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, dtype: torch.dtype, device: torch.device) -> "StaticKVCache":
        shape = (batch, cfg.n_kv_head or cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        layers = [StaticLayerCache(*(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)))
                  for _ in range(cfg.n_layer)]
        return cls(layers, torch.zeros(batch, dtype=torch.long, device=device))

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """Rows start..stop-1 alone, as a cache of their own that writes into this one's
        buffers (views)."""
        return StaticKVCache([layer.rows(start, stop) for layer in self.layers], self.length[start:stop])

    def reset(self) -> None:
        self.length.zero_()  # stale slots stay hidden by the attention mask until written over


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Start, fused: bool,
              dropout: float = 0.0, grouped: bool = False) -> torch.Tensor:
    """Causal attention of T queries at positions start.. over the keys up to each one's
    position (a static cache's k and v have more slots than that: the rest are hidden).
    grouped: k and v have fewer heads than q, each shared by a group of query heads (fused only)."""
    T, S = q.size(-2), k.size(-2)
    groups = {"enable_gqa": True} if grouped else {}
    plain = isinstance(start, int) and (start == 0 or T == 1)  # a causal mask, or a last token that sees all
    if fused and plain:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=start == 0 and T > 1, **groups)
    # query i (at position start + i) sees keys 0 .. start + i
    visible = torch.arange(S, device=q.device) <= token_positions(start, T, q.device)[..., None]  # ([B,] T, S)
    if visible.dim() == 3:  # each row's own positions: the mask broadcast over the heads
        visible = visible[:, None]
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout, **groups)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = F.dropout(F.softmax(scores, dim=-1), p=dropout)
    return weights @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head attention; with n_kv_head < n_head, groups of query heads share one key/value
    head (grouped-query attention, Ainslie et al. 2023), which shrinks the KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_size = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.flash = cfg.flash_attention
        self.qk_norm = cfg.qk_norm
        self.qkv_widths = qkv_widths(cfg)
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.qkv_widths), bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.block_size = cfg.block_size

    def forward(self, x: torch.Tensor, rotary: Optional[Rotary] = None, cache: Optional[AnyLayerCache] = None,
                start: Start = 0) -> torch.Tensor:
        """Attend causally; with a cache, x holds the tokens from position `start` on, and the
        keys and values of the earlier ones come from the cache."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_widths, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2) for t in (k, v))
        if self.qk_norm:  # bounded attention logits tolerate higher learning rates
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, rotary, start), apply_rotary(k, rotary, start)
        if cache is not None:  # the cache keeps n_kv_head heads: grouped attention's saving
            k, v = cache.extend(k, v, start, self.block_size)
        # Each key/value head serves n_head / n_kv_head queries. Decoding lets SDPA share them
        # (a copy would be the whole cache's, per layer and token); training copies its T
        # tokens' heads, which keeps every fused kernel (cuDNN's, efficient attention) open to it.
        grouped = self.n_kv_head != self.n_head
        shared = grouped and cache is not None and self.flash and SDPA_GROUPS_HEADS
        if grouped and not shared:
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # flash_attention false: the textbook matmul-softmax-matmul, for strict reference runs
        y = attention(q, k, v, start, self.flash, self.dropout if self.training else 0.0, shared)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU (GPT-2), ReLU squared (Primer, So et al. 2021), or the gated SwiGLU (Shazeer 2020;
    LLaMA) and GeGLU (the same paper; Gemma, with the tanh-approximated GELU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = mlp_hidden_size(cfg)
        gates = 2 if cfg.mlp in GATED_MLPS else 1  # a gate and a value in one matrix
        self.c_fc = nn.Linear(cfg.n_embd, gates * hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "geglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu_tanh":  # OpenAI's GPT-2 used this approximation
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rotary: Optional[Rotary] = None, cache: Optional[AnyLayerCache] = None,
                start: Start = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    gpt2_compatible = True  # with a GPT-2-shaped config it has GPT-2's parameters (check_model.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) to build a GPT")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        if cfg.position == "rope":  # rebuilt from the config, so kept out of the state dict
            cos, sin = rotary_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix for input and output
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections to the residual stream; scaling them keeps its
        # variance from growing with depth (GPT-2 paper, section 2.3).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if self.config.zero_init_projections:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=residual_std)

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
        cache: Optional[Union[KVCache, StaticKVCache]] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return logits (B, T, vocab) and, when targets are given, the mean cross-entropy.

        With model.loss_chunk_size set and targets given, the logits are never built whole
        (that is the point), and None is returned in their place. With a cache, idx holds the
        tokens after the cached ones, and only the last position's logits (B, 1, vocab) return.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if isinstance(start, torch.Tensor):  # a static cache's row lengths (B,), on the device: not checked
            start = start[:, None] + torch.arange(T, device=idx.device)  # (B, T): once for all layers
        elif start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(token_positions(start, T, idx.device))
        else:
            rotary = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, cache.layers[i] if cache is not None else None, start)
        x = self.ln_f(x)
        if cache is not None:
            cache.length += T
            return self.lm_head(x[:, -1:]), None
        if targets is not None and self.config.loss_chunk_size:  # the head and loss in chunks: losses.py
            summed = chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                           self.config.loss_chunk_size)
            return None, summed / counted_targets(targets)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            summed = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            loss = summed / counted_targets(targets)
        return logits, loss

    def new_cache(self) -> KVCache:
        """An empty KV cache for forward(..., cache=) (the contract's optional hook)."""
        return KVCache(self.config.n_layer)

    def new_static_cache(self, batch: int = 1) -> StaticKVCache:
        """An empty StaticKVCache of `batch` rows (the contract's optional hook for compiled and
        CUDA-graph decoding), in the dtype and on the device of the embedding, as the keys are."""
        return StaticKVCache.empty(self.config, batch, self.wte.weight.dtype, self.wte.weight.device)

    def _position_params(self) -> int:
        return self.wpe.weight.numel() if self.wpe is not None else 0

    def num_params(self, include_embeddings: bool = True) -> int:
        """Return the parameter count; a tied head is counted once, as the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.wte.weight.numel() + self._position_params()
        return total

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Return training FLOPs per token (forward + backward), attention included.

        6 per parameter of the matmuls (the PaLM paper's estimate, appendix B) plus
        12 * n_layer * n_embd * T for the attention scores and their weighted sums.
        """
        T = seq_len or self.config.block_size
        lookup_only = 0 if self.config.tie_embeddings else self.wte.weight.numel()  # no matmul
        matmul_params = self.num_params() - self._position_params() - lookup_only
        return 6 * matmul_params + 12 * self.config.n_layer * self.config.n_embd * T
