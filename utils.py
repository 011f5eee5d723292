"""Device, dtype and seeding: the few facts about the machine that the rest of the code needs."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
import psutil
import torch

from config import SystemConfig
from distributed import Ranks
from errors import UserError
from forward_context import resolve_compile_mode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def notice(message: str) -> None:
    """Print a one-line notice about a fallback the user should know of."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def read_user_text(path: str, what: str) -> str:
    """Return the text of a file the user named (`what`: how, e.g. "--text"), or raise the one
    UserError line saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}); convert it first") from None
    except OSError as error:  # a folder, no permission
        raise UserError(f"cannot read {what} {path}: {error.strerror}") from None


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def _freest_cuda_device() -> torch.device:
    """Return the CUDA device with the most free memory (the only one, on one-GPU machines)."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
    return torch.device("cuda", max(range(count), key=free.__getitem__))


def select_device(requested: str) -> torch.device:
    """Return the device to run on: the requested one, or CUDA, then MPS, then CPU for 'auto'."""
    if requested == "auto":
        if torch.cuda.is_available():
            return _freest_cuda_device()
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device cuda was asked for, but torch {torch.__version__} sees no CUDA GPU; "
                "use --device cpu or --device auto"
            )
        return _freest_cuda_device()
    if requested == "mps" and not _mps_available():
        raise UserError("--device mps was asked for, but MPS is not available here; use --device cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """Return whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX).

    Without it torch emulates bf16 matmuls, which measured about 140x slower than float32 on
    an AVX2-only EPYC of this project's machines (0.9 against 127 GFLOP/s, 1024^2 matrices).
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; in torch >= 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Return the CPU's model name ("Intel(R) Xeon(R) Platinum 8480+"), or its architecture."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine()


def select_dtype(device: torch.device, requested: str) -> torch.dtype:
    """Return the compute dtype: bf16 on CUDA when supported, fp16 on older GPUs; float32 on
    a CPU for 'auto' (a training run then measures whether bf16 is faster: precision.py).

    A dtype the device cannot use (or only emulates) falls back with a notice rather than failing.
    """
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if requested == "bfloat16" and not bf16_ok:
            notice("this GPU has no bfloat16; using float16 with loss scaling instead")
            return torch.float16
        return DTYPES[requested]
    if requested == "float32":
        return torch.float32
    if device.type == "cpu" and requested == "bfloat16":
        if cpu_has_native_bf16():
            return torch.bfloat16
        notice("this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bf16 would be emulated "
               "and far slower; training in float32 instead")
        return torch.float32
    if requested != "auto":
        notice(f"{requested} is not used on {device.type}; training in float32 instead")
    return torch.float32


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Return the autocast context for mixed precision, or a null context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_supported(device: torch.device) -> tuple[bool, str]:
    """Return whether torch.compile can run on this device, and why not when it cannot."""
    if device.type == "mps":
        return False, "torch.compile is not supported on MPS"
    if device.type == "cuda" and (sys.platform == "win32" or importlib.util.find_spec("triton") is None):
        return False, "torch.compile needs Triton on CUDA, and Triton is not installed"
    return True, ""


def configure_tf32(allow: bool) -> None:
    """Let float32 matmuls and convolutions use TF32 tensor cores on CUDA (or forbid it)."""
    torch.set_float32_matmul_precision("high" if allow else "highest")
    torch.backends.cudnn.allow_tf32 = allow


def process_start_time() -> float:
    """Return when this process started (time.time() seconds), so time limits count imports too."""
    return psutil.Process().create_time()


def configure_determinism(on: bool) -> None:
    """Ask torch for deterministic algorithms (warning where an op has none), or let it choose."""
    if on == torch.are_deterministic_algorithms_enabled():
        return  # already so; the call imports torch._inductor, measured at 3 s of start-up here
    torch.use_deterministic_algorithms(on, warn_only=True)
    if on:
        # cuBLAS needs a fixed workspace to repeat its results; read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels per run


def configure_torch(system: SystemConfig) -> None:
    """Apply the system section's threads, seed, TF32 and determinism settings to torch."""
    configure_threads(system.threads)
    seed_everything(system.seed)
    configure_tf32(system.allow_tf32)
    configure_determinism(system.deterministic)


def configure_threads(threads: Optional[int]) -> None:
    """Compute with `threads` CPU threads; None keeps torch's default (one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class DeviceInfo:
    device: torch.device
    dtype: torch.dtype
    compile: bool
    processes: int = 1  # torchrun's WORLD_SIZE: this device is one of that many alike
    dtype_reason: str = ""  # why `dtype auto` chose this dtype, where it was a measured choice
    dtype_pending: bool = False  # auto on a CPU, to be timed by the run (--show_config before the data)
    compile_mode: str = "default"  # torch.compile's mode, "auto" resolved (forward_context.py)

    def describe(self) -> str:
        name = self.device.type
        if self.device.type == "cuda":
            name = f"cuda:{self.device.index} ({torch.cuda.get_device_name(self.device)})"
        if self.processes > 1:
            name += f" x {self.processes} processes"
        dtype = "auto" if self.dtype_pending else str(self.dtype).removeprefix("torch.")
        compiled = f"on ({self.compile_mode})" if self.compile else "off"
        return f"{name}, {dtype}, compile {compiled}"


def device_for_rank(requested: str, ranks: Ranks) -> torch.device:
    """Return this process's device: under torchrun on CUDA, the GPU of its local rank."""
    if ranks.launched and requested in ("auto", "cuda") and torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {ranks.local_rank} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; lower torchrun's --nproc_per_node")
        return torch.device("cuda", ranks.local_rank)
    chosen = select_device(requested)
    if ranks.launched and chosen.type == "mps":
        raise UserError("torchrun cannot share a model across processes on MPS; use --device cpu")
    return chosen


def resolve_system(device: str, dtype: str, compile_requested: bool | None,
                   ranks: Ranks = Ranks(), compile_mode: str = "auto", grad_accum_steps: int = 1) -> DeviceInfo:
    """Return the device, dtype and compile choice (with its mode) for the system section of a
    config; grad_accum_steps matters to compile_mode auto, which uses CUDA graphs only without it.

    Compilation is on by default on CUDA only; on CPU it is used when asked for explicitly.
    """
    chosen = device_for_rank(device, ranks)
    use_compile = compile_requested if compile_requested is not None else chosen.type == "cuda"
    if use_compile:
        ok, why = compile_supported(chosen)
        if not ok:
            if compile_requested:
                notice(f"{why}; running without it")
            use_compile = False
    mode = resolve_compile_mode(compile_mode, chosen, ranks.launched, grad_accum_steps)
    return DeviceInfo(chosen, select_dtype(chosen, dtype), use_compile, ranks.world_size, compile_mode=mode)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk, so a rename or a new link in it survives a power cut."""
    if os.name == "nt":  # Windows cannot open a directory to flush it
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: a reader sees the old file or the new one, never half of it.

    The bytes go to a temporary file in the same directory and are flushed to disk before
    they replace the target; the directory is flushed so the rename survives a power cut.
    """
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        fsync_directory(path.parent)
    finally:
        partial.unlink(missing_ok=True)  # only left over when something failed


# ---------------------------------------------------------------- throughput and memory

# Dense peak TFLOP/s from NVIDIA's datasheets and architecture whitepapers (no sparsity):
# (16-bit tensor cores with fp32 accumulation, TF32 tensor cores, plain fp32). Checked in
# order, so a name that contains another (A100 contains A10, L40S contains L4) comes first.
GPU_PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    ("H200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.5, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 4080", (97.5, 48.7, 48.7)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("RTX 3080", (59.5, 29.8, 29.8)),
    ("V100", (125.0, 15.7, 15.7)),  # no TF32: float32 runs at the plain rate
    ("T4", (65.0, 8.1, 8.1)),
]


def peak_flops(device: torch.device, dtype: torch.dtype, allow_tf32: bool,
               override_tflops: float | None = None) -> float | None:
    """Return the device's peak FLOP/s for this dtype, or None where it is not known (CPU, MPS)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32 if allow_tf32 else fp32) * 1e12
    return None


@dataclass
class MemoryStats:
    """Memory in MiB: this process, the whole machine, and (on CUDA) tensors on the GPU."""

    rss_mb: float
    system_used_mb: float
    system_total_mb: float
    cuda_allocated_mb: float | None = None
    cuda_peak_mb: float | None = None


def memory_stats(device: torch.device) -> MemoryStats:
    mib = 2**20
    system = psutil.virtual_memory()
    stats = MemoryStats(psutil.Process().memory_info().rss / mib, (system.total - system.available) / mib,
                        system.total / mib)
    if device.type == "cuda":
        stats.cuda_allocated_mb = torch.cuda.memory_allocated(device) / mib
        stats.cuda_peak_mb = torch.cuda.max_memory_allocated(device) / mib
    return stats
