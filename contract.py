"""The contract a model class keeps to be trained, sampled, evaluated and benchmarked here, and
how the commands load one: `model.impl "path/to/my_gpt.py:MyGPT"` (`--model_impl`) swaps our
model.py for a class of your own. docs/tutorials/build-your-own-gpt.md walks through writing one, and
`python check_model.py path/to/my_gpt.py:MyGPT` grades it.

Required (LanguageModel below):
  - a torch.nn.Module built as `MyGPT(config)` from a config.ModelConfig (n_layer, n_head,
    n_embd, block_size, vocab_size, dropout, bias, ...; fields it has no use for it may ignore);
  - `forward(idx, targets=None) -> (logits, loss)`: idx is (B, T) token ids with T <= block_size,
    logits are (B, T, vocab_size), loss is None without targets, else the mean cross-entropy of
    the logits over the targets that are not -100 (F.cross_entropy's default ignore_index; chat
    data marks the tokens it does not train on with it);
  - `num_params() -> int`: the parameter count, a tensor shared by two layers counted once.

Optional (used when present, a fallback otherwise):
  - KV-cache hooks (CachedLanguageModel): `new_cache()` returns an empty cache object, and
    `forward(idx, cache=cache)` takes the tokens after those already in the cache, adds theirs,
    and returns logits whose last position predicts the next token. Without them generation
    recomputes the whole context for each new token (slower; gen.py says so).
  - `new_static_cache()`: a cache of fixed shapes whose length is a tensor on the device, for
    `--decode_step compiled` and `cuda_graph` (decode_step.py; model.py's StaticKVCache);
    without it generation decodes eagerly.
  - `num_params(include_embeddings=False)`: else nn.Embedding weights are subtracted.
  - `flops_per_token()`: for MFU; else 6 x parameters outside embeddings + attention's
    12 x n_layer x n_embd x block_size.
  - transformer layers in `self.blocks`: training.optimizer "muon" trains the 2-D weights under
    `blocks.` with Muon (each weight as one matrix; a q, k and v fused in one nn.Linear are cut
    apart first only where, as in model.py, it is called `c_attn` and its module's `qkv_widths`
    gives their rows), and system.fsdp shards each block; elsewhere everything uses AdamW and
    FSDP shards the model as one unit.
  - `gpt2_compatible = True`: check_model.py also compares num_params() with GPT-2's formula.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from config import ModelConfig
from errors import UserError
from model import GPT

REQUIRED_METHODS = ("forward", "num_params")


@runtime_checkable
class LanguageModel(Protocol):
    """What train.py, gen.py, eval.py and bench.py call on a model (besides nn.Module's own)."""

    def __init__(self, config: ModelConfig) -> None: ...

    def forward(self, idx: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def num_params(self) -> int: ...


@runtime_checkable
class CachedLanguageModel(LanguageModel, Protocol):
    """A LanguageModel with the optional KV-cache hooks, so each new token costs one token's work."""

    def new_cache(self) -> Any: ...

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Any = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


def load_class(spec: str) -> type:
    """Return the class named by 'path/to/file.py:ClassName', or raise UserError."""
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name:
        raise UserError(f"{spec!r} must look like path/to/my_gpt.py:MyGPT")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"{path} does not exist (from {spec!r}; a relative path is taken from the "
                        f"current folder, {Path.cwd()})")
    module_spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    if module_spec is None:
        raise UserError(f"{path} is not a Python file; model classes live in .py files")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # as an import would: dataclasses and pickle look it up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_spec.name]
        raise UserError(f"importing {path} failed: {type(error).__name__}: {error}") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        found = [n for n, v in vars(module).items()
                 if isinstance(v, type) and v.__module__ == module.__name__]
        raise UserError(f"{path} has no class {name}; it defines {', '.join(found) or 'no classes'}")
    return cls


def source_sha256(impl: str) -> Optional[str]:
    """The sha256 of the file model.impl names (None for ours, or for a file that is gone): a
    run records it, so that a later load can say when the file has changed since."""
    path = Path(impl.rpartition(":")[0])
    return hashlib.sha256(path.read_bytes()).hexdigest() if impl and path.is_file() else None


def check_class(cls: type) -> None:
    """Raise UserError naming what the class lacks of the contract's required surface."""
    if not issubclass(cls, nn.Module):
        raise UserError(f"{cls.__name__} must subclass torch.nn.Module (class {cls.__name__}(nn.Module))")
    for method in REQUIRED_METHODS:
        if getattr(cls, method, None) in (None, getattr(nn.Module, method, None)):
            raise UserError(f"{cls.__name__} has no method {method}(), which the contract requires "
                            "(see contract.py or docs/tutorials/build-your-own-gpt.md)")


def model_class(impl: str) -> type:
    """Return the class model.impl names, checked; ours for an empty impl."""
    if not impl:
        return GPT
    cls = load_class(impl)
    check_class(cls)
    return cls


def build_model(cfg: ModelConfig) -> nn.Module:
    """Return a new model of the class cfg.impl names (ours when empty), built from cfg. A class
    of the user's is tried on one short batch first, so a broken contract is one clear line."""
    cls = model_class(cfg.impl)
    try:
        model = cls(cfg)
    except NotImplementedError as error:
        raise UserError(f"{cls.__name__} is not finished: {error} (`python check_model.py {cfg.impl}` "
                        "shows what is left)") from None
    except Exception as error:
        raise UserError(f"building {cls.__name__} from the model config failed: "
                        f"{type(error).__name__}: {error}") from None
    if cls is not GPT and not is_on_meta(model):
        check_forward(model, cfg)
    return model


def is_on_meta(model: nn.Module) -> bool:
    """A model built under torch.device('meta') (shapes only) cannot run a real batch."""
    return any(p.is_meta for p in model.parameters())


def check_forward(model: nn.Module, cfg: ModelConfig) -> None:
    """Run forward on a 1 x T batch with targets and raise UserError unless it returns
    (logits (1, T, vocab_size), a scalar loss), and without them unless it returns a pair too
    (gen.py and eval.py call it so). Eval mode: dropout draws no random numbers."""
    name, T = type(model).__name__, min(4, cfg.block_size)
    idx = torch.zeros(1, T, dtype=torch.long)
    was_training = model.training
    try:
        with torch.no_grad():
            output, untargeted = model.eval()(idx, idx), model(idx)
    except Exception as error:
        raise UserError(f"{name}.forward(idx, targets) failed on a batch of 1 x {T} tokens: "
                        f"{type(error).__name__}: {error} (`python check_model.py {cfg.impl}` "
                        "says more)") from None
    finally:
        model.train(was_training)
    if not (isinstance(output, tuple) and len(output) == 2):
        raise UserError(f"{name}.forward must return a tuple (logits, loss), got {type(output).__name__}")
    logits, loss = output
    expected = (1, T, cfg.vocab_size)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"{name}.forward must return logits of shape (batch, time, vocab_size) = "
                        f"{expected}, got {got}")
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserError(f"{name}.forward(idx, targets) must return the loss as a scalar tensor, got {got}")
    if not (isinstance(untargeted, tuple) and len(untargeted) == 2):
        raise UserError(f"{name}.forward(idx) without targets must return a tuple (logits, None) too, got "
                        f"{type(untargeted).__name__}: gen.py and eval.py call it so")


def accepts_keyword(method: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def params_without_embeddings(model: nn.Module) -> int:
    """The model's own count where it offers one; else every parameter of the nn.Embedding
    layers (tokens, positions) subtracted once."""
    if accepts_keyword(model.num_params, "include_embeddings"):
        return model.num_params(include_embeddings=False)
    embedding_params = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False)}
    return model.num_params() - sum(embedding_params.values())


def flops_per_token(model: nn.Module, cfg: ModelConfig) -> int:
    """Training FLOPs per token: the model's own figure where it offers one, else the usual
    estimate, 6 per parameter outside the embeddings (Kaplan et al. 2020, section 2.1) plus
    12 x n_layer x n_embd x T for attention's scores and weighted sums."""
    if callable(getattr(model, "flops_per_token", None)):
        return model.flops_per_token()
    return 6 * params_without_embeddings(model) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def has_kv_cache(model: nn.Module) -> bool:
    return callable(getattr(model, "new_cache", None)) and accepts_keyword(model.forward, "cache")


def has_static_cache(model: nn.Module) -> bool:
    """Whether the model offers the optional new_static_cache() hook (model.py's GPT does)."""
    return has_kv_cache(model) and callable(getattr(model, "new_static_cache", None))
