"""Which kernels a training forward runs: the attention backend, and CUDA graphs or not.

`system.attention_backend` picks the implementation of scaled_dot_product_attention (torch's
own choice by default); `system.compile_mode auto` replays CUDA graphs where that is safe.
Both take effect through ForwardContext, the context every training and evaluation forward
of the trainer (and bench.py's --max_batch) runs in, so no model class needs to know of them.

Where `auto` does not use CUDA graphs, and why (each was a documented failure or is untested):
  - off CUDA: CUDA graphs are a CUDA feature; on a CPU the choice is always "default".
  - under torchrun (DDP or FSDP, even with one process): DDP all-reduces gradient buckets
    between the pieces its optimizer splits the compiled graph into, and FSDP gathers and
    scatters parameters in hooks around each block; neither was measured with CUDA graphs.
  - with gradient accumulation: a gradient that a backward graph wrote into its memory pool
    becomes param.grad, and the next micro-batch's replay writes over it before it is added
    to: wrong gradients in torch 2.1 (pytorch/pytorch#96693) and "accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run" later (pytorch/pytorch#169545).
Dropout, masked (chat) targets and tokens kept on the device or the host are all fine: shapes
stay static, random numbers come from a graph-safe generator, inputs are copied in.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from config import Config, ModelConfig
from errors import UserError

if TYPE_CHECKING:  # utils imports this module for resolve_compile_mode
    from utils import DeviceInfo

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}  # our name -> SDPBackend's
CUDA_ONLY_BACKENDS = ("cudnn", "efficient")  # a CPU has math and its own flash kernel
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay graphs


def resolve_compile_mode(requested: str, device: torch.device, launched: bool, grad_accum_steps: int) -> str:
    """Return the torch.compile mode to use: the requested one, or for "auto" reduce-overhead
    (CUDA graphs) on one CUDA process without gradient accumulation and "default" elsewhere
    (the module docstring says why)."""
    if requested != "auto":
        return requested
    graphs_are_safe = device.type == "cuda" and not launched and grad_accum_steps == 1
    return "reduce-overhead" if graphs_are_safe else "default"


def uses_cuda_graphs(compile_mode: str, compiled: bool, device: torch.device) -> bool:
    return compiled and device.type == "cuda" and compile_mode in CUDA_GRAPH_MODES


def sdpa_backend(name: str) -> Optional[SDPBackend]:
    """Return torch's SDPBackend for a backend name (None for auto: torch chooses), or raise
    UserError where this torch has no such backend (cuDNN's is the newest of them)."""
    if name == "auto":
        return None
    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:
        raise UserError(f"system.attention_backend {name}: torch {torch.__version__} has no "
                        f"SDPBackend.{SDPA_BACKENDS[name]}; upgrade torch or use auto")
    return backend


def check_attention_backend(name: str, device: torch.device, dtype: torch.dtype, cfg: ModelConfig) -> None:
    """Raise UserError, before training starts, unless the backend can run this model's
    attention on this device in this dtype (tried on a small causal batch of its head size,
    forward and backward): otherwise torch would stop the run at its first step."""
    backend = sdpa_backend(name)
    if backend is None:
        return
    if not cfg.flash_attention:
        raise UserError(f"system.attention_backend {name} chooses a kernel of scaled_dot_product_"
                        "attention, which model.flash_attention false does not call; drop one of the two")
    if device.type != "cuda" and name in CUDA_ONLY_BACKENDS:
        raise UserError(f"system.attention_backend {name} is a CUDA kernel; on {device.type} torch "
                        "has math and flash (its own CPU kernel), or use auto")
    reason = _backend_failure(backend, device, dtype, cfg)
    if reason:
        raise UserError(f"system.attention_backend {name} cannot run this model's attention on "
                        f"{device.type} in {str(dtype).removeprefix('torch.')}: {reason}; use auto "
                        "to let torch choose")


def _backend_failure(backend: SDPBackend, device: torch.device, dtype: torch.dtype,
                     cfg: ModelConfig) -> Optional[str]:
    """Return why the backend refused a training-shaped attention call, or None if it ran.
    The random state is left as it was: a run's weights and dropout do not depend on the check."""
    shape = (1, cfg.n_head, min(cfg.block_size, 64), cfg.n_embd // cfg.n_head)
    q, k, v = (torch.ones(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    forked = [device.index or 0] if device.type == "cuda" else []
    with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng(devices=forked):
        warnings.simplefilter("always")  # torch says why a kernel was not used in warnings
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, dropout_p=cfg.dropout, is_causal=True).sum().backward()
            return None
        except RuntimeError as error:
            reasons = [_reason(str(w.message)) for w in caught if "kernel not used" not in str(w.message)]
            return " ".join(dict.fromkeys(r for r in reasons if r)) or _reason(str(error))


def _reason(message: str) -> str:
    """torch's message without its source location: 'Both fused kernels do not support non-zero dropout'."""
    return message.split("(Triggered internally")[0].strip().splitlines()[0].rstrip(".") if message.strip() else ""


class ForwardContext:
    """The context a forward runs in: autocast, the chosen attention backend, and with CUDA
    graphs the start of a new graph step (torch.compiler.cudagraph_mark_step_begin: outputs
    of earlier replays may then be overwritten, so whatever the loop keeps of a forward's
    output must be a new tensor, as a loss divided, stacked or summed is). Reusable, unlike
    the context managers it enters."""

    def __init__(self, autocast: contextlib.AbstractContextManager, backend: Optional[SDPBackend] = None,
                 cuda_graphs: bool = False):
        self.autocast, self.backend, self.cuda_graphs = autocast, backend, cuda_graphs
        self._entered: list[contextlib.ExitStack] = []

    def __enter__(self) -> "ForwardContext":
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast)
        if self.backend is not None:
            stack.enter_context(sdpa_kernel(self.backend))
        self._entered.append(stack)
        return self

    def __exit__(self, *exc: object) -> Optional[bool]:
        return self._entered.pop().__exit__(*exc)


def forward_context(cfg: Config, system: DeviceInfo, autocast: contextlib.AbstractContextManager) -> ForwardContext:
    """Return the ForwardContext of a run, after checking that its attention backend runs here."""
    check_attention_backend(cfg.system.attention_backend, system.device, system.dtype, cfg.model)
    graphs = uses_cuda_graphs(system.compile_mode, system.compile, system.device)
    return ForwardContext(autocast, sdpa_backend(cfg.system.attention_backend), graphs)
