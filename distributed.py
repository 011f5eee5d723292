"""Several processes, one run: torchrun's environment, DDP or FSDP, and the few collective
decisions (when to stop, the losses, who writes) that keep every rank at the same step.

Without torchrun the run is one process and every function here is a no-op or the identity,
so the single-process path stays exactly as it was.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

from errors import UserError

# How long a barrier waits: rank 0 may tokenize a large corpus while the others wait.
SETUP_TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run, as torchrun describes it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun: a process group exists, even of one process

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes files and saves checkpoints."""
        return self.rank == 0


def ranks_from_environment(env: Mapping[str, str] = os.environ) -> Ranks:
    """Return the ranks torchrun set (RANK, LOCAL_RANK, WORLD_SIZE), or one process without it."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Ranks()
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers; start several "
                        "processes with torchrun rather than setting them by hand") from None
    return Ranks(rank=rank, local_rank=local, world_size=world, launched=True)


class Collectives:
    """The process group of a torchrun run, and the agreements the loop needs from it.

    Host-side decisions (stop or not, barriers) go through a Gloo group of their own, so on GPUs
    they never wait for the CUDA stream; tensors on the device go through the default group
    (NCCL there).
    """

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks = ranks
        self.device = device
        self._control: Any = None
        self._owns_group = False

    def __enter__(self) -> "Collectives":
        if self.ranks.launched:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            # a process that calls train.main more than once (tests/ddp_probe.py) sets the group
            # up itself: torch cannot set up a second one from torchrun's environment
            self._owns_group = not dist.is_initialized()
            if self._owns_group:
                dist.init_process_group(backend)
            self._control = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ranks.launched and dist.is_initialized():
            dist.destroy_process_group(None if self._owns_group else self._control)

    @property
    def active(self) -> bool:
        return self.ranks.launched

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self._control)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Let rank 0 do something (build the token cache, prepare out_dir) before the others
        read what it made; if it fails, the others stop too, with one line and exit status 2
        rather than a lost connection's traceback."""
        if not self.active:
            yield
            return
        failed = torch.zeros(1, dtype=torch.int64)
        if self.ranks.is_main:
            try:
                yield
            except BaseException:
                failed.fill_(1)
                raise
            finally:
                dist.broadcast(failed, src=0, group=self._control)
        else:
            dist.broadcast(failed, src=0, group=self._control)
            if failed.item():
                raise UserError("rank 0 could not prepare the run; its error is above")
            yield

    def agree(self, values: list[int]) -> list[int]:
        """Return the largest of each value over all ranks (host integers, e.g. stop reasons)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control)
        return tensor.tolist()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a device tensor over the ranks, in place; return it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Return every rank's `obj` (small picklable things: random states), in rank order."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, obj, group=self._control)
        return gathered


class ParallelModel:
    """The model as the ranks share it: itself in one process, in DistributedDataParallel
    under torchrun, or sharded with FSDP's fully_shard when `fsdp`; and its state as plain,
    whole tensors, so a checkpoint never depends on how it was trained.

    Under FSDP each rank holds a slice of every parameter, gradient and optimizer moment
    (DTensors); gathering the state is a collective, so every rank calls model_state and
    optimizer_state, and only `keep` ranks (rank 0) hold the result.
    """

    def __init__(self, model: torch.nn.Module, ranks: Ranks, device: torch.device, fsdp: bool = False):
        self.model, self.ranks = model, ranks
        self.fsdp = fsdp and ranks.launched
        self.wrapped = model  # what the loop calls
        if self.fsdp:
            shard_fully(model)
        elif ranks.launched:
            self.wrapped = data_parallel(model, device)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Return a context in which a backward pass reduces gradients over the ranks only if
        `last`: the micro-steps of gradient accumulation before the last one skip it."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.ranks.launched and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def model_state(self) -> dict:
        """The weights, whole. Under FSDP a parameter with two names (a head tied to the token
        embedding) is gathered once and stays one tensor under both, as in one process, so a
        checkpoint holds it once."""
        state = self.model.state_dict()
        if not self.fsdp:
            return state
        aliases = second_names(self.model)
        unique = {name: tensor for name, tensor in state.items() if name not in aliases}
        whole_state = gathered(unique, self.ranks.is_main)
        return {name: whole_state[aliases.get(name, name)] for name in state}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        state = optimizer.state_dict()
        return gathered(state, self.ranks.is_main) if self.fsdp else state

    def load_model_state(self, state: dict) -> None:
        """Load whole weights (a checkpoint's); under FSDP each rank keeps its slice."""
        if self.fsdp:
            params = self.model.state_dict()
            state = {name: shard_like(tensor, params[name]) for name, tensor in state.items()}
        self.model.load_state_dict(state)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)
        if not self.fsdp:
            return
        for param, moments in optimizer.state.items():
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim():
                    moments[key] = shard_like(value, param)


def second_names(model: torch.nn.Module) -> dict[str, str]:
    """Return {second name: first name} for each parameter registered under two names (tied)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Return `model` in DistributedDataParallel, which averages gradients over the ranks in
    buckets during the backward pass (and copies rank 0's weights to every rank at the start).

    Buffers are not synchronised before each forward pass: the model's (rotary tables) are
    computed, never learned, so a forward pass needs no collective at all.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (and still copies buffers from rank 0 once, which is fine)
    renamed = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    device_ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=device_ids, **no_buffer_sync)


def shard_fully(model: torch.nn.Module) -> None:
    """Shard the model in place with FSDP2: each transformer block is one unit (its weights
    gathered just before it runs and freed after), the embeddings and head the root unit."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"system.fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                        f"torch {torch.__version__}: upgrade it, or train without --system.fsdp") from None
    for block in getattr(model, "blocks", ()):  # a user's model without them: one unit
        fully_shard(block)
    fully_shard(model)


def gathered(obj: Any, keep: bool) -> Any:
    """Return `obj` (nested dicts and lists) with every sharded tensor gathered whole onto the
    CPU where `keep`, and dropped (None) elsewhere. Every rank must call it, in the same order."""
    if isinstance(obj, dict):
        return {key: gathered(value, keep) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered(value, keep) for value in obj)
    if hasattr(obj, "full_tensor"):  # a DTensor
        gathered_here = whole(obj)  # a collective: every rank takes part, keeping it or not
        return gathered_here.cpu() if keep else None
    return obj


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """Return a sharded tensor (FSDP's DTensor) gathered whole on every rank; others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def whole_stack(slices: torch.Tensor, like: list[torch.Tensor]) -> torch.Tensor:
    """Return a stack of this rank's slices of the tensors `like` (FSDP's DTensors: one slice
    each, sharded as that tensor is) as the stack of the whole tensors, gathered from every
    rank; a stack for plain tensors as it is."""
    if not like or not hasattr(like[0], "device_mesh"):
        return slices
    from torch.distributed.tensor import DTensor
    return torch.stack([DTensor.from_local(piece, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                           stride=t.stride()).full_tensor() for piece, t in zip(slices.unbind(0), like)])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's slice of a sharded tensor (sharing its memory); others as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return this rank's slice of `full`, sharded as the DTensor `like` is (no communication:
    every rank holds `full`); for a plain `like`, `full` itself."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_evenly(items: Iterable[T], ranks: Ranks) -> Iterator[tuple[T, bool]]:
    """Yield this rank's share of `items` (every world_size-th one) paired with True; a rank
    whose share is shorter than another's then repeats an item paired with False (to be left
    out of sums), so every rank runs the same number of forward passes, as FSDP's weight
    gathers need. All ranks must pass the same items."""
    count, first, last = 0, None, None
    for index, item in enumerate(items):
        first = item if index == 0 else first
        if index % ranks.world_size == ranks.rank:
            last = item
            yield item, True
        count = index + 1
    rounds = -(-count // ranks.world_size)
    for _ in range(rounds - len(range(ranks.rank, count, ranks.world_size))):
        yield (last if last is not None else first), False


class QuietMonitor:
    """What ranks other than 0 report through: nothing. Rank 0's RunMonitor prints and writes
    for the whole run, and every rank reaches the same decisions, so nothing is lost."""

    def __init__(self) -> None:
        self.window_seconds: list[float] = []
        self.evaluations: list[tuple[int, float, float]] = []

    def start(self, *args: Any) -> None: ...
    def advance(self) -> None: ...
    def message(self, line: str) -> None: ...
    def log(self, *args: Any) -> None: ...
    def first_step(self, *args: Any) -> None: ...
    def evaluation(self, *args: Any) -> None: ...
    def finish(self, *args: Any) -> None: ...
