"""torch.compile for training: what is compiled, where its work is kept on disk, and how
evaluation stays out of it.

Evaluation calls the uncompiled model, in eval mode and without gradients. A compiled forward
is specialised to what it first saw: gradients on, train mode (dropout), (batch_size,
block_size) inputs with the strides of training's windows. Evaluation differs in all of them
(no_grad; eval mode; whole-split windows are views of stride block_size rather than
block_size + 1, and the last batch is shorter), and each difference was a full recompilation
at the first evaluation, three in all, each about as long as the first step's. Padding the
last batch and copying windows contiguous would remove two; no_grad and eval mode would still
need a compilation of their own, as long as the forward half of training's. The eager forward
costs nothing to prepare and takes any shape (a tail batch, chat masks, a user's model); its
price is slower evaluation batches, small beside a compilation: a forward is about a third of a
training step, and a whole-split evaluation of shakespeare_char is 7 batches.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from config import Config
from forward_context import CUDA_GRAPH_MODES
from utils import DeviceInfo, notice

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # torch's own; where the user sets it, it stays
CACHE_SUBDIR = "torch_compile"


def keep_compile_cache(data_cache_dir: str) -> Path:
    """Keep inductor's compiled graphs and kernels on disk across runs; return where.

    Torch's default place is /tmp/torchinductor_<user>, which a reboot (or a fresh cloud
    machine's /tmp) loses; <data.cache_dir>/torch_compile sits beside the token caches, which
    are rebuilt the same way when deleted. TORCHINDUCTOR_CACHE_DIR, when set, wins. A second
    run of the same model, shapes and settings then loads its graphs instead of compiling them
    (the FX graph cache, on by default from torch 2.5, is turned on for 2.4 too).
    """
    if CACHE_VARIABLE not in os.environ:
        os.environ[CACHE_VARIABLE] = str(Path(data_cache_dir, CACHE_SUBDIR).resolve())
    import torch._inductor.config as inductor_config  # imported only for a compiled run: seconds
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    return Path(os.environ[CACHE_VARIABLE])


def blocks_compile_apart(model: torch.nn.Module) -> bool:
    """Whether the model's transformer blocks can be compiled on their own: it needs a model
    with `blocks` (the contract's name for its layers) and torch >= 2.6, where
    torch.compiler.set_stance lets evaluation run compiled blocks eagerly, and dynamo takes a
    module's parameters as inputs, so one graph serves every layer (before 2.5 each layer
    compiled apart, and past 8 of them ran eagerly)."""
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0 and hasattr(torch.compiler, "set_stance")


def compile_scope(model: torch.nn.Module, mode: str, requested: str) -> str:
    """Return what to compile, "blocks" or "model", for system.compile_scope `requested`.

    auto compiles the blocks where they can be, but not in a mode with CUDA graphs: those
    replay a whole step's kernels as one graph only when the whole model is compiled.
    """
    if requested == "model" or not blocks_compile_apart(model):
        if requested == "blocks":
            notice("system.compile_scope blocks needs torch >= 2.6 and a model with `blocks`; "
                   "compiling the whole model instead")
        return "model"
    return "model" if requested == "auto" and mode in CUDA_GRAPH_MODES else "blocks"


def compile_for_training(model: torch.nn.Module, wrapped: torch.nn.Module, mode: str,
                         scope: str) -> Callable:
    """Return what a training step calls: for scope "model", the wrapped model compiled as
    one graph; for "blocks", the wrapped model with each transformer block compiled in place
    (nn.Module.compile). The blocks share one graph, traced and compiled once for all layers,
    so compilation takes about one layer's time instead of the whole stack's; the embeddings,
    final norm and head run eagerly between."""
    if scope == "model":
        return torch.compile(wrapped, mode=mode)
    for block in model.blocks:
        block.compile(mode=mode)
    return wrapped


def training_forward(model: torch.nn.Module, wrapped: torch.nn.Module, cfg: Config,
                     system: DeviceInfo) -> tuple[Callable, Optional[str]]:
    """Return what a training step calls (`wrapped`: the model, or its DDP wrapper) and what
    of it is compiled: "blocks", "model", or None where system.compile is off."""
    if not system.compile:
        return wrapped, None
    keep_compile_cache(cfg.data.cache_dir)
    scope = compile_scope(model, system.compile_mode, cfg.system.compile_scope)  # the mode auto resolved
    return compile_for_training(model, wrapped, system.compile_mode, scope), scope


@contextlib.contextmanager
def uncompiled() -> Iterator[None]:
    """Run what is inside eagerly, compiled blocks included (torch >= 2.6; the blocks are
    only ever compiled there), so that it compiles nothing."""
    if not hasattr(torch.compiler, "set_stance"):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
